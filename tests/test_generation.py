"""cellmtl.scgpt.generation on a real screen: pairing, splits, the predictor's surface, GEARS's metrics, the baselines, bad input.

The data: 60 cells of each of five Papalexi et al. conditions (control, two measured targets STAT1 and JAK2, two
unmeasured targets IFNGR1 and IRF1), raw counts over the 299 genes. Models train for an epoch at tiny widths: enough to
exercise every verb, not to learn. (The scGPT state-dict compatibility is in tests/test_generation_reference.py.)
"""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellmtl
from cellmtl.base import KINDS, model_class
from cellmtl.datasets import papalexi_crispr
from cellmtl.scgpt.generation import (PairLoader, PerturbationCells, PerturbationPredictor, TransformerGenerator, de_genes,
                                      linear_baseline, load_pretrained_weights, no_change_baseline, parse_condition,
                                      perturbation_cells, perturbation_metrics, prediction_similarity, split_cells,
                                      train_mean_baseline)
from cellmtl.scgpt.model import TransformerModel, save_pretrained
from cellmtl.scgpt.tokenize import GeneVocab

CONDITIONS = ["ctrl", "STAT1+ctrl", "JAK2+ctrl", "IFNGR1+ctrl", "IRF1+ctrl"]


@pytest.fixture(scope="module")
def screen():
    data = papalexi_crispr()
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(data.obs["condition"].astype(str) == c), 60, replace=False) for c in CONDITIONS])
    return data[np.sort(rows)].copy()


@pytest.fixture(scope="module")
def predictor(screen):
    model = PerturbationPredictor(d_model=16, nhead=2, d_hid=32, nlayers=1, max_seq_len=64)
    return model.fit(screen, epochs=1, batch_size=32, seed=0, targets=["SPI1"])


def test_the_kind_is_registered_and_loads_through_cellmtl_load(predictor, screen, tmp_path):
    assert KINDS[PerturbationPredictor.kind] == "cellmtl.scgpt.generation" and model_class(PerturbationPredictor.kind) is PerturbationPredictor
    predicted = predictor.predict(screen, ["STAT1+ctrl", "IFNGR1+ctrl", "ctrl"])
    assert predicted.shape == (3, 299) and list(predicted.columns) == list(screen.var_names) and np.isfinite(predicted.to_numpy()).all()
    folder = predictor.save(tmp_path / "generator")
    again = cellmtl.load(folder)
    assert type(again) is PerturbationPredictor and again.genes_ == predictor.genes_ and again.vocab_.itos == predictor.vocab_.itos
    pd.testing.assert_frame_equal(again.predict(screen, ["STAT1+ctrl", "IFNGR1+ctrl", "ctrl"]), predicted)
    with pytest.raises(FileExistsError, match="already holds"): predictor.save(folder)
    assert "SPI1" in again.vocab_ and again.targets_ == ["IFNGR1", "IRF1", "JAK2", "STAT1"] and again.input_ == "counts"


def test_the_flag_changes_the_prediction_and_the_same_seed_gives_the_same_model(predictor, screen):
    predicted = predictor.predict(screen, ["STAT1+ctrl", "ctrl"])
    assert not np.allclose(predicted.loc["STAT1+ctrl"], predicted.loc["ctrl"])
    twin = PerturbationPredictor(d_model=16, nhead=2, d_hid=32, nlayers=1, max_seq_len=64).fit(screen, epochs=1, batch_size=32, seed=0, targets=["SPI1"])
    pd.testing.assert_frame_equal(twin.predict(screen, ["STAT1+ctrl"]), predictor.predict(screen, ["STAT1+ctrl"]))


def test_log_values_and_counts_give_the_same_cells(screen):
    from_counts = perturbation_cells(screen)
    logged = screen.copy()
    logged.X = from_counts.X.copy()
    from_log = perturbation_cells(logged)
    np.testing.assert_allclose(from_log.X.toarray(), from_counts.X.toarray(), rtol=1e-6)
    with pytest.raises(ValueError, match="input='log1p'"):
        perturbation_cells(screen, input="log1p")


def test_pairs_draw_controls_of_the_same_replicate_and_keep_the_perturbed_gene(screen):
    cells = perturbation_cells(screen)
    vocab = GeneVocab.from_genes(cells.genes + ["IFNGR1", "IRF1"])
    perturbed = np.flatnonzero(~cells.is_control)
    controls = np.flatnonzero(cells.is_control)
    loader = PairLoader(cells, perturbed, vocab, batch_size=len(perturbed), shuffle=False, seed=3, control_rows=controls)
    drawn = []
    original = loader.batch
    loader.batch = lambda inputs, *a, **k: drawn.append(inputs) or original(inputs, *a, **k)
    batch = next(iter(loader))
    assert (cells.replicates[drawn[0]] == cells.replicates[perturbed]).all() and cells.is_control[drawn[0]].all()
    np.testing.assert_allclose(batch["target"][:, :299].numpy(), cells.X[perturbed].toarray())
    stat1 = cells.genes.index("STAT1")
    is_stat1 = cells.conditions[perturbed] == "STAT1+ctrl"
    assert (batch["pert_flags"][is_stat1, stat1] == 1).all() and (batch["pert_flags"][~is_stat1, stat1] == 0).all()
    unmeasured = np.isin(cells.conditions[perturbed], ["IFNGR1+ctrl", "IRF1+ctrl"])
    assert (batch["pert_flags"][unmeasured, 299] == 1).all() and (batch["src_key_padding_mask"][~unmeasured, 299]).all()
    assert not batch["scored"][:, 299].any()
    for seed in range(5):  # a cap on gene tokens never drops the perturbed gene (scGPT issue #298)
        capped = PairLoader(cells, perturbed, vocab, 16, True, seed, control_rows=controls, max_seq_len=20)
        for b in capped:
            assert b["gene_ids"].shape[1] <= 21
            flagged = b["gene_ids"][b["pert_flags"] == 1]
            assert len(flagged) == (b["pert_flags"] == 1).any(1).sum()
    one_replicate = perturbation_cells(screen[~((screen.obs["replicate"] == "rep_1") & (screen.obs["condition"] == "ctrl"))].copy())
    with pytest.raises(ValueError, match=r"replicate\(s\) \['rep_1'\] have no control cells"):
        PairLoader(one_replicate, np.arange(len(one_replicate)), vocab)


def test_splits_hold_out_whole_perturbations_or_cells_of_each(screen):
    cells = perturbation_cells(screen)
    train, test = split_cells(cells, "unseen", test_fraction=0.5, seed=1)
    held_out = set(cells.conditions[test]) - {"ctrl"}
    assert held_out and not held_out & set(cells.conditions[train])
    assert cells.is_control[train].any() and cells.is_control[test].any()
    train, test = split_cells(cells, "seen", seed=1)
    assert set(cells.conditions[train]) == set(cells.conditions[test]) == set(CONDITIONS)
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(cells)


def _toy_cells():
    "Three conditions × 4 cells over 4 genes; STAT1 knock-down halves gene g0, JAK2 doubles g1."
    base = np.array([2.0, 1.0, 1.0, 0.5])
    rows, conditions = [], []
    for condition, change in [("ctrl", [1, 1, 1, 1]), ("STAT1+ctrl", [0.5, 1, 1, 1]), ("JAK2+ctrl", [1, 2, 1, 1])]:
        for i in range(4):
            rows.append(base * change + 0.01 * i); conditions.append(condition)
    return PerturbationCells(sp.csr_matrix(np.array(rows)), ["g0", "g1", "g2", "STAT1"], np.array(conditions), np.full(12, "r"))


def test_gears_metrics_on_known_profiles():
    cells = _toy_cells()
    measured, de = cells.means(), de_genes(cells, n_top=2)
    assert de["STAT1+ctrl"][0] == 0 and de["JAK2+ctrl"][0] == 1  # the changed gene ranks first
    control = measured.loc["ctrl"]
    perfect = perturbation_metrics(measured.loc[["STAT1+ctrl", "JAK2+ctrl"]], measured, control, de)
    assert np.allclose(perfect[["pearson", "pearson_delta", "direction_de"]], 1) and np.allclose(perfect[["mse", "mse_de"]], 0)
    unchanged = perturbation_metrics(no_change_baseline(cells, ["STAT1+ctrl"]), measured, control, de)
    assert unchanged.loc["STAT1+ctrl", "pearson_delta"] == 0  # a constant change: GEARS scores r = 0
    assert unchanged.loc["STAT1+ctrl", "direction_de"] == 0.5  # g0's fall is missed; the 2nd DE gene did not move, and "no change" has its sign (0)
    same = train_mean_baseline(cells, ["STAT1+ctrl", "JAK2+ctrl"])
    assert prediction_similarity(same, control) == pytest.approx(1.0)  # one change for every condition: total collapse
    assert prediction_similarity(measured.loc[["STAT1+ctrl", "JAK2+ctrl"]], control) < 0.5
    with pytest.raises(KeyError, match="no measured profile"):
        perturbation_metrics(no_change_baseline(cells, ["MYC+ctrl"]), measured, control, de)


def test_linear_baseline_uses_the_target_gene_embedding_and_falls_back_to_the_train_mean():
    cells = _toy_cells()
    predicted = linear_baseline(cells, ["STAT1+ctrl", "JAK2+ctrl", "ctrl"], n_components=2)
    train_mean = train_mean_baseline(cells, ["JAK2+ctrl"])
    np.testing.assert_allclose(predicted.loc["JAK2+ctrl"], train_mean.loc["JAK2+ctrl"])  # JAK2 is not a measured gene here
    assert predicted.attrs["fallback"] == ["JAK2+ctrl"]
    np.testing.assert_allclose(predicted.loc["ctrl"], cells.means().loc["ctrl"])
    assert not np.allclose(predicted.loc["STAT1+ctrl"], train_mean.loc["JAK2+ctrl"])  # STAT1 is: its PCA row moves the prediction


def test_pretrained_transformer_weights_load_into_the_generator(tmp_path):
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(30)])
    torch.manual_seed(0)
    pretrained = TransformerModel(len(vocab), 16, 2, 32, 2, vocab=vocab, dropout=0.0)
    folder = save_pretrained(pretrained, tmp_path / "whole_human", vocab)
    generator = TransformerGenerator(len(vocab), 16, 2, 32, 2, 3, 1, vocab=vocab, dropout=0.0)
    report = load_pretrained_weights(generator, folder)
    for key in report["loaded"]: torch.testing.assert_close(generator.state_dict()[key], pretrained.state_dict()[key])
    assert "pert_encoder.weight" in report["initialised"] and not any(k.startswith("pert_encoder") for k in report["loaded"])
    small = TransformerGenerator(len(vocab) - 5, 16, 2, 32, 2, 3, 1, dropout=0.0)
    with pytest.raises(ValueError, match="vocab.json"):
        load_pretrained_weights(small, folder)


def test_bad_input_is_refused_with_the_fix(predictor, screen):
    with pytest.raises(KeyError, match=r"\['MYC'\] are not in the model's vocabulary"):
        predictor.predict(screen, ["MYC+ctrl"])
    with pytest.raises(ValueError, match="GEARS writes a single perturbation as 'STAT1\\+ctrl'"):
        predictor.predict(screen, ["STAT1"])
    no_controls = screen[screen.obs["condition"] != "ctrl"].copy()
    with pytest.raises(ValueError, match="no control cells"):
        PerturbationPredictor().fit(no_controls, epochs=1)
    unassigned = screen.copy()
    unassigned.obs["condition"] = unassigned.obs["condition"].astype(object)
    unassigned.obs.iloc[0, unassigned.obs.columns.get_loc("condition")] = np.nan
    with pytest.raises(ValueError, match="drop them first"):
        PerturbationPredictor().fit(unassigned, epochs=1)
    with pytest.raises(KeyError, match="no 'replicate' column"):
        PerturbationPredictor().fit(ad.AnnData(screen.X, obs=screen.obs[["condition"]], var=screen.var), epochs=1)
    with pytest.raises(NotImplementedError, match="predict\\(adata, conditions\\)"):
        predictor.annotate(screen)
    with pytest.raises(ValueError, match="include_zero_gene must be 'all'"):
        predictor.model_.pred_perturb({"values": torch.zeros(1, 299), "pert_flags": torch.zeros(1, 299)}, "some", np.arange(299) + 3)
    with pytest.raises(ValueError, match="perturbs nothing"):
        parse_condition("ctrl+ctrl")


def test_low_gene_overlap_is_refused_then_reported(predictor, screen):
    few = screen[:, :100].copy()
    with pytest.raises(ValueError, match="below min_overlap=0.5"):
        predictor.predict(few, ["STAT1+ctrl"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predicted = predictor.predict(few, ["STAT1+ctrl"], min_overlap=0.3)
    assert [w.filename for w in caught if "differ from" in str(w.message)] == [__file__]
    assert predicted.shape == (1, 299) and predicted.attrs["gene_alignment"].n_found == 100


def test_the_no_target_score_sees_through_a_model_that_only_lowers_the_flagged_gene():
    genes = ["STAT1", "a", "b", "c", "d"]
    control = pd.Series([3.0, 1.0, 1.0, 1.0, 1.0], index=genes)
    measured = pd.DataFrame([[0.5, 1.5, 0.5, 1.2, 0.9]], index=["STAT1+ctrl"], columns=genes)  # the target falls, the rest moves
    only_target = pd.DataFrame([[0.5, 1.0, 1.0, 1.0, 1.0]], index=["STAT1+ctrl"], columns=genes)
    scores = perturbation_metrics(only_target, measured, control, {"STAT1+ctrl": np.arange(5)}).loc["STAT1+ctrl"]
    assert scores["pearson_delta"] > 0.8 and scores["pearson_delta_no_target"] == 0
