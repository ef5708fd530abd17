"""Bad input gets a clear error that names the problem and what to do, never a silent guess."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import anndata as ad
import torch

from cellmtl.data import CSRBatchLoader, LabelHierarchy, align_genes, check_counts, check_not_scaled, row_indices, stratified_split
from cellmtl.train import CheckpointError, fit, load_checkpoint, save_checkpoint


def _adata(X, genes, obs=None):
    X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    obs = obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])])
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))


def test_no_overlapping_genes():
    with pytest.raises(ValueError, match="none of the 2 reference genes occur"):
        align_genes(_adata([[1, 0]], ["A", "B"]), ["X", "Y"])


def test_duplicate_gene_names_in_query():
    a = _adata([[1, 0, 2]], ["A", "B", "A"])
    with pytest.raises(ValueError, match="var_names_make_unique"):
        align_genes(a, ["A", "B"])


def test_partial_overlap_is_reported_and_zero_filled():
    aligned, report = align_genes(_adata([[1, 2, 3]], ["A", "B", "C"]), ["C", "A", "Z"])
    assert list(aligned.var_names) == ["C", "A", "Z"]
    np.testing.assert_array_equal(aligned.X.toarray(), [[3, 1, 0]])
    assert (report.n_found, report.n_missing, report.n_extra) == (2, 1, 1) and report.missing == ["Z"]


def test_missing_label_column_lists_the_columns():
    a = _adata([[1]], ["A"], obs=pd.DataFrame({"cell_type": ["T"]}, index=["c0"]))
    with pytest.raises(KeyError, match="available columns: \\['cell_type'\\]"):
        LabelHierarchy(a, ["anno_lv1"])


def test_nan_labels_name_the_policy():
    obs = pd.DataFrame({"lv1": ["L", "L", "M"], "lv2": ["T", np.nan, "Mono"]}, index=list("abc"))
    with pytest.raises(ValueError, match="unlabeled='drop'"):
        LabelHierarchy(obs, ["lv1", "lv2"])
    h = LabelHierarchy(obs, ["lv1", "lv2"], unlabeled="drop")
    assert h.encode(obs)["lv2"].tolist()[1] == -1


def test_fine_label_with_two_parents_is_named():
    obs = pd.DataFrame({"lv1": ["lymphoid", "myeloid", "lymphoid"], "lv2": ["NK", "NK", "T"]}, index=list("abc"))
    with pytest.raises(ValueError) as e:
        LabelHierarchy(obs, ["lv1", "lv2"])
    assert "'NK'" in str(e.value) and "lymphoid" in str(e.value) and "myeloid" in str(e.value)


def test_single_cell_class_does_not_crash_the_split():
    labels = np.array(["a"] * 10 + ["b"] * 10 + ["rare"])
    with pytest.warns(UserWarning, match="rare"):
        train, val = stratified_split(labels, val_fraction=0.2, seed=0)
    assert 20 in train and len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 21


@pytest.mark.parametrize("X, what", [([[1.0, -2.0]], "negative"), ([[0.5, 1.0]], "non-integer")])
def test_counts_required(X, what):
    with pytest.raises(ValueError, match=what):
        check_counts(sp.csr_matrix(np.array(X)))


def test_scaled_values_are_refused_where_counts_or_log_values_are_needed():
    with pytest.raises(ValueError, match="looks scaled \\(z-scored\\); PH-Map binarises"):
        check_not_scaled(sp.csr_matrix(np.array([[1.0, -0.3]])), "adata.X", needs="PH-Map binarises X > 0")
    assert check_not_scaled(sp.csr_matrix(np.array([[0.5, 1.2]])))["n_noninteger"] == 2  # log-normalised passes


def test_one_rule_for_row_selections_everywhere():
    X = sp.csr_matrix(np.ones((5, 2), np.float32))
    short_mask = np.array([True, False, True, False])  # 4 entries for 5 rows: which cells would it mean?
    for select in (lambda: row_indices(short_mask, 5, "train_indices"), lambda: CSRBatchLoader(X, indices=short_mask)):
        with pytest.raises(ValueError, match="boolean mask of 4 entries for 5 rows"): select()
    np.testing.assert_array_equal(CSRBatchLoader(X, indices=np.r_[short_mask, True], shuffle=False).epoch_indices(), [0, 2, 4])
    with pytest.raises(IndexError, match="must lie in \\[0, 5\\)"): row_indices([0, 5], 5)
    with pytest.raises(IndexError, match="negative"): CSRBatchLoader(X, indices=[-1])


def test_empty_anndata():
    with pytest.raises(ValueError, match="empty"):
        CSRBatchLoader(ad.AnnData(sp.csr_matrix((0, 5), dtype=np.float32)))


def test_truncated_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "last.pt", model=model.state_dict(), epoch=1)
    data = path.read_bytes(); path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "other.pt")


def test_monitor_without_validation_loader():
    model = torch.nn.Linear(2, 1)
    loader = [{"x": torch.zeros(4, 2), "y": torch.zeros(4, 1)}]
    loss_fn = lambda m, b: {"loss": torch.nn.functional.mse_loss(m(b["x"]), b["y"])}
    with pytest.raises(ValueError, match="val"):
        fit(model, loss_fn, loader, None, epochs=2, patience=1, progress=False)
