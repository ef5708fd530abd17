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


def scgpt_model_source(filename: str) -> Path:
    "scGPT 0.2.4's scgpt/model folder (`make reference` installs it) holding `filename`; fails when CELLMTL_SCGPT_REFERENCE points elsewhere."
    env = os.environ.get("CELLMTL_SCGPT_REFERENCE")
    source = (Path(env) if env else ROOT / ".venv" / "reference" / "scgpt-0.2.4") / "scgpt" / "model"
    if not (source / filename).exists():
        if env: pytest.fail(f"{source / filename} is missing; `make reference` installs it")
        pytest.skip("scGPT's source is not installed; run `make reference` (make test does)")
    return source


def load_scgpt_modules(package: str, source: Path, names) -> dict:
    """scGPT modules `names` from `source`, loaded as submodules of a stand-in package `package` (scGPT's own __init__ needs
    torchtext etc.); each test file uses its own package name, so several can load in one pytest process."""
    import importlib.util
    import types
    import warnings
    if package not in sys.modules:
        stand_in = types.ModuleType(package); stand_in.__path__ = [str(source)]
        sys.modules[package] = stand_in
    for name in names:
        if f"{package}.{name}" in sys.modules: continue
        spec = importlib.util.spec_from_file_location(f"{package}.{name}", source / f"{name}.py")
        module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash_attn is not installed"
            spec.loader.exec_module(module)
    return {name: sys.modules[f"{package}.{name}"] for name in names}
