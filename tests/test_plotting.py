"""cellmtl.plotting (nbs/08_plotting.ipynb) on a headless backend: Axes in and out, one colour per label, flow tables that
add up, broken hierarchy paths, probability bars from predict_proba and from predict, and clear errors for bad input."""
import io

import matplotlib

matplotlib.use("Agg")  # headless, as in CI; must come before pyplot
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib import colors as mcolors
from matplotlib.axes import Axes

from cellmtl.data import LabelHierarchy
from cellmtl.plotting import (MISSING_COLOR, UNASSIGNED_COLOR, WRONG_COLOR, alluvial_flows, label_palette, probability_bars,
                              sankey)

LEVELS = ["anno_lv1", "anno_lv2", "anno_lv3", "anno_lv4"]
hexes = lambda artists: [mcolors.to_hex(a.get_facecolor()) for a in artists]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def pbmc():
    from cellmtl.datasets import pbmc68k_hierarchy
    return pbmc68k_hierarchy()


@pytest.fixture
def cells() -> pd.DataFrame:
    "Eight hand-made cells: a two-level truth, a prediction with one wrong call, one Unassigned call and one NaN."
    return pd.DataFrame({
        "lineage":   ["lymphoid", "lymphoid", "lymphoid", "lymphoid", "myeloid", "myeloid", "myeloid", "myeloid"],
        "type":      ["T", "T", "B", "B", "mono", "mono", "DC", "DC"],
        "predicted": ["T", "B", "B", "B", "mono", "Unassigned", "DC", None],
    }, index=[f"cell{i}" for i in range(8)])


def nodes(ax):
    return [p for p in ax.patches if p.get_gid() == "alluvial-node"]


def highlighted(ax):
    return [c for c in ax.collections if c.get_gid() == "alluvial-ribbon-highlight"]


# --- Axes in, Axes out, headless ---------------------------------------------------------------------------------

def test_functions_return_axes_and_draw_headless(cells):
    assert matplotlib.get_backend().lower() == "agg"
    n_figures = len(plt.get_fignums())
    ax = sankey(cells, ["type", "predicted"])
    assert isinstance(ax, Axes) and len(plt.get_fignums()) == n_figures + 1  # a new figure, never shown
    proba = {"type": np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])}
    for drawn in (ax, probability_bars(proba, ["T", "B", "mono"]), probability_bars(proba, ["T", "B", "mono"], kind="classes")):
        assert isinstance(drawn, Axes)
        buffer = io.BytesIO()
        drawn.figure.savefig(buffer, format="png")
        assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draws_into_the_given_axes(cells):
    fig, (left, right) = plt.subplots(1, 2)
    n_figures = len(plt.get_fignums())
    assert sankey(cells, ["lineage", "type"], ax=left) is left
    assert probability_bars(cells.assign(predicted_type=cells["type"], predicted_type_prob=0.9), ax=right) is right
    assert len(plt.get_fignums()) == n_figures  # no extra figure
    assert len(nodes(left)) == 2 + 4 and len(right.patches) == 8 and not nodes(right)


# --- label_palette ---------------------------------------------------------------------------------------------

def test_palette_same_label_same_colour_across_columns(cells):
    palette = label_palette(cells, ["type", "predicted"])
    assert list(palette) == ["B", "DC", "T", "mono", "Unassigned", "missing"]  # each column's labels in order, greys last
    assert len(set(palette.values())) == len(palette)
    by_column = label_palette(cells, ["lineage", "type"])
    assert list(by_column) == ["lymphoid", "myeloid", "B", "DC", "T", "mono"]  # column by column, left to right
    assert by_column["lymphoid"] == mcolors.to_hex(plt.cm.tab10.colors[0])  # the first label gets tab10's first colour
    assert palette["Unassigned"] == UNASSIGNED_COLOR and palette["missing"] == MISSING_COLOR
    alone = label_palette(cells, "type")
    assert {label: palette[label] for label in alone} == alone  # adding a column does not recolour the labels
    pinned = label_palette(cells, ["type", "predicted"], palette={"T": "black"})
    assert pinned["T"] == "#000000" and "#000000" not in [c for l, c in pinned.items() if l != "T"]


def test_palette_store_writes_scanpy_colours(pbmc):
    adata = pbmc.copy()
    palette = label_palette(adata, LEVELS, store=True)
    for level in LEVELS:
        categories = adata.obs[level].cat.categories
        assert adata.uns[f"{level}_colors"] == [palette[c] for c in categories]
    assert adata.uns["anno_lv2_colors"][list(adata.obs["anno_lv2"].cat.categories).index("NK")] == \
           adata.uns["anno_lv3_colors"][list(adata.obs["anno_lv3"].cat.categories).index("NK")]  # "NK" at two levels, one colour


@pytest.mark.parametrize("columns", [["type", "predicted"], ["lineage", "type", "predicted"]])
def test_sankey_colours_nodes_with_the_palette(cells, columns):
    palette = label_palette(cells, columns)
    ax = sankey(cells, columns)
    for x, column in enumerate(columns):
        in_column = [p for p in nodes(ax) if round(p.get_x() + p.get_width() / 2) == x]
        labels = cells[column].fillna("missing").unique()
        assert sorted(hexes(in_column)) == sorted(palette[label] for label in labels)  # the default is label_palette
    red = {"T": "#ff0000"}
    assert "#ff0000" in hexes(nodes(sankey(cells, ["type", "predicted"], palette=red)))


# --- alluvial_flows and broken paths -----------------------------------------------------------------------------

def test_flows_sum_to_cell_counts(pbmc):
    flows = alluvial_flows(pbmc, LEVELS)
    assert flows.groupby("source_column", sort=False)["cells"].sum().tolist() == [pbmc.n_obs] * 3
    for a, b in zip(LEVELS, LEVELS[1:]):
        pair = flows[flows["source_column"] == a]
        assert pair.groupby("source")["cells"].sum().to_dict() == pbmc.obs[a].astype(str).value_counts().to_dict()
        assert pair.groupby("target")["cells"].sum().to_dict() == pbmc.obs[b].astype(str).value_counts().to_dict()
    np.testing.assert_allclose(flows["fraction"], flows["cells"] / pbmc.n_obs)


def test_flows_of_a_small_table(cells):
    flows = alluvial_flows(cells, ["type", "predicted"]).set_index(["source", "target"])["cells"]
    assert flows.to_dict() == {("B", "B"): 2, ("DC", "DC"): 1, ("DC", "missing"): 1, ("T", "B"): 1, ("T", "T"): 1,
                               ("mono", "Unassigned"): 1, ("mono", "mono"): 1}


def test_broken_paths_are_flagged(cells):
    wrong = cells.assign(type=["T", "T", "B", "DC", "mono", "mono", "DC", "DC"])  # cell3: lymphoid but DC
    hierarchy = LabelHierarchy(cells, ["lineage", "type"])
    for tree in (hierarchy, cells[["lineage", "type"]], {"T": "lymphoid", "B": "lymphoid", "mono": "myeloid", "DC": "myeloid"}):
        flows = alluvial_flows(wrong, ["lineage", "type"], hierarchy=tree)
        assert flows.loc[flows["broken"], ["source", "target", "cells"]].values.tolist() == [["lymphoid", "DC", 1]], type(tree)
    assert not alluvial_flows(cells, ["lineage", "type"], hierarchy=hierarchy)["broken"].any()
    ax = sankey(wrong, ["lineage", "type"], hierarchy=hierarchy)  # highlight="broken" is the default with a hierarchy
    assert len(highlighted(ax)) == 1 and hexes(highlighted(ax)) == [WRONG_COLOR]
    assert not highlighted(sankey(cells, ["lineage", "type"], hierarchy=hierarchy))


def test_unassigned_and_missing_are_not_broken(pbmc):
    obs = pbmc.obs[LEVELS].astype(object)
    obs.iloc[:5, 3] = "Unassigned"
    obs.iloc[5:9, 2] = np.nan
    flows = alluvial_flows(obs, LEVELS, hierarchy=LabelHierarchy(pbmc.obs, LEVELS))
    assert not flows["broken"].any()
    assert flows.loc[flows["target"] == "missing", "cells"].sum() == 4


def test_changed_highlights_the_errors(cells):
    ax = sankey(cells, ["type", "predicted"], highlight="changed")
    assert len(highlighted(ax)) == 3  # T -> B, mono -> Unassigned, DC -> missing
    assert len(ax.collections) == len(alluvial_flows(cells, ["type", "predicted"]))


def test_predicted_levels_against_the_annotators_hierarchy(pbmc):
    hierarchy = LabelHierarchy(pbmc.obs, LEVELS)
    predicted = pbmc.obs[LEVELS].rename(columns=lambda c: f"predicted_{c}")
    ax = sankey(predicted, list(predicted.columns), hierarchy=hierarchy)  # predicted_<level> columns match the levels
    assert not highlighted(ax)
    assert sum(p.get_height() for p in nodes(ax)) == pbmc.n_obs * len(LEVELS)


# --- probability_bars ------------------------------------------------------------------------------------------

@pytest.fixture
def proba():
    "predict_proba's shape for 4 cells at two levels: {level: (N, C)}, with the class names of a LabelHierarchy."
    classes = {"lineage": ["lymphoid", "myeloid"], "type": ["B", "DC", "T", "mono"]}
    values = {"lineage": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]),
              "type": np.array([[0.1, 0.05, 0.8, 0.05], [0.05, 0.5, 0.05, 0.4], [0.4, 0.1, 0.45, 0.05], [0.05, 0.15, 0.0, 0.8]])}
    return values, classes


def test_probability_bars_from_predict_proba(proba):
    values, classes = proba
    ax = probability_bars(values, classes, top_k=2, truth=["T", "mono", "B", "mono"])  # the finest level by default
    segments = [p for p in ax.patches if p.get_width() > 0]
    widths = np.array([p.get_width() for p in segments]).reshape(4, 3)  # top 2 + the rest, per cell
    np.testing.assert_allclose(widths[:, 0], values["type"].max(1))
    np.testing.assert_allclose(widths.sum(1), 1.0)
    colors = label_palette(pd.DataFrame({"type": pd.Categorical(["B"], categories=classes["type"])}), "type")
    assert hexes(segments[:2]) == [colors["T"], colors["B"]]  # cell 0: T, then B
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[0] == "cell 0\ntrue: T"
    assert [mcolors.to_hex(t.get_color()) == WRONG_COLOR for t in ax.get_yticklabels()] == [False, True, True, False]
    assert "(type)" in ax.get_xlabel()
    lineage = probability_bars(values, classes, level="lineage", top_k=1)
    np.testing.assert_allclose([p.get_width() for p in lineage.patches if p.get_x() == 0], values["lineage"].max(1))


def test_probability_bars_by_class(proba):
    values, classes = proba
    ax = probability_bars(values, classes, kind="classes", style="bar", truth=["T", "mono", "B", "mono"])
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == ["DC (1)", "T (2)", "mono (1)"]  # the called classes, in class order
    np.testing.assert_allclose([b.get_width() for b in ax.patches], [0.5, (0.8 + 0.45) / 2, 0.8])
    box = probability_bars(values, classes, kind="classes", truth=["T", "mono", "B", "mono"])
    wrong = sum(len(c.get_offsets()) for c in box.collections if c.get_gid() == "probability-wrong-call")
    assert wrong == 2


def test_probability_bars_from_a_predict_table(cells):
    table = pd.DataFrame({"predicted_type": cells["predicted"].fillna("Unassigned"),
                          "predicted_type_prob": np.linspace(0.3, 1.0, 8)}, index=cells.index)
    ax = probability_bars(table, cells=["cell5", "cell0", "cell1"], truth=cells["type"], threshold=0.5)
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == ["cell5", "cell0", "cell1"]  # obs names
    np.testing.assert_allclose([p.get_width() for p in ax.patches], table["predicted_type_prob"].iloc[[5, 0, 1]])
    assert hexes(ax.patches)[0] == UNASSIGNED_COLOR
    assert [mcolors.to_hex(t.get_color()) == WRONG_COLOR for t in ax.get_yticklabels()] == [True, False, True]
    assert any(line.get_xdata()[0] == 0.5 for line in ax.get_lines())  # the threshold line
    mask = probability_bars(table, cells=table["predicted_type"].eq("B").to_numpy())
    assert len(mask.patches) == 3


def test_probability_bars_from_a_fitted_annotator(pbmc):
    from cellmtl.mtl import HierarchicalAnnotator
    annotator = HierarchicalAnnotator(label_keys=LEVELS).fit(pbmc[:400].copy(), seed=0, epochs=3)
    query = pbmc[400:450].copy()
    proba, predictions = annotator.predict_proba(query), annotator.predict(query)
    ax = probability_bars(proba, annotator, cells=[0, 1, 2], top_k=1)
    np.testing.assert_allclose([p.get_width() for p in ax.patches if p.get_x() == 0], proba["anno_lv4"][:3].max(1), rtol=1e-6)
    ax = probability_bars(predictions, kind="classes")
    assert sorted(t.get_text() for t in ax.get_yticklabels()) == \
           sorted(f"{k} ({v})" for k, v in predictions["predicted_anno_lv4"].astype(str).value_counts().items())


# --- bad input: clear errors -----------------------------------------------------------------------------------

def test_missing_columns_name_the_present_ones(cells):
    for call in (lambda: sankey(cells, ["type", "nope"]), lambda: label_palette(cells, "nope"),
                 lambda: alluvial_flows(cells, ["nope", "type"])):
        with pytest.raises(KeyError, match=r"\['nope'\] not found; the table has: \['lineage', 'type', 'predicted'\]"): call()
    with pytest.raises(ValueError, match="at least 2"): sankey(cells, ["type"])
    with pytest.raises(ValueError, match="twice"): sankey(cells, ["type", "type"])
    with pytest.raises(KeyError, match="no predicted_<level>"): probability_bars(cells)
    with pytest.raises(KeyError, match="the table has only"): probability_bars(cells.assign(predicted_type=cells["type"], predicted_type_prob=0.5), truth="truth")


def test_empty_input_is_refused(cells):
    for call in (lambda: sankey(cells.iloc[:0], ["type", "predicted"]), lambda: label_palette(cells.iloc[:0], "type"),
                 lambda: probability_bars(cells.iloc[:0].assign(predicted_type_prob=0.5))):
        with pytest.raises(ValueError, match="no cells"): call()
    with pytest.raises(ValueError, match="empty dict"): probability_bars({})
    with pytest.raises(ValueError, match=r"shape \(0, 3\)"): probability_bars(np.zeros((0, 3)))
    with pytest.raises(TypeError, match="AnnData or a pandas DataFrame"): sankey([["T", "B"]], ["a", "b"])


def test_bad_probabilities_and_options(proba, cells):
    values, classes = proba
    with pytest.raises(ValueError, match="4 probability columns but 3 class names for 'type'"): probability_bars(values, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not logits"): probability_bars(np.log(values["type"] + 0.01))
    with pytest.raises(KeyError, match="no level 'cell_type'"): probability_bars(values, classes, level="cell_type")
    with pytest.raises(ValueError, match="truth has 3 labels for 4 cells"): probability_bars(values, classes, truth=["T", "B", "T"])
    with pytest.raises(IndexError, match=r"\[0, 4\)"): probability_bars(values, classes, cells=[-1])
    with pytest.raises(ValueError, match="needs a hierarchy"): sankey(cells, ["type", "predicted"], highlight="broken")
    with pytest.raises(ValueError, match="coarse to fine"):
        alluvial_flows(cells, ["type", "lineage"], hierarchy=LabelHierarchy(cells, ["lineage", "type"]))
    with pytest.raises(ValueError, match="has 8 distinct colours but there are 9"):
        label_palette(pd.DataFrame({"x": [f"t{i}" for i in range(9)]}), "x", palette="Set2")


def test_parameter_comments_reach_help():
    import inspect
    for function in (label_palette, alluvial_flows, sankey, probability_bars):
        doc = inspect.getdoc(function)
        assert "\n" not in function.__doc__.split("\n\nParameters")[0], function.__name__  # a one-line summary
        assert "Parameters\n----------\n" in doc, function.__name__  # the docments comments, for help()
    assert "highlight_color : default '#d62728'\n    colour of highlighted ribbons" in inspect.getdoc(sankey)
    assert "top_k : int, default 3\n    cells view: how many classes per cell" in inspect.getdoc(probability_bars)
