"""PH-Map (`cellmtl.mtl`): bad input gets a clear error; save/load, gene alignment and seeding behave.

Uses a small seeded simulated dataset (`simulate_hierarchy`, counts) so that every test runs in seconds.
"""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import anndata as ad

from cellmtl.datasets import simulate_hierarchy
from cellmtl.mtl import HierarchicalAnnotator, PHMapNet, consistency_rate, score_predictions
from cellmtl.train import CheckpointError, save_checkpoint

LEVELS = ["anno_lv1", "anno_lv2", "anno_lv3"]


@pytest.fixture(scope="module")
def cells():
    "600 simulated cells x 300 genes, three levels (3, 6, 9 classes); SIMULATED counts."
    return simulate_hierarchy(600, 300, n_classes=(3, 6, 9), density=0.2, effect_size=2.0, seed=3)


@pytest.fixture(scope="module")
def annotator(cells):
    return HierarchicalAnnotator(label_keys=LEVELS).fit(cells, epochs=15, patience=5, seed=0)


def test_seed_parameter_count():
    net = PHMapNet(2000, (6, 19, 30, 55))
    assert sum(p.numel() for p in net.parameters()) == 431_410


def test_learns_and_is_consistent_with_joint_decoding(annotator, cells):
    val = cells[annotator.val_indices_]
    scores = score_predictions(annotator.predict(val), val.obs, LEVELS)
    assert scores.loc["anno_lv1", "accuracy"] > 0.8, scores
    assert consistency_rate(annotator.predict(val, decoding="joint"), annotator.hierarchy_) == 1.0


def test_same_seed_same_predictions(cells, annotator):
    again = HierarchicalAnnotator(label_keys=LEVELS).fit(cells, epochs=15, patience=5, seed=0)
    pd.testing.assert_frame_equal(again.predict(cells), annotator.predict(cells))


def test_query_with_no_shared_genes(annotator, cells):
    query = cells[:10].copy()
    query.var_names = [f"other_{i}" for i in range(query.n_vars)]
    with pytest.raises(ValueError, match="none of the 300 reference genes"):
        annotator.predict(query)


def test_query_with_duplicated_gene_names(annotator, cells):
    query = cells[:10].copy()
    query.var_names = [cells.var_names[0]] * 2 + list(cells.var_names[2:])
    with pytest.raises(ValueError, match="var_names_make_unique"):
        annotator.predict(query)


def test_partial_gene_overlap_is_reported(annotator, cells):
    query = cells[:20, 50:].copy()  # the first 50 training genes are missing
    with pytest.warns(UserWarning, match="50 reference genes missing"):
        predictions = annotator.predict(query)
    assert annotator.alignment_.n_missing == 50 and len(predictions) == 20


def test_nan_labels(cells):
    bad = cells[:100].copy()
    bad.obs["anno_lv2"] = bad.obs["anno_lv2"].astype(object)
    bad.obs.iloc[0, bad.obs.columns.get_loc("anno_lv2")] = np.nan
    with pytest.raises(ValueError, match="have no 'anno_lv2' label"):
        HierarchicalAnnotator(label_keys=LEVELS).fit(bad)


def test_fine_label_with_two_parents(cells):
    bad = cells[:100].copy()
    bad.obs["anno_lv3"] = "one name for everything"
    with pytest.raises(ValueError, match="must have exactly one parent"):
        HierarchicalAnnotator(label_keys=LEVELS).fit(bad)


def test_level_with_a_single_class(cells):
    bad = cells[:100].copy()
    bad.obs["root"] = "cell"
    with pytest.raises(ValueError, match="single class"):
        HierarchicalAnnotator(label_keys=["root", *LEVELS]).fit(bad)


def test_empty_anndata(annotator, cells):
    with pytest.raises(ValueError, match="is empty"):
        HierarchicalAnnotator(label_keys=LEVELS).fit(cells[:0])
    with pytest.raises(ValueError, match="is empty"):
        annotator.predict(cells[:0])


def test_scaled_input_is_refused(cells):
    bad = ad.AnnData(cells.X[:50].toarray() - 1.0, obs=cells.obs.iloc[:50].copy(), var=cells.var.copy())
    with pytest.raises(ValueError, match="looks scaled"):
        HierarchicalAnnotator(label_keys=LEVELS).fit(bad)


def test_save_load_round_trip(annotator, cells, tmp_path):
    annotator.save(tmp_path / "model")
    loaded = HierarchicalAnnotator.load(tmp_path / "model")
    pd.testing.assert_frame_equal(loaded.predict(cells), annotator.predict(cells))
    assert loaded.genes_ == annotator.genes_ and loaded.hierarchy_.classes == annotator.hierarchy_.classes


def test_loading_a_directory_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(CheckpointError, match="has no model.pt"):
        HierarchicalAnnotator.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        HierarchicalAnnotator.load(tmp_path / "missing")
    save_checkpoint(tmp_path / "model.pt", epoch=0, model={})
    with pytest.raises(CheckpointError, match="training checkpoint, not a saved model"):
        HierarchicalAnnotator.load(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HierarchicalAnnotator.load(tmp_path)


def test_mismatched_weights_are_named(annotator, tmp_path):
    annotator.save(tmp_path / "model")
    import torch
    state = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    state["model"]["heads.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "model" / "model.pt")  # a hand-edited file (the test's own doing)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        HierarchicalAnnotator.load(tmp_path / "model")


def test_low_gene_overlap_is_refused_unless_allowed(annotator, cells):
    query = cells[:20, 280:].copy()  # 20 of the 300 training genes
    with pytest.raises(ValueError, match=r"20 of the 300 reference \(training\) genes \(6.7%\), below min_overlap=0.5"):
        annotator.predict(query)
    with pytest.warns(UserWarning, match="280 reference genes missing"):
        predictions = annotator.predict(query, min_overlap=0.05)
    assert len(predictions) == 20 and predictions.attrs["gene_alignment"].n_missing == 280


def test_a_matrix_without_zeros_is_refused(cells):
    shifted = ad.AnnData(cells.X[:60].toarray() + 1.0, obs=cells.obs.iloc[:60].copy(), var=cells.var.copy())
    with pytest.raises(ValueError, match="every gene would read as 'detected'"):
        HierarchicalAnnotator(label_keys=LEVELS).fit(shifted)
