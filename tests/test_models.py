"""Every model class on the one surface: fit on tiny real data, predict, embed, save, load, the same output again.

The data: 160 CellBench cells (CEL-seq2 and Drop-seq plates, raw counts, 5 lung cancer cell lines) on their
300 most-detected genes among those seen in 20-80% of the cells; each recipe trains for a couple of epochs at small widths, enough to exercise every verb.
"""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellmtl
from cellmtl.base import KINDS, BaseModel, model_class
from cellmtl.datasets import cellbench


@pytest.fixture(scope="module")
def cells():
    data = cellbench(["sc_celseq2", "sc_dropseq"], singlets_only=True)
    data = data[np.random.default_rng(0).permutation(data.n_obs)[:160]].copy()
    detected = np.asarray((data.X > 0).mean(0)).ravel()
    informative = np.flatnonzero((detected > 0.2) & (detected < 0.8))  # detected in some cells, not all: X > 0 carries information
    return data[:, informative[np.argsort(-detected[informative])[:300]]].copy()


def _phmap(cells):
    from cellmtl.mtl import HierarchicalAnnotator
    return HierarchicalAnnotator(label_keys=["cell_line"]).fit(cells, epochs=3, patience=None)


def _hrca(cells):
    from cellmtl.hrca import HRCAAnnotator
    model = HRCAAnnotator(label_key="cell_line", input_width=32, d_model=16, d_ff=32, n_heads=2, n_layers=1,
                          classifier_layers=1, min_cells_per_type=0)
    return model.pretrain(cells, epochs=1, batch_size=64).fit(cells, epochs=2, batch_size=64)


def _transformer(cells):
    from cellmtl.scgpt.annotator import TransformerAnnotator
    model = TransformerAnnotator(label_key="cell_line", d_model=16, n_heads=2, d_hid=32, n_layers=1, max_len=64)
    return model.pretrain(cells, epochs=1, batch_size=32).fit(cells, epochs=1, batch_size=32)


def _genetoken(cells):
    from cellmtl.genetoken import GeneTokenAnnotator
    model = GeneTokenAnnotator(label_key="cell_line", n_top_genes=None, d_model=16, n_heads=2, d_hid=32, n_layers=1)
    return model.pretrain(cells, epochs=1, batch_size=32).fit(cells, epochs=1, batch_size=32)


RECIPES = {"cellmtl.HierarchicalAnnotator": _phmap, "cellmtl.HRCAAnnotator": _hrca, "cellmtl.scgpt.TransformerAnnotator": _transformer,
           "cellmtl.GeneTokenAnnotator": _genetoken}


CONDITION_MODELS = {"cellmtl.scgpt.PerturbationPredictor": "tests/test_generation.py",  # predict conditions, not cell labels: tested there
                    "cellmtl.scgpt.MultiOmicTransformer": "tests/test_multiomic.py",  # imputes a modality, no labels
                    "cellmtl.imaging.MultiTaskImageModel": "tests/test_imaging.py"}  # scores image frames, not AnnData
ANNOTATORS = sorted(set(KINDS) - set(CONDITION_MODELS))


def test_every_model_kind_has_a_recipe_here():
    assert set(RECIPES) == set(ANNOTATORS), "add a recipe for every annotator class to tests/test_models.py"
    assert set(CONDITION_MODELS) <= set(KINDS)


_FITTED = {}


def fitted(kind, cells):
    "One trained model per kind for this module (training is the slow part)."
    if kind not in _FITTED: _FITTED[kind] = RECIPES[kind](cells)
    return _FITTED[kind]


@pytest.mark.parametrize("kind", ANNOTATORS)
def test_fit_predict_embed_save_load(kind, cells, tmp_path):
    model = fitted(kind, cells)
    assert isinstance(model, BaseModel) and type(model) is model_class(kind)
    assert type(model).__name__ in repr(model) and "not fitted" not in repr(model)
    query = cells[:40].copy()
    predictions = model.predict(query)
    label = [c for c in predictions.columns if c.startswith("predicted_") and not c.endswith("_prob")]
    assert label and list(predictions.index) == list(query.obs_names)
    assert set(predictions[label[0]].astype(str)) <= set(cells.obs["cell_line"].astype(str))
    embedding = model.embed(query, key_added="X_model")
    assert embedding.dtype == np.float32 and embedding.shape[0] == 40 and np.isfinite(embedding).all()
    assert query.obsm["X_model"].shape == embedding.shape
    annotated = model.annotate(query, key_added="model")
    assert annotated is query and annotated.uns["model"]["kind"] == kind
    assert (query.obs[label[0].replace("predicted", "model")].astype(str) == predictions[label[0]].astype(str)).all()

    folder = model.save(tmp_path / "model")
    again = cellmtl.load(folder)
    assert type(again) is type(model) and again.genes_ == model.genes_ and again.config == model.config
    pd.testing.assert_frame_equal(again.predict(query), predictions)
    np.testing.assert_array_equal(again.embed(query), embedding)
    with pytest.raises(FileExistsError, match="already holds"):
        model.save(folder)


def _predicted(predictions):
    return predictions[[c for c in predictions.columns if not c.endswith("_prob")]].astype(str)


@pytest.mark.parametrize("kind", ANNOTATORS)
def test_low_gene_overlap_is_refused_then_reported_where_the_user_looks(kind, cells):
    model = fitted(kind, cells)
    few = cells[:20, :30].copy()  # 30 of the 300 training genes: 10%
    with pytest.raises(ValueError, match=r"30 of the 300 reference \(training\) genes \(10.0%\), below min_overlap=0.5"):
        model.predict(few)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictions = model.predict(few, min_overlap=0.1)
    gene_warnings = [w for w in caught if "differ from" in str(w.message)]
    assert len(gene_warnings) == 1 and gene_warnings[0].filename == __file__  # one warning, at the user's line
    report = predictions.attrs["gene_alignment"]
    assert (report.n_found, report.n_missing) == (30, 270)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.annotate(few, key_added="query", min_overlap=0.1)
    record = few.uns["query"]
    assert record["kind"] == kind and record["cellmtl_version"] == cellmtl.__version__
    assert record["gene_alignment"]["n_found"] == 30 and record["gene_alignment"]["overlap"] == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ANNOTATORS)
def test_values_in_a_layer_and_float16_values(kind, cells):
    model = fitted(kind, cells)
    query = cells[:20].copy()
    expected = _predicted(model.predict(query))
    in_layer = ad.AnnData(obs=query.obs, var=query.var, layers={"counts": query.X.copy()})
    with pytest.raises(ValueError, match=r"X is None.*pass layer="):
        model.predict(in_layer)
    pd.testing.assert_frame_equal(_predicted(model.predict(in_layer, layer="counts")), expected)
    assert model.embed(in_layer, layer="counts", key_added="X_layer").shape[0] == 20 and "X_layer" in in_layer.obsm
    model.annotate(in_layer, layer="counts")
    assert in_layer.X is None and "predicted" in in_layer.uns  # the user's object keeps its layout; the calls land in its obs
    with pytest.raises(KeyError, match=r"no layer 'raw'; its layers: \['counts'\]"):
        model.predict(in_layer, layer="raw")
    half = ad.AnnData(query.X.toarray().astype(np.float16), obs=query.obs, var=query.var)  # small counts: exact in float16
    pd.testing.assert_frame_equal(_predicted(model.predict(half)), expected)


@pytest.mark.parametrize("kind", ANNOTATORS)
def test_a_matrix_or_table_instead_of_anndata_names_the_wrapping_line(kind, cells):
    model = fitted(kind, cells)
    dense = cells[:5].X.toarray()
    with pytest.raises(TypeError, match=r"ad.AnnData\(X, var=pd.DataFrame\(index=gene_names\)\)"):
        model.predict(dense)
    with pytest.raises(TypeError, match=r"var=pd.DataFrame\(index=df.columns\)"):
        model.predict(pd.DataFrame(dense, columns=cells.var_names))
    with pytest.raises(TypeError, match="take AnnData"):
        model.embed(dense)
