"""Shared helpers for the pytest suite (CLI, pipeline, bad inputs, torchrun)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cellmtl_cmd() -> list[str]:
    "The installed `cellmtl` console script (next to this interpreter), else the module entry point."
    script = Path(sys.executable).parent / "cellmtl"
    if script.exists(): return [str(script)]
    found = shutil.which("cellmtl")
    if found: return [found]
    return [sys.executable, "-c", "import sys; from cellmtl.cli import main; sys.exit(main())"]


def run_cli(*args, env=None, cwd=ROOT, timeout=900) -> subprocess.CompletedProcess:
    "Run `cellmtl *args` and capture its output."
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*cellmtl_cmd(), *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    "The offline copy of the real datasets (CELLMTL_DATA_DIR, set by the Makefile)."
    d = os.environ.get("CELLMTL_DATA_DIR")
    if not d or not Path(d).exists():
        pytest.skip("CELLMTL_DATA_DIR is not set to a local copy of the datasets (the Makefile sets it to ../shared/data)")
    return Path(d)
