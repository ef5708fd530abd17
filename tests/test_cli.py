"""The `cellmtl` command line: version, datasets list/fetch/verify."""
import shutil

from conftest import run_cli


def test_version_and_help():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("cellmtl ")
    res = run_cli("--help")
    assert res.returncode == 0 and all(c in res.stdout for c in ("figures", "datasets"))


def test_datasets_list_names_every_dataset():
    res = run_cli("datasets", "list")
    assert res.returncode == 0, res.stderr
    for name in ("cellbench", "citeseq_pbmc", "cellprofiler_example_human", "pbmc68k_reduced"): assert name in res.stdout


def test_datasets_verify_ok_on_the_local_copy(data_dir):
    res = run_cli("datasets", "verify", "--data-dir", data_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mismatch" not in res.stdout and "missing" not in res.stdout and "files verified in" in res.stdout


def test_datasets_verify_flags_a_corrupt_copy(tmp_path, data_dir):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    target = copy / "cellbench" / "sc_dropseq.metadata.csv.gz"
    target.write_bytes(target.read_bytes()[:-10])  # truncated download
    res = run_cli("datasets", "verify", "--data-dir", copy)
    assert res.returncode == 1
    assert "sc_dropseq.metadata.csv.gz" in res.stdout and "mismatch" in res.stdout
    assert len(res.stdout.splitlines()) == 2 and "sc_dropseq.count.csv.gz" not in res.stdout  # header + the bad file only
    assert "1 of" in res.stderr and "(1 mismatch)" in res.stderr, res.stderr


def test_datasets_fetch_from_the_local_copy(data_dir):
    res = run_cli("datasets", "fetch", "cellbench", "--data-dir", data_dir)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("cellbench/") == 8


def test_help_hides_the_developer_readme_command_which_still_works(tmp_path):
    res = run_cli("--help")
    assert res.returncode == 0 and "readme" not in res.stdout, res.stdout  # a developer command: not in the user help
    import nbformat
    from nbformat.v4 import new_markdown_cell, new_notebook
    (tmp_path / "pyproject.toml").write_text(""); (tmp_path / "nbs" / "figures").mkdir(parents=True)
    nbformat.write(new_notebook(cells=[new_markdown_cell("# Toy readme")]), tmp_path / "nbs" / "index.ipynb")
    res = run_cli("readme", "--quiet", cwd=tmp_path)  # what `make sync-check` runs, here in a toy checkout
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr
    assert "# Toy readme" in (tmp_path / "README.md").read_text()


def test_datasets_list_is_narrow_and_says_what_is_here(tmp_path, data_dir):
    res = run_cli("datasets", "list", "--data-dir", data_dir)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["name", "size", "local", "description"]
    assert max(map(len, lines)) <= 110, max(map(len, lines))  # not the ~300-character full table
    rows = {l.split()[0]: l.split()[3] for l in lines[1:]}  # name, size ("7.0 MB"), local, description
    assert rows["cellbench"] == "yes" and rows["pbmc68k_reduced"] == "bundled"
    empty = run_cli("datasets", "list", env={"CELLMTL_DATA_DIR": "", "CELLMTL_CACHE_DIR": str(tmp_path)})
    assert {l.split()[0]: l.split()[3] for l in empty.stdout.splitlines()[1:]}["cellbench"] == "no", empty.stdout
    for flag in ("--wide", "--long"):
        wide = run_cli("datasets", "list", flag, "--data-dir", data_dir)
        assert wide.returncode == 0 and all(c in wide.stdout.splitlines()[0] for c in ("licence", "commit", "loader", "local"))
        assert "Drop-seq raw counts" in wide.stdout  # the whole description


def test_datasets_verify_ok_prints_one_summary_line(data_dir):
    import re
    res = run_cli("datasets", "verify", "--data-dir", data_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.fullmatch(rf"\d+ files verified in {re.escape(str(data_dir))} \(sha256 as registered\)\n", res.stdout), res.stdout
    one = run_cli("datasets", "verify", "citeseq_pbmc", "--data-dir", data_dir)  # names restrict the check
    assert one.returncode == 0 and one.stdout.startswith("2 files verified in "), one.stdout
    wide = run_cli("datasets", "verify", "citeseq_pbmc", "--wide", "--data-dir", data_dir)
    assert wide.stdout.count(" ok ") == 2 and "files verified" in wide.stdout, wide.stdout


def test_datasets_verify_a_missing_or_empty_folder_is_one_error(tmp_path):
    res = run_cli("datasets", "verify", "--data-dir", tmp_path / "nope")
    assert res.returncode == 2 and res.stdout == "", res.stdout
    assert res.stderr.count("\n") == 1 and "does not exist" in res.stderr and str(tmp_path / "nope") in res.stderr, res.stderr
    assert "pass --data-dir" in res.stderr
    (tmp_path / "empty").mkdir()
    res = run_cli("datasets", "verify", "--data-dir", tmp_path / "empty")
    assert res.returncode == 1 and res.stdout == "" and "missing" not in res.stderr.replace(str(tmp_path), ""), res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "none of the" in res.stderr and "registered file(s) is in" in res.stderr, res.stderr
    res = run_cli("datasets", "verify", env={"CELLMTL_DATA_DIR": "", "CELLMTL_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 2 and "cellmtl datasets fetch" in res.stderr and "download cache" in res.stderr, res.stderr


def test_unknown_dataset_is_a_clean_message_with_the_known_names():
    for action in ("fetch", "verify"):
        res = run_cli("datasets", action, "pbmc3k")
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("cellmtl datasets: unknown dataset 'pbmc3k'; known: cellbench, "), res.stderr
        assert '"' not in res.stderr and "KeyError" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = run_cli("datasets", "fetch", "pbmc68k_reduced")
    assert res.returncode == 2 and "comes with scanpy" in res.stderr, res.stderr


def test_main_prints_a_key_error_without_its_repr_quotes(capsys, monkeypatch):
    from cellmtl import cli, datasets
    monkeypatch.setattr(datasets, "fetch_dataset", lambda name, data_dir=None: (_ for _ in ()).throw(KeyError("no such file")))
    assert cli.main(["datasets", "fetch", "cellbench"]) == 2
    assert capsys.readouterr().err == "cellmtl datasets: no such file\n"


def test_figures_outside_a_checkout_mentions_notebooks_out_and_build(tmp_path):
    res = run_cli("figures", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "No cellmtl checkout found" in res.stderr and all(f in res.stderr for f in ("--notebooks", "--out", "--build")), res.stderr
