"""The `cellmtl` command line: version, datasets list/fetch/verify."""
import shutil

from conftest import run_cli


def test_version_and_help():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("cellmtl ")
    res = run_cli("--help")
    assert res.returncode == 0 and all(c in res.stdout for c in ("figures", "datasets", "readme"))


def test_datasets_list_names_every_dataset():
    res = run_cli("datasets", "list")
    assert res.returncode == 0, res.stderr
    for name in ("cellbench", "citeseq_pbmc", "cellprofiler_example_human", "pbmc68k_reduced"): assert name in res.stdout


def test_datasets_verify_ok_on_the_local_copy(data_dir):
    res = run_cli("datasets", "verify", "--data-dir", data_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mismatch" not in res.stdout and "missing" not in res.stdout


def test_datasets_verify_flags_a_corrupt_copy(tmp_path, data_dir):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    target = copy / "cellbench" / "sc_dropseq.metadata.csv.gz"
    target.write_bytes(target.read_bytes()[:-10])  # truncated download
    res = run_cli("datasets", "verify", "--data-dir", copy)
    assert res.returncode == 1
    assert "sc_dropseq.metadata.csv.gz" in res.stdout and "mismatch" in res.stdout


def test_datasets_fetch_from_the_local_copy(data_dir):
    res = run_cli("datasets", "fetch", "cellbench", "--data-dir", data_dir)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("cellbench/") == 8
