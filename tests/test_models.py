"""Every model class on the one surface: fit on tiny real data, predict, embed, save, load, the same output again.

The data: 160 CellBench cells (CEL-seq2 and Drop-seq plates, raw counts, 5 lung cancer cell lines) on their
300 most-detected genes among those seen in 20-80% of the cells; each recipe trains for a couple of epochs at small widths, enough to exercise every verb.
"""
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


RECIPES = {"cellmtl.HierarchicalAnnotator": _phmap, "cellmtl.HRCAAnnotator": _hrca, "cellmtl.scgpt.TransformerAnnotator": _transformer}


def test_every_model_kind_has_a_recipe_here():
    assert set(RECIPES) == set(KINDS), "add a recipe for every model class to tests/test_models.py"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fit_predict_embed_save_load(kind, cells, tmp_path):
    model = RECIPES[kind](cells)
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
