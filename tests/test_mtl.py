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


# --- the input option, the sparse step, backed block shuffling ------------------------------------------------------

def test_default_input_is_log1p_and_binary_stays_available(cells, annotator, tmp_path):
    assert annotator.config.input == "log1p"
    binary = HierarchicalAnnotator(label_keys=LEVELS, input="binary").fit(cells, epochs=3, patience=None, seed=0)
    assert binary.config.input == "binary"
    binary.save(tmp_path / "binary")
    import cellmtl
    again = cellmtl.load(tmp_path / "binary")
    assert again.config.input == "binary"
    pd.testing.assert_frame_equal(again.predict(cells), binary.predict(cells))
    with pytest.raises(ValueError, match="input must be one of"):
        HierarchicalAnnotator(label_keys=LEVELS, input="counts")


def test_log1p_input_reads_log1p_of_counts_per_10k(cells):
    "A log1p model predicts the same from counts and from the same cells already log-normalised (used as is)."
    import scanpy as sc
    model = HierarchicalAnnotator(label_keys=LEVELS, input="log1p").fit(cells, epochs=3, patience=None, seed=0)
    normalised = cells.copy()
    normalised.X = normalised.X.astype(np.float32)
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    np.testing.assert_allclose(model.predict_proba(normalised)["anno_lv3"], model.predict_proba(cells)["anno_lv3"], atol=1e-5)
    binary = HierarchicalAnnotator(label_keys=LEVELS, input="binary").fit(cells, epochs=3, patience=None, seed=0)
    assert not np.allclose(binary.predict_proba(cells)["anno_lv3"], model.predict_proba(cells)["anno_lv3"], atol=1e-3)  # the input matters


def test_log1p_input_refuses_scaled_values(cells):
    scaled = cells.copy()
    scaled.X = scaled.X.astype(np.float32) * 0.37  # neither counts nor log1p values
    with pytest.raises(ValueError):
        HierarchicalAnnotator(label_keys=LEVELS, input="log1p").fit(scaled, epochs=1, patience=None)


@pytest.mark.parametrize("input", ["binary", "log1p"])
def test_sparse_and_dense_batches_train_the_same_weights(cells, input):
    "The sparse first layer (SparseLinear, the default path of fit) and the dense one give the same weights from the same seed."
    import torch
    from cellmtl.data import CSRBatchLoader
    from cellmtl.mtl import PHMapLoss, adam
    from cellmtl.train import fit
    codes = {level: cells.obs[level].cat.codes.to_numpy().astype(np.int64) for level in LEVELS}
    transform = {"binary": "binarize", "log1p": "log1p"}[input]
    weights = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = PHMapNet(cells.n_vars, tuple(int(c.max()) + 1 for c in codes.values()), (32, 16))
        loader = CSRBatchLoader(cells.X, labels=codes, batch_size=64, seed=0, transform=transform, sparse=sparse)
        fit(model, PHMapLoss(LEVELS, (1.0, 1.0, 1.0)), loader, epochs=2, optimizer=adam, monitor="train_loss", seed=0, progress=False, device="cpu")
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-5, rtol=1e-4)


def test_backed_fit_with_block_shuffling_equals_in_memory_with_the_same_blocks(cells, tmp_path):
    from cellmtl.data import read_backed
    cells.write_h5ad(tmp_path / "cells.h5ad")
    backed = read_backed(tmp_path / "cells.h5ad")
    on_disk = HierarchicalAnnotator(label_keys=LEVELS).fit(backed, epochs=2, patience=None, calibrate=False, seed=0)  # "auto": blocks of 16
    in_memory = HierarchicalAnnotator(label_keys=LEVELS).fit(cells, epochs=2, patience=None, calibrate=False, seed=0, block_size=16)
    np.testing.assert_allclose(on_disk.history_.df["val_loss"], in_memory.history_.df["val_loss"], rtol=1e-5)
    pd.testing.assert_frame_equal(on_disk.predict(backed), in_memory.predict(cells))
    uniform = HierarchicalAnnotator(label_keys=LEVELS).fit(cells, epochs=2, patience=None, calibrate=False, seed=0)
    assert not np.allclose(uniform.history_.df["val_loss"], in_memory.history_.df["val_loss"])  # the order differs, so the run does
    with pytest.raises(ValueError, match="buffer_blocks"):
        HierarchicalAnnotator(label_keys=LEVELS).fit(cells, epochs=1, block_size=16, buffer_blocks=0)
    backed.file.close()
