"""The wheel holds every module and resource file of the package (subpackages such as cellmtl.scgpt included)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project_files() -> list[str]:
    "The files git tracks or would track (untracked but not ignored), relative to the repository root."
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


def test_wheel_contains_every_module_and_resource(tmp_path):
    source = tmp_path / "source"
    for name in _project_files():  # a copy, so that the build leaves no build/ or egg-info in the checkout
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, text=True)
    wheel, = (tmp_path / "dist").glob("cellmtl-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    expected = {name for name in _project_files() if name.startswith("cellmtl/") and "__pycache__" not in name}
    assert any(name.startswith("cellmtl/scgpt/") for name in expected), "cellmtl/scgpt/ is missing from the checkout"
    assert any(name.startswith("cellmtl/resources/") for name in expected)
    missing = sorted(expected - in_wheel)
    assert not missing, f"the wheel lacks {missing}; check [tool.setuptools.packages.find] and package-data in pyproject.toml"
