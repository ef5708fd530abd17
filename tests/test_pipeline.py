"""The figure pipeline end to end: every figure notebook once with the `test` profile, and failure handling."""
import json
import os
import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from conftest import ROOT, run_cli

FIGURE_NOTEBOOKS = sorted(p.stem for p in (ROOT / "nbs" / "figures").glob("*.ipynb"))
# a str.format placeholder ({n_seeds}, {acc:.2f}) left in a caption whose f prefix is missing; not TeX's \mathrm{x}
PLACEHOLDER = re.compile(r"(?<![\\\w$])\{[A-Za-z_][^{}]*\}")


def test_every_figure_notebook_runs_with_the_test_profile(tmp_path, data_dir):
    out, build = tmp_path / "figures", tmp_path / "build"
    res = run_cli("figures", "--profile", "test", "--out", out, "--build", build)
    assert res.returncode == 0, res.stdout + res.stderr
    index = json.loads((out / "index.json").read_text())
    assert sorted({Path(e["notebook"]).stem for e in index}) == FIGURE_NOTEBOOKS
    for e in index:
        png, pdf = out / f"{e['name']}.png", out / f"{e['name']}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
        assert e["caption"] and e["profile"] == "test" and e["seed"] == 0 and e["seconds"] > 0
        assert not PLACEHOLDER.search(e["caption"]), f"{e['name']}: unformatted placeholder in its caption: {e['caption']!r}"
        assert b"CreationDate" not in pdf.read_bytes()  # metadata stripped: same numbers, same bytes
    readme = (out / "README.md").read_text()
    for e in index: assert f"![{e['name']}]({e['name']}.png)" in readme and e["caption"] in readme
    for stem in FIGURE_NOTEBOOKS: assert (build / f"{stem}.ipynb").exists()  # executed copies kept in build/
    tables = [e for e in index if f"{e['name']}.csv" in e["files"]]  # numbers behind a figure travel with it
    assert "mtl_methods" in {e["name"] for e in tables}
    for e in tables: assert (out / f"{e['name']}.csv").read_text().count("\n") > 1 and f"[CSV]({e['name']}.csv)" in readme


def _toy_notebook(path: Path, *cells: str):
    params = new_code_cell("out_dir = 'figures'\nseed = 0\nprofile = 'smoke'", metadata={"tags": ["parameters"]})
    nb = new_notebook(cells=[params, *map(new_code_cell, cells)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    nbformat.write(nb, path)


def _toy_project(tmp_path: Path, fail: bool) -> Path:
    nbs = tmp_path / "nbs"; (nbs / "profiles").mkdir(parents=True, exist_ok=True)
    (nbs / "profiles" / "smoke.yaml").write_text("all: {seed: 7}\n")
    _toy_notebook(nbs / "a_line.ipynb", "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt",
                  "from cellmtl.pipeline import save_figure\nfig, ax = plt.subplots(); ax.plot([0, seed])\n"
                  "save_figure(fig, 'line', out_dir, caption='A toy line.')")
    body = "raise RuntimeError('the model diverged')" if fail else "fig, ax = plt.subplots(); ax.bar([0], [seed])\n" \
           "save_figure(fig, 'bar', out_dir, caption='A toy bar.')"
    _toy_notebook(nbs / "b_bar.ipynb", "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt\n"
                  "from cellmtl.pipeline import save_figure", body)
    return nbs


def test_failure_keeps_previous_figures_and_names_notebook_cell_and_copy(tmp_path):
    out, build = tmp_path / "figs", tmp_path / "build"
    nbs = _toy_project(tmp_path, fail=False)
    ok = run_cli("figures", "--notebooks", nbs, "--out", out, "--build", build)
    assert ok.returncode == 0, ok.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"line.png", "line.pdf", "bar.png", "bar.pdf", "README.md", "index.json"} <= set(before)

    _toy_project(tmp_path, fail=True)
    bad = run_cli("figures", "--notebooks", nbs, "--out", out, "--build", build)
    assert bad.returncode == 1
    msg = bad.stderr
    assert "b_bar.ipynb failed in cell In [4]" in msg and "raise RuntimeError('the model diverged')" in msg, msg
    assert "RuntimeError: the model diverged" in msg and str(build / "b_bar.ipynb") in msg, msg
    assert (out / "bar.png").read_bytes() == before["bar.png"]  # the failed step left its old figure alone
    assert "[2/2] FAILED" in bad.stdout and "[1/2] a_line: 1 figure(s)" in bad.stdout


def test_a_caption_with_an_unformatted_placeholder_fails_its_notebook(tmp_path):
    nbs = tmp_path / "nbs"; (nbs / "profiles").mkdir(parents=True)
    (nbs / "profiles" / "smoke.yaml").write_text("all: {seed: 0}\n")
    _toy_notebook(nbs / "a_late.ipynb", "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt",
                  "from cellmtl.pipeline import save_figure\nn_seeds = 3\nfig, ax = plt.subplots()\n"
                  "save_figure(fig, 'late', out_dir, caption=f'Accuracy over {n_seeds} seeds; ' 'mean over {n_seeds} seeds.')")
    res = run_cli("figures", "--notebooks", nbs, "--out", tmp_path / "figs", "--build", tmp_path / "build")
    assert res.returncode == 1 and "unformatted placeholder(s) ['{n_seeds}']" in res.stderr, res.stderr
    assert not (tmp_path / "figs" / "late.png").exists() and PLACEHOLDER.search("mean over {n_seeds} seeds")


def test_figures_and_index_are_readable_by_the_group_as_the_umask_says(tmp_path):
    out, build = tmp_path / "figs", tmp_path / "build"
    nbs = _toy_project(tmp_path, fail=False)
    old = os.umask(0o022)  # the subprocess inherits it
    try: res = run_cli("figures", "--notebooks", nbs, "--out", out, "--build", build)
    finally: os.umask(old)
    assert res.returncode == 0, res.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes  # not mkstemp's 0o600
    assert {"line.png", "line.pdf", "README.md", "index.json"} <= set(modes)


def test_only_runs_one_notebook_and_keeps_the_other_index_entries(tmp_path):
    out, build = tmp_path / "figs", tmp_path / "build"
    nbs = _toy_project(tmp_path, fail=False)
    assert run_cli("figures", "--notebooks", nbs, "--out", out, "--build", build).returncode == 0
    res = run_cli("figures", "--notebooks", nbs, "--out", out, "--build", build, "--only", "a_")
    assert res.returncode == 0 and "[1/1] a_line" in res.stdout
    names = [e["name"] for e in json.loads((out / "index.json").read_text())]
    assert names == ["line", "bar"]  # sorted by notebook; bar kept from the earlier run
    assert "seed 7" in (out / "README.md").read_text()


def test_bad_profile_and_bad_only_are_clear_errors(tmp_path):
    nbs = _toy_project(tmp_path, fail=False)
    res = run_cli("figures", "--notebooks", nbs, "--profile", "paper", "--out", tmp_path / "o")
    assert res.returncode == 2 and "Profile 'paper' not found" in res.stderr and "known profiles: ['smoke']" in res.stderr
    res = run_cli("figures", "--notebooks", nbs, "--only", "zzz", "--out", tmp_path / "o")
    assert res.returncode == 2 and "--only 'zzz' matches no notebook" in res.stderr


def test_each_figure_notebook_has_one_typed_commented_parameters_cell():
    import re
    for stem in FIGURE_NOTEBOOKS:
        nb = nbformat.read(ROOT / "nbs" / "figures" / f"{stem}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{stem}: {len(tagged)} cells tagged 'parameters' (nbdev-clean must keep the tag)"
        lines = [l for l in tagged[0].source.splitlines() if l.strip()]
        assert {"out_dir", "seed", "profile"} <= {l.split(":")[0].strip() for l in lines}, stem
        for l in lines: assert re.match(r"^\w+: [\w\[\], |]+ = .+  # .+", l), f"{stem}: untyped or uncommented parameter: {l!r}"


def _toy_checkout(tmp_path: Path) -> Path:
    "A folder that find_project_root takes for a checkout, with a committed-looking figures/."
    (tmp_path / "pyproject.toml").write_text(""); (tmp_path / "nbs" / "figures").mkdir(parents=True)
    (tmp_path / "figures").mkdir(); (tmp_path / "figures" / "index.json").write_text("[]\n")
    return tmp_path


def _line_figure():
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([0, 1])
    return fig


def test_save_figure_outside_the_pipeline_writes_to_scratch_not_figures(tmp_path, monkeypatch, capsys):
    from cellmtl.pipeline import FIGURE_STAGING_ENV, save_figure
    root = _toy_checkout(tmp_path)
    monkeypatch.delenv(FIGURE_STAGING_ENV, raising=False)  # no pipeline marker: a notebook run by hand
    monkeypatch.setenv("JPY_SESSION_NAME", str(root / "nbs" / "figures" / "10_mtl.ipynb"))  # what Jupyter tells its kernels
    monkeypatch.chdir(root / "nbs" / "figures")  # a figure notebook's working directory; its default out_dir
    save_figure(_line_figure(), "by_hand", "../../figures", caption="Run by hand.")
    assert sorted(p.name for p in (root / "figures").iterdir()) == ["index.json"]  # committed figures untouched
    scratch = root / "build" / "figures-scratch" / "10_mtl"
    assert sorted(p.name for p in scratch.iterdir()) == ["by_hand.json", "by_hand.pdf", "by_hand.png"]
    said = capsys.readouterr().out
    assert "not run by the figure pipeline" in said and str(scratch) in said and "make figures" in said, said
    monkeypatch.delenv("JPY_SESSION_NAME")
    save_figure(_line_figure(), "no_name", root / "figures" / "sub", caption="Below figures/ too.")
    assert (root / "build" / "figures-scratch" / "interactive" / "no_name.png").exists()
    assert not (root / "figures" / "sub").exists()
    save_figure(_line_figure(), "mine", root / "results", caption="A user's own folder.")  # not figures/: as asked
    assert (root / "results" / "mine.png").exists()
    monkeypatch.setenv(FIGURE_STAGING_ENV, str(root / "figures"))  # with the marker, out_dir is taken as given
    save_figure(_line_figure(), "staged", root / "figures", caption="Staged.")
    assert (root / "figures" / "staged.png").exists()


def test_save_figure_by_hand_leaves_this_checkouts_figures_alone(monkeypatch):
    import shutil
    from cellmtl.pipeline import FIGURE_STAGING_ENV, save_figure
    monkeypatch.delenv(FIGURE_STAGING_ENV, raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", "pytest_scratch_check.ipynb")
    before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()}
    scratch = ROOT / "build" / "figures-scratch" / "pytest_scratch_check"
    try:
        save_figure(_line_figure(), "datasets_umap", ROOT / "figures", caption="Would replace a committed figure.")
        assert (scratch / "datasets_umap.png").exists()
        assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "figures").iterdir()} == before
    finally: shutil.rmtree(scratch, ignore_errors=True)


def test_the_pipeline_marks_its_kernel_and_clears_the_marker(tmp_path, monkeypatch):
    from cellmtl.pipeline import FIGURE_STAGING_ENV, run_notebook
    monkeypatch.delenv(FIGURE_STAGING_ENV, raising=False)
    nb = tmp_path / "a_marked.ipynb"
    _toy_notebook(nb, "import os, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt",
                  f"assert os.environ['{FIGURE_STAGING_ENV}'] == out_dir, (os.environ.get('{FIGURE_STAGING_ENV}'), out_dir)\n"
                  "from cellmtl.pipeline import save_figure\nfig, ax = plt.subplots()\nsave_figure(fig, 'marked', out_dir, caption='Marked.')")
    run = run_notebook(nb, {"seed": 0, "profile": "smoke"}, tmp_path / "build", progress=False)
    assert [f["name"] for f in run.figures] == ["marked"] and (tmp_path / "build" / "a_marked" / "marked.png").exists()
    assert FIGURE_STAGING_ENV not in os.environ  # restored after the run


def test_each_figure_notebook_says_where_a_run_by_hand_writes():
    for stem in FIGURE_NOTEBOOKS:
        nb = nbformat.read(ROOT / "nbs" / "figures" / f"{stem}.ipynb", as_version=4)
        [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        [line] = [l for l in cell.source.splitlines() if l.startswith("out_dir:")]
        assert "run by hand" in line and "build/figures-scratch/<notebook>/" in line, f"{stem}: {line}"


def test_each_figure_notebook_sends_its_tables_where_its_figures_go():
    "Run by hand, a notebook's CSVs must also land in the scratch folder: out_dir is redirected once, before any write."
    import re
    for stem in FIGURE_NOTEBOOKS:
        nb = nbformat.read(ROOT / "nbs" / "figures" / f"{stem}.ipynb", as_version=4)
        index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        after = nb.cells[index + 1].source
        assert "out_dir = str(figure_dir(out_dir))" in after, f"{stem}: the cell after the parameters must redirect out_dir"
        later = "\n".join(c.source for c in nb.cells[index + 2:] if c.cell_type == "code")
        for call in re.findall(r"\.to_csv\(([^,)]*)", later):
            assert "out_dir" in call, f"{stem}: a table is written outside out_dir: to_csv({call})"
