"""cellmtl.scgpt.annotator: TransformerAnnotator on real CellBench counts: pretrain → fit → predict → embed → save → load → identical output."""
import copy
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

import cellmtl
from cellmtl.scgpt.annotator import TransformerAnnotator, TransformerAnnotatorConfig

TINY = dict(label_key="cell_line", n_top_genes=120, d_model=16, n_heads=2, d_hid=32, n_layers=1)


@pytest.fixture(scope="module")
def cells(data_dir):
    from cellmtl.datasets import cellbench
    bench = cellbench(plates=["sc_celseq2", "sc_dropseq"], singlets_only=True, data_dir=data_dir)
    rng = np.random.default_rng(0)
    return bench[np.sort(rng.choice(bench.n_obs, 160, replace=False))].copy()  # real counts, two protocols


@pytest.fixture(scope="module")
def fitted(cells):
    annotator = TransformerAnnotator(**TINY, batch_key="protocol", do_dab=True, domain_spec_batchnorm=True,
                                     pretrain_objectives=("mlm", "mvc", "ecs", "dab"))
    annotator.pretrain(cells, epochs=1, batch_size=32)
    return annotator.fit(cells, epochs=2, batch_size=32, lr=3e-3)


def test_fit_predict_embed_save_load_gives_identical_outputs(fitted, cells, tmp_path):
    proba = fitted.predict_proba(cells)
    assert list(proba.columns) == sorted(cells.obs["cell_line"].unique()) and list(proba.index) == list(cells.obs_names)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    predictions = fitted.predict(cells)
    assert list(predictions.columns) == ["predicted_cell_line", "predicted_cell_line_prob"]
    assert isinstance(predictions["predicted_cell_line"].dtype, pd.CategoricalDtype)
    embedding = fitted.embed(cells, key_added="X_transformer")
    assert embedding.shape == (160, 16) and embedding.dtype == np.float32 and cells.obsm["X_transformer"] is embedding
    fitted.save(tmp_path / "model")
    assert stat.S_IMODE(os.stat(tmp_path / "model" / "model.pt").st_mode) == 0o666 & ~_umask()
    loaded = cellmtl.load(tmp_path / "model")
    assert isinstance(loaded, TransformerAnnotator) and loaded.config == fitted.config and loaded.genes_ == fitted.genes_
    np.testing.assert_array_equal(loaded.predict_proba(cells).to_numpy(), proba.to_numpy())
    np.testing.assert_array_equal(loaded.embed(cells), embedding)
    assert loaded.batch_categories_ == fitted.batch_categories_ and loaded.classes_ == fitted.classes_
    assert loaded.history_.df.equals(fitted.history_.df) and loaded.pretrain_history_.df.equals(fitted.pretrain_history_.df)
    annotated = loaded.annotate(cells.copy(), key_added="transformer")
    assert annotated.obs["transformer_cell_line"].astype(str).tolist() == predictions["predicted_cell_line"].astype(str).tolist()


def _umask():
    mask = os.umask(0o022); os.umask(mask)
    return mask


def test_query_genes_are_aligned_by_name(fitted, cells):
    "A query with its genes in another order, and some missing, is aligned (missing ones zero-filled, with a warning)."
    shuffled = cells[:, np.random.default_rng(1).permutation(cells.n_vars)].copy()
    np.testing.assert_allclose(fitted.predict_proba(shuffled).to_numpy(), fitted.predict_proba(cells).to_numpy(), atol=1e-6)
    partial = cells[:, [g for g in cells.var_names if g != fitted.genes_[0]]].copy()
    with pytest.warns(UserWarning, match="1 reference genes missing"):
        fitted.predict(partial)
    assert fitted.alignment_.n_missing == 1


def test_pretraining_is_optional_and_starts_from_the_same_weights(cells):
    a, b = TransformerAnnotator(**TINY), TransformerAnnotator(**TINY)
    a._prepare(cells); b._prepare(cells)
    for x, y in zip(a._new_model(3).state_dict().values(), b._new_model(3).state_dict().values()): assert torch.equal(x, y)
    scratch = TransformerAnnotator(**TINY).fit(cells, epochs=1, batch_size=32, val_fraction=None)
    assert scratch.pretrain_history_ is None and "val_loss" not in scratch.history_.df.columns
    assert scratch.predict(cells).shape == (160, 2)


def test_validation_anndata_and_seeds(cells):
    train, val = cells[:120].copy(), cells[120:].copy()
    one = TransformerAnnotator(**TINY).fit(train, epochs=1, batch_size=32, validation=val, seed=5)
    two = TransformerAnnotator(**TINY).fit(train, epochs=1, batch_size=32, validation=val, seed=5)
    assert "val_acc" in one.history_.df.columns
    np.testing.assert_array_equal(one.predict_proba(val).to_numpy(), two.predict_proba(val).to_numpy())  # same seed, same model


def test_clear_errors(cells, tmp_path):
    pretrained = TransformerAnnotator(**TINY).pretrain(cells, epochs=1, batch_size=64, val_fraction=None)
    with pytest.raises(RuntimeError, match="pre-trained but not fine-tuned"): pretrained.predict(cells)
    assert pretrained.embed(cells).shape == (160, 16)  # embedding works before fine-tuning
    with pytest.raises(ValueError, match="need parts this annotator was not built with"): pretrained.pretrain(cells, objectives=("mlm", "dab"))
    with pytest.raises(RuntimeError, match="not fitted"): TransformerAnnotator(**TINY).predict(cells)
    unlabelled = cells.copy(); del unlabelled.obs["cell_line"]
    with pytest.raises(KeyError, match="label_key 'cell_line' is not an obs column"): TransformerAnnotator(**TINY).fit(unlabelled)
    one_class = cells[cells.obs["cell_line"] == cells.obs["cell_line"].iloc[0]].copy()
    with pytest.raises(ValueError, match="single class"): TransformerAnnotator(**TINY).fit(one_class, epochs=1)
    with pytest.raises(ValueError, match="pass batch_key="): TransformerAnnotatorConfig(do_dab=True, pretrain_objectives=("mlm", "dab"))
    with pytest.raises(ValueError, match="divisible by nhead"): TransformerAnnotator(d_model=10, n_heads=4)
    pretrained.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="already holds"): pretrained.save(tmp_path / "m")
    assert cellmtl.load(tmp_path / "m").classes_ is None  # a pre-trained-only model saves and loads too
