"""cellmtl.scgpt.multiomic and the multi-omic CellTokenizer on real cells: per-modality tokens, MultiOmicTransformer's verbs, bad input, the evaluation helpers.

The data: the 400 10x PBMC CITE-seq cells of `citeseq_pbmc()` (RNA + 14 antibodies, two runs) and 300 cells of the
10x Multiome subset `multiome_pbmc()` (45 genes + 174 ATAC peaks). Models are 8-16 wide with one layer; one of them
trains long enough (30 epochs, a few seconds) to show that it learns protein from RNA. (Strict state-dict loading
against scGPT's own MultiOmicTransformerModel is tests/test_multiomic_reference.py; the modality convention of
cellmtl.data is tests/test_multiomic_datasets.py.)
"""
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellmtl
from cellmtl.data import stack_modalities
from cellmtl.datasets import citeseq_pbmc, multiome_pbmc
from cellmtl.scgpt.multiomic import (PBMC_GATES, MultiOmicTransformer, clr, find_marker, gate_cell_types, imputation_scores,
                                     regression_imputation, rna_pca, two_means_threshold)
from cellmtl.scgpt.tokenize import CellTokenizer, GeneVocab, TokenLoader

TINY = dict(n_top_genes=120, d_model=8, n_heads=2, d_hid=16, n_layers=1, dropout=0.0)
PROTEIN = 4  # id of "Protein" in the default modality vocabulary <pad>, <cls>, <eoc>, RNA, Protein


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Others share the cores: one thread for this file. numba too: scanpy's highly_variable_genes runs numba's OpenMP
    kernels, which set OpenMP's thread count (torch's too) back to NUMBA_NUM_THREADS, the number of cores."""
    numba = pytest.importorskip("numba")  # scanpy's dependency
    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1); numba.set_num_threads(1)
    yield
    numba.set_num_threads(numba_threads); torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pbmc(data_dir): return citeseq_pbmc(data_dir)


@pytest.fixture(scope="module")
def protein_names(pbmc): return [str(n) for n in pbmc.uns["protein_names"]]


@pytest.fixture(scope="module")
def stacked(pbmc):
    "All 400 cells × (the 150 most often detected genes + 14 proteins), as stack_modalities builds it: the tokenizer's input."
    detected = np.asarray((pbmc.X > 0).sum(0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:150])
    return stack_modalities(pbmc[:, genes].copy())


@pytest.fixture(scope="module")
def split(pbmc):
    "300 training cells and 100 held-out cells."
    order = np.random.default_rng(0).permutation(pbmc.n_obs)
    return pbmc[np.sort(order[:300])].copy(), pbmc[np.sort(order[300:])].copy()


def _rna_only(adata):
    "The cells as a user with RNA alone has them: X, obs and var, no protein obsm or names."
    return ad.AnnData(adata.X.copy(), obs=adata.obs.copy(), var=adata.var.copy())


@pytest.fixture(scope="module")
def tiny(split):
    return MultiOmicTransformer(**TINY).fit(split[0], epochs=2, batch_size=32, seed=0)


def _tokenizer(stacked, **options):
    "A CellTokenizer over the stacked features: one token per feature, 11 bins, no random masks unless asked."
    defaults = dict(max_len=stacked.n_vars + 1, n_bins=11, mask_ratio=0.0, modalities=list(stacked.var["modality"]))
    return CellTokenizer(GeneVocab.from_genes(stacked.var_names), stacked.var_names, **(defaults | options))


def _cell_tokens(batch, vocab, row) -> dict:
    "{feature name: target value} of one cell's tokens (no <cls>, no pads)."
    keep = ~batch["src_key_padding_mask"][row]
    keep[0] = False
    return {vocab.itos[g]: float(v) for g, v in zip(batch["gene_ids"][row][keep].tolist(), batch["target_values"][row][keep].tolist())}


def _with_other_rna(stacked, seed=0):
    "The same cells, every RNA count multiplied by a random factor 1..50 (the proteins untouched)."
    X = stacked.X.toarray()
    is_rna = (stacked.var["modality"] == "RNA").to_numpy()
    X[:, is_rna] *= np.random.default_rng(seed).integers(1, 51, size=(X.shape[0], is_rna.sum()))
    return sp.csr_matrix(X)


# the tokenizer with modalities

def test_protein_bins_are_ranks_among_the_cells_proteins_whatever_its_genes(stacked):
    tokenizer = _tokenizer(stacked, include_zero_genes=["Protein"])
    vocab, proteins = tokenizer.vocab, [n for n in stacked.var_names if n.startswith("Protein:")]
    before, after = tokenizer(stacked.X[:40]), tokenizer(_with_other_rna(stacked)[:40])
    rna_changed = unique_ends = 0
    for row in range(40):
        old, new = _cell_tokens(before, vocab, row), _cell_tokens(after, vocab, row)
        assert {p: old[p] for p in proteins} == {p: new[p] for p in proteins}, row  # the protein bins ignore the RNA
        rna_changed += any(old[g] != new[g] for g in old if not g.startswith("Protein:"))
        counts = stacked[row, proteins].X.toarray().ravel()
        bins = np.array([old[p] for p in proteins])
        assert (bins[counts == 0] == 0).all() and (bins[counts > 0] >= 1).all()
        top, weakest = counts == counts.max(), counts == counts[counts > 0].min()
        if top.sum() == 1: assert bins[top] == 10; unique_ends += 1  # the cell's top protein: the top bin
        if weakest.sum() == 1: assert bins[weakest] == 1; unique_ends += 1  # its weakest measured protein: bin 1, however high in counts
    assert rna_changed == 40 and unique_ends > 40  # the RNA bins did move; ties at the ends left aside (their bins are drawn)
    pooled = _tokenizer(stacked, modalities=None, include_zero_genes=False)  # one modality: proteins ranked among the genes
    pooled_before, pooled_after = pooled(stacked.X[:40]), pooled(_with_other_rna(stacked)[:40])
    assert any(_cell_tokens(pooled_before, vocab, r).get(p) != _cell_tokens(pooled_after, vocab, r).get(p) for r in range(40) for p in proteins)


def test_zero_tokens_for_the_named_modality_only(stacked):
    vocab = GeneVocab.from_genes(stacked.var_names)
    X = stacked.X[:60].toarray()
    is_protein = (stacked.var["modality"] == "Protein").to_numpy()
    assert (X[:, is_protein] == 0).any()  # some measured proteins are zero: the test below means something
    batch = _tokenizer(stacked, include_zero_genes=["Protein"])(stacked.X[:60])
    for row in range(60):
        expected = set(stacked.var_names[(X[row] > 0) | is_protein])  # expressed genes, and every protein
        tokens = _cell_tokens(batch, vocab, row)
        assert set(tokens) == expected, row
        assert all(tokens[p] == 0 for p in stacked.var_names[is_protein & (X[row] == 0)])
    without = _tokenizer(stacked)(stacked.X[:60])
    assert all(set(_cell_tokens(without, vocab, r)) == set(stacked.var_names[X[r] > 0]) for r in range(60))
    everything = _tokenizer(stacked, include_zero_genes=True)(stacked.X[:60])
    assert everything["gene_ids"].shape == (60, stacked.n_vars + 1) and not everything["src_key_padding_mask"].any()


def test_mask_modality_with_ratio_one_hides_exactly_the_proteins(stacked):
    tokenizer = _tokenizer(stacked, include_zero_genes=["Protein"], mask_ratio=0.4, mask_modality="Protein", modality_mask_ratio=1.0)
    batch = tokenizer(stacked.X[:50], cell_ids=np.arange(50))
    is_protein = batch["mod_types"] == PROTEIN
    hidden = batch["values"] == tokenizer.mask_value
    assert torch.equal(hidden, is_protein) and int(is_protein.sum()) == 50 * 14  # every protein value, zero or not, and nothing else
    assert torch.equal(batch["values"][~hidden], batch["target_values"][~hidden])
    random_masks = _tokenizer(stacked, include_zero_genes=["Protein"], mask_ratio=0.4)(stacked.X[:50])
    assert ((random_masks["values"] == -1) & (random_masks["mod_types"] == 3)).any()  # without it, genes are masked too


def _hidden_cells(batch) -> dict:
    "{cell id: whether the cell shows no protein value and every RNA value}."
    masked, is_protein, is_rna = batch["values"] == -1, batch["mod_types"] == PROTEIN, batch["mod_types"] == 3
    hidden = (masked | ~is_protein).all(1) & ~(masked & is_rna).any(1)  # (B,)
    return dict(zip(batch["index"].tolist(), hidden.tolist()))


def test_the_share_of_cells_with_hidden_protein_is_the_ratio_and_a_function_of_seed_epoch_and_cell(stacked):
    tokenizer = _tokenizer(stacked, include_zero_genes=["Protein"], mask_ratio=0.25, mask_modality="Protein", modality_mask_ratio=0.3)
    def decisions(batch_size, shuffle, epoch=0, tok=tokenizer):
        loader = TokenLoader(stacked, tok, batch_size=batch_size, shuffle=shuffle, seed=7)
        loader.set_epoch(epoch)
        return {cell: hidden for batch in loader for cell, hidden in _hidden_cells(batch).items()}
    in_order = decisions(400, False)
    assert sorted(in_order) == list(range(400))
    assert 0.22 < np.mean(list(in_order.values())) < 0.38  # 30 % of 400 cells (binomial sd 2.3 %)
    assert decisions(37, True) == in_order  # other batches, other neighbours, another order: the same cells hidden
    twin = _tokenizer(stacked, include_zero_genes=["Protein"], mask_ratio=0.25, mask_modality="Protein", modality_mask_ratio=0.3)
    assert decisions(64, True, tok=twin) == in_order
    next_epoch = decisions(400, False, epoch=1)
    assert 0.22 < np.mean(list(next_epoch.values())) < 0.38 and sum(next_epoch[c] != in_order[c] for c in in_order) > 50
    other_seed = _tokenizer(stacked, include_zero_genes=["Protein"], mask_ratio=0.25, mask_modality="Protein", modality_mask_ratio=0.3, seed=1)
    reseeded = decisions(400, False, tok=other_seed)
    assert sum(reseeded[c] != in_order[c] for c in in_order) > 50
    batch = tokenizer(stacked.X[[9, 5]], cell_ids=[9, 5])  # a direct call with the cells' ids decides as the loader did
    assert _hidden_cells(batch | {"index": torch.tensor([9, 5])}) == {9: in_order[9], 5: in_order[5]}


def test_continuous_values_are_scaled_within_each_modality(stacked):
    tokenizer = _tokenizer(stacked, n_bins=None, target_sum=1e4, include_zero_genes=["Protein"])
    batch, changed = tokenizer(stacked.X[:30]), tokenizer(_with_other_rna(stacked)[:30])
    is_protein = (stacked.var["modality"] == "Protein").to_numpy()
    for row in range(30):
        tokens, other = _cell_tokens(batch, tokenizer.vocab, row), _cell_tokens(changed, tokenizer.vocab, row)
        counts = stacked.X[row].toarray().ravel()
        protein = counts[is_protein]
        for name, count in zip(stacked.var_names[is_protein], protein):
            assert tokens[name] == pytest.approx(np.log1p(count / protein.sum() * 1e4), rel=1e-5, abs=1e-6)
            assert other[name] == tokens[name]  # the gene counts do not enter the protein's scale
        rna_total = np.expm1([v for g, v in tokens.items() if not g.startswith("Protein:")]).sum()
        assert rna_total == pytest.approx(1e4, rel=1e-4)  # the genes, to their own library size
    pooled = _tokenizer(stacked, modalities=None, n_bins=None, target_sum=1e4)(stacked.X[:1])
    assert np.expm1(list(_cell_tokens(pooled, tokenizer.vocab, 0).values())).sum() == pytest.approx(1e4, rel=1e-4)  # one modality: one total


def test_mod_types_use_the_modality_vocabulary_at_cls_pads_and_features(stacked):
    mod_vocab = GeneVocab.from_dict({"RNA": 0, "Protein": 1, "<cls>": 2, "ATAC": 3, "<pad>": 4, "<eoc>": 5})  # specials not at 0, 1
    tokenizer = _tokenizer(stacked, mod_vocab=mod_vocab)
    batch = tokenizer(stacked.X[:20])
    mod_types, padding = batch["mod_types"], batch["src_key_padding_mask"]
    assert padding[:, 1:].any()  # cells of different lengths: there are pads
    assert (mod_types[:, 0] == 2).all() and (mod_types[padding] == 4).all()
    modality_of = dict(zip(stacked.var_names, stacked.var["modality"].astype(str)))
    for row in range(20):
        tokens = batch["gene_ids"][row][~padding[row]][1:].tolist()
        assert mod_types[row][~padding[row]][1:].tolist() == [mod_vocab[modality_of[tokenizer.vocab.itos[t]]] for t in tokens]
    assert set(mod_types.unique().tolist()) == {0, 1, 2, 4}
    default = _tokenizer(stacked)
    assert default.mod_vocab.itos == ["<pad>", "<cls>", "<eoc>", "RNA", "Protein"]


def test_without_modalities_there_are_no_mod_types_and_the_loader_passes_them_through(stacked):
    plain = _tokenizer(stacked, modalities=None)(stacked.X[:8])
    assert list(plain) == ["gene_ids", "values", "target_values", "src_key_padding_mask"]
    tokenizer = _tokenizer(stacked, include_zero_genes=["Protein"])
    batch = next(iter(TokenLoader(stacked, tokenizer, batch_size=16, shuffle=True, seed=3)))
    assert batch["mod_types"].shape == batch["gene_ids"].shape
    cell = batch["index"][:1].numpy()
    alone = tokenizer(stacked.X[cell], cell_ids=cell)
    length = alone["gene_ids"].shape[1]
    assert torch.equal(alone["mod_types"][0], batch["mod_types"][0, :length]) and torch.equal(alone["values"][0], batch["values"][0, :length])


def test_bad_modality_options_are_refused(stacked):
    modalities = list(stacked.var["modality"])
    with pytest.raises(ValueError, match="modalities has 163 entries but there are 164 columns"):
        _tokenizer(stacked, modalities=modalities[:-1])
    with pytest.raises(ValueError, match=r"\['Protein'\] are not in mod_vocab"):
        _tokenizer(stacked, mod_vocab=GeneVocab(["RNA", "ATAC"]))
    with pytest.raises(ValueError, match="'ATAC' is not one of the modalities"):
        _tokenizer(stacked, mask_modality="ATAC", modality_mask_ratio=0.5)
    with pytest.raises(ValueError, match="'ATAC' is not one of the modalities"):
        _tokenizer(stacked, include_zero_genes=["ATAC"])
    with pytest.raises(ValueError, match="need modalities="):
        _tokenizer(stacked, modalities=None, include_zero_genes=["Protein"])
    with pytest.raises(ValueError, match="needs mask_modality="):
        _tokenizer(stacked, modality_mask_ratio=0.5)
    with pytest.raises(ValueError, match=r"modality_mask_ratio must be in \[0, 1\]"):
        _tokenizer(stacked, mask_modality="Protein", modality_mask_ratio=1.5)


# MultiOmicTransformer on CITE-seq

def test_predict_imputes_protein_for_cells_that_have_none(tiny, split, protein_names):
    test = split[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all the model's genes are there: no gene-overlap warning
        imputed = tiny.predict(_rna_only(test))
    assert imputed.shape == (100, 14) and list(imputed.columns) == protein_names and imputed.index.equals(test.obs_names)
    assert np.isfinite(imputed.to_numpy()).all() and imputed.to_numpy().std(0).min() > 0  # a value per cell, not one per protein
    np.testing.assert_allclose(tiny.predict(test).to_numpy(), imputed.to_numpy(), rtol=0, atol=1e-5)  # measured proteins are hidden
    in_sevens = tiny.predict(_rna_only(test), batch_size=7)  # a cell's prediction is its own, whatever the rest of its batch
    np.testing.assert_allclose(in_sevens.to_numpy(), imputed.to_numpy(), rtol=0, atol=1e-5)


def test_a_cell_gets_the_same_imputation_and_embedding_wherever_it_sits(tiny, split):
    "Cells are identified by name (stable_cell_ids), not by row: reversing or subsetting the query changes nothing."
    query = _rna_only(split[1])
    imputed, reversed_order = tiny.predict(query), tiny.predict(query[::-1].copy())
    np.testing.assert_allclose(reversed_order.loc[imputed.index].to_numpy(), imputed.to_numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(tiny.predict(query[[7]].copy()).to_numpy(), imputed.iloc[[7]].to_numpy(), rtol=0, atol=1e-5)
    with_protein = split[1]
    np.testing.assert_allclose(tiny.embed(with_protein[::-1].copy())[::-1], tiny.embed(with_protein), rtol=0, atol=1e-5)


def test_the_same_seed_gives_the_same_model_and_another_seed_another(tiny, split):
    test = _rna_only(split[1])
    again = MultiOmicTransformer(**TINY).fit(split[0], epochs=2, batch_size=32, seed=0)
    pd.testing.assert_frame_equal(again.predict(test), tiny.predict(test))
    pd.testing.assert_frame_equal(again.history_.df.drop(columns="seconds"), tiny.history_.df.drop(columns="seconds"))
    other = MultiOmicTransformer(**TINY).fit(split[0], epochs=2, batch_size=32, seed=1)
    assert not np.allclose(other.predict(test).to_numpy(), tiny.predict(test).to_numpy(), atol=1e-3)


def test_embed_gives_one_row_per_cell(tiny, split):
    test = split[1].copy()
    embedding = tiny.embed(test, key_added="X_multiomic")
    assert embedding.shape == (100, 8) and embedding.dtype == np.float32 and np.isfinite(embedding).all()
    assert test.obsm["X_multiomic"] is embedding and np.linalg.matrix_rank(embedding) > 1


def test_save_and_load_give_identical_predictions_and_embeddings(tiny, split, tmp_path):
    test = split[1]
    folder = tiny.save(tmp_path / "multiomic")
    assert json.loads((folder / "config.json").read_text())["kind"] == "cellmtl.scgpt.MultiOmicTransformer"
    loaded = cellmtl.load(folder)
    assert type(loaded) is MultiOmicTransformer and loaded.config == tiny.config and loaded.genes_ == tiny.genes_
    assert loaded.modality_of_ == tiny.modality_of_ and loaded.mod_vocab_.itos == tiny.mod_vocab_.itos
    np.testing.assert_array_equal(loaded.predict(_rna_only(test)).to_numpy(), tiny.predict(_rna_only(test)).to_numpy())
    np.testing.assert_array_equal(loaded.embed(test), tiny.embed(test))
    assert loaded.history_.df.equals(tiny.history_.df)
    with pytest.raises(FileExistsError, match="already holds"): tiny.save(folder)
    other = MultiOmicTransformer(**TINY).fit(split[0], epochs=1, batch_size=32, seed=3)
    other.save(folder, overwrite=True)
    np.testing.assert_array_equal(cellmtl.load(folder).embed(test), other.embed(test))


def test_a_trained_model_predicts_held_out_protein_from_rna(split, protein_names):
    """Pearson across held-out cells, per protein, mean over the 14. Observed (300 training / 100 held-out cells, one CPU
    thread, ~2 s): trained 30 epochs, seed 0: 0.516 (seeds 1, 2: 0.460, 0.398); the same model untrained (one epoch at
    lr 1e-8): 0.101; the trained predictions shuffled across cells: 0.039-0.066; ridge and kNN on the RNA PCA: 0.72.
    val_mlm 862 at epoch 0, 136 over the last five epochs."""
    train, test = split
    measured = pd.DataFrame(clr(test.obsm["protein_expression"]), index=test.obs_names, columns=protein_names)
    options = dict(n_top_genes=200, d_model=16, n_heads=2, d_hid=32, n_layers=1, dropout=0.0)
    trained = MultiOmicTransformer(**options).fit(train, epochs=30, batch_size=32, seed=0)
    untrained = MultiOmicTransformer(**options).fit(train, epochs=1, batch_size=32, seed=0, lr=1e-8)
    predicted = trained.predict(_rna_only(test))
    score = imputation_scores(predicted, measured).loc["mean", "pearson"]
    baseline = imputation_scores(untrained.predict(_rna_only(test)), measured).loc["mean", "pearson"]
    shuffled = max(imputation_scores(pd.DataFrame(predicted.to_numpy()[np.random.default_rng(s).permutation(100)], index=predicted.index,
                                                  columns=predicted.columns), measured).loc["mean", "pearson"] for s in range(3))
    assert score > 0.4 and score > baseline + 0.25 and score > shuffled + 0.25, (score, baseline, shuffled)
    losses = trained.history_.df["val_mlm"]
    assert len(losses) == 30 and losses.iloc[-5:].mean() < 0.3 * losses.iloc[0], losses.tolist()


def test_batch_labels_train_and_survive_a_save(split, tmp_path):
    model = MultiOmicTransformer(**TINY, batch_key="batch", use_batch_labels=True, domain_spec_batchnorm=True)
    model.fit(split[0], epochs=1, batch_size=32, seed=0)
    assert model.batch_categories_ == list(split[0].obs["batch"].cat.categories) == ["5k", "10k"]  # the column's own order
    imputed = model.predict(_rna_only(split[1]))
    assert imputed.shape == (100, 14) and np.isfinite(imputed.to_numpy()).all()
    loaded = cellmtl.load(model.save(tmp_path / "batches"))
    np.testing.assert_array_equal(loaded.predict(_rna_only(split[1])).to_numpy(), imputed.to_numpy())
    assert loaded.batch_categories_ == ["5k", "10k"]


# RNA + ATAC

@pytest.fixture(scope="module")
def multiome(data_dir):
    cells = multiome_pbmc(data_dir)
    return cells[np.sort(np.random.default_rng(0).choice(cells.n_obs, 300, replace=False))].copy()


def test_rna_and_atac_train_and_embed(multiome):
    model = MultiOmicTransformer(modalities=("ATAC",), impute=None, zero_token_modalities=(), n_top_genes=None, d_model=16, n_heads=2,
                                 d_hid=32, n_layers=1, dropout=0.0)
    model.fit(multiome, epochs=4, batch_size=32, seed=0)
    assert model.modality_of_.count("RNA") == 45 and model.modality_of_.count("ATAC") == 174
    losses = model.history_.df["val_mlm"]
    assert np.isfinite(losses).all() and losses.iloc[-1] < losses.iloc[0], losses.tolist()
    embedding = model.embed(multiome)
    assert embedding.shape == (300, 16) and np.isfinite(embedding).all()
    with pytest.warns(UserWarning, match="only the features a cell measured"):
        peaks = model.predict(multiome, modality="ATAC")
    measured = multiome.obsm["atac_counts"].toarray() > 0
    assert peaks.shape == (300, 174) and (np.isfinite(peaks.to_numpy()) == measured).all()  # a prediction exactly at the measured peaks


# bad input

def test_a_protein_model_needs_protein_to_embed(tiny, split):
    with pytest.raises(KeyError, match="add_modality"):
        tiny.embed(_rna_only(split[1]))


def test_predict_of_a_modality_the_model_does_not_read(tiny, split):
    with pytest.raises(ValueError, match="modality='ATAC' is not one this model reads"):
        tiny.predict(split[1], modality="ATAC")


def test_annotate_says_the_model_does_not_label_cells(tiny, split):
    with pytest.raises(NotImplementedError, match="does not label cells"):
        tiny.annotate(split[1])


def test_config_errors():
    with pytest.raises(ValueError, match="impute='ATAC' is not one of modalities"): MultiOmicTransformer(impute="ATAC")
    with pytest.raises(ValueError, match="remove 'RNA'"): MultiOmicTransformer(modalities=("RNA", "Protein"))
    with pytest.raises(ValueError, match="objectives must be a non-empty subset"): MultiOmicTransformer(objectives=("mlm", "cls"))
    with pytest.raises(ValueError, match="objectives must be a non-empty subset"): MultiOmicTransformer(objectives=())
    with pytest.raises(ValueError, match="pass batch_key="): MultiOmicTransformer(use_batch_labels=True)
    with pytest.raises(ValueError, match="pass batch_key="): MultiOmicTransformer(domain_spec_batchnorm=True)
    with pytest.raises(ValueError, match=r"impute_ratio must be in \[0, 1\]"): MultiOmicTransformer(impute_ratio=1.5)


def test_predict_and_embed_before_fit(split):
    with pytest.raises(RuntimeError, match="is not fitted"): MultiOmicTransformer(**TINY).predict(split[1])
    with pytest.raises(RuntimeError, match="is not fitted"): MultiOmicTransformer(**TINY).embed(split[1])


def test_fit_needs_the_batch_column_it_is_told(split):
    with pytest.raises(KeyError, match="'donor' is not an obs column"):
        MultiOmicTransformer(**TINY, batch_key="donor", use_batch_labels=True).fit(split[0], epochs=1)


def test_a_query_missing_some_genes_is_reported_and_still_predicted(tiny, split):
    model_genes = [g for g, m in zip(tiny.genes_, tiny.modality_of_) if m == "RNA"]
    query = _rna_only(split[1])
    query = query[:, ~query.var_names.isin(model_genes[:30])].copy()
    with pytest.warns(UserWarning, match="30 reference genes missing from the query, zero-filled"):
        imputed = tiny.predict(query)
    assert imputed.shape == (100, 14) and np.isfinite(imputed.to_numpy()).all()
    assert imputed.attrs["gene_alignment"].n_missing == 30


# the evaluation helpers

def test_clr_of_a_hand_computed_panel():
    counts = np.array([[0, 3], [1, 1]])
    expected = np.array([[-np.log(2), np.log(2)], [0, 0]])  # log1p: (0, ln 4) and (ln 2, ln 2); minus the mean (ln 2 each)
    np.testing.assert_allclose(clr(counts), expected, rtol=1e-6, atol=1e-7)
    three = np.array([[7, 0, 0]])
    np.testing.assert_allclose(clr(three), [[2 * np.log(2), -np.log(2), -np.log(2)]], rtol=1e-6)  # (ln 8, 0, 0) - ln 8 / 3
    assert clr(counts).dtype == np.float32
    np.testing.assert_array_equal(clr(sp.csr_matrix(counts)), clr(counts))


def test_imputation_scores_perfect_anti_correlated_and_constant():
    rng = np.random.default_rng(0)
    cells = [f"cell{i}" for i in range(30)]
    measured = pd.DataFrame(rng.normal(size=(30, 4)), index=cells, columns=["A", "B", "C", "D"])
    predicted = pd.DataFrame({"A": 2 * measured["A"] + 1, "B": -measured["B"], "C": 5.0, "D": np.exp(3 * measured["D"])}, index=cells)
    predicted.loc["cell3", "A"] = np.nan  # an unpredicted cell is left out of its feature's score
    scores = imputation_scores(predicted, measured)
    assert list(scores.index) == ["A", "B", "C", "D", "mean"] and list(scores.columns) == ["pearson", "spearman"]
    assert scores.loc["A"].tolist() == pytest.approx([1, 1]) and scores.loc["B"].tolist() == pytest.approx([-1, -1])
    assert scores.loc["C"].isna().all()  # a constant prediction has no correlation
    assert scores.loc["D", "spearman"] == pytest.approx(1) and scores.loc["D", "pearson"] < 0.9  # monotone, not linear
    assert scores.loc["mean", "spearman"] == pytest.approx(1 / 3)  # over the three scorable features
    assert scores.loc["mean", "pearson"] == pytest.approx(scores.loc["D", "pearson"] / 3)
    with pytest.raises(ValueError, match="same cells"): imputation_scores(predicted.iloc[::-1], measured)
    with pytest.raises(ValueError, match="same cells"): imputation_scores(predicted[["B", "A", "C", "D"]], measured)


def test_ridge_recovers_a_linear_target_and_knn_returns_the_nearest_cell():
    rng = np.random.default_rng(1)
    train_x, test_x = rng.normal(size=(80, 4)), rng.normal(size=(10, 4))
    weights = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [-1.0, 1.0]])
    train_y = pd.DataFrame(train_x @ weights + [2.0, -1.0], columns=["CD3", "CD19"])
    names = [f"q{i}" for i in range(10)]
    ridge = regression_imputation(train_x, train_y, test_x, "ridge", index=names)
    assert list(ridge.columns) == ["CD3", "CD19"] and list(ridge.index) == names
    np.testing.assert_allclose(ridge.to_numpy(), test_x @ weights + [2.0, -1.0], atol=0.02)
    near = train_x[[3, 41, 77]] + 1e-4
    knn = regression_imputation(train_x, train_y, near, "knn", n_neighbors=1)
    np.testing.assert_allclose(knn.to_numpy(), train_y.to_numpy()[[3, 41, 77]])
    everyone = regression_imputation(train_x[:5], train_y[:5], test_x, "knn", n_neighbors=15)  # k is cut to the 5 training cells
    np.testing.assert_allclose(everyone.to_numpy(), np.tile(train_y[:5].mean().to_numpy(), (10, 1)))
    with pytest.raises(ValueError, match="method must be 'ridge' or 'knn'"): regression_imputation(train_x, train_y, test_x, "forest")


def test_rna_pca_is_fitted_on_the_training_cells(split):
    train, test = split
    genes = np.flatnonzero(np.asarray((train.X > 0).sum(0)).ravel() > 20)[:100]
    train_pcs, test_pcs = rna_pca(train.X[:, genes], test.X[:, genes], n_components=10)
    assert train_pcs.shape == (300, 10) and test_pcs.shape == (100, 10)
    _, again = rna_pca(train.X[:, genes], train.X[:7, genes], n_components=10)
    np.testing.assert_allclose(again, train_pcs[:7], rtol=1e-4, atol=1e-4)  # a training cell lands where the fit put it
    assert rna_pca(train.X[:5, genes], test.X[:, genes])[1].shape == (100, 4)  # at most n_train - 1 components


def test_find_marker_by_name_stem():
    citeseq = ["CD3_TotalSeqB", "CD4_TotalSeqB", "CD8a_TotalSeqB", "CD45RA_TotalSeqB", "CD45RO_TotalSeqB", "CD19_TotalSeqB"]
    assert find_marker(citeseq, "CD8") == "CD8a_TotalSeqB"
    assert find_marker(["CD3", "CD4", "CD8", "CD45RA"], "CD8") == "CD8"
    assert find_marker(citeseq, "CD4") == "CD4_TotalSeqB"  # not CD45RA / CD45RO
    assert find_marker(citeseq, "cd19") == "CD19_TotalSeqB"
    with pytest.raises(KeyError, match="matches 0 features"): find_marker(["CD45RA_TotalSeqB", "CD45RO_TotalSeqB"], "CD4")
    with pytest.raises(KeyError, match="matches 0 features"): find_marker(citeseq, "CD45")  # CD45RA is CD45 plus two letters: absent
    with pytest.raises(KeyError, match="matches 2 features"): find_marker(["CD8a_TotalSeqB", "CD8b_TotalSeqB"], "CD8")
    with pytest.raises(KeyError, match="matches 0 features"): find_marker(citeseq, "CD56")


def test_two_means_threshold_splits_a_bimodal_sample():
    rng = np.random.default_rng(0)
    sample = np.concatenate([rng.normal(0, 0.3, 300), rng.normal(5, 0.3, 60)])  # an unbalanced pair of modes
    cut = two_means_threshold(sample)
    assert 1.5 < cut < 3.5
    assert two_means_threshold(sample + 10) == pytest.approx(cut + 10)
    assert two_means_threshold(np.r_[np.zeros(9), 3.0]) == pytest.approx(1.5)  # one positive cell among ten: the centres 0 and 3


def _clr_table(rows: dict) -> pd.DataFrame:
    "A made-up CLR table: every listed marker 3 (positive) in its cell, every other 0."
    columns = ["CD3_TotalSeqB", "CD4_TotalSeqB", "CD8a_TotalSeqB", "CD14_TotalSeqB", "CD16_TotalSeqB", "CD19_TotalSeqB", "CD56_TotalSeqB"]
    stem = {c.split("_")[0].rstrip("a"): c for c in columns}
    table = pd.DataFrame(0.0, index=list(rows), columns=columns)
    for cell, markers in rows.items():
        for marker in markers: table.loc[cell, stem[marker]] = 3.0
    return table


def test_gate_cell_types_follows_the_written_rule():
    rows = {"b": ["CD19"], "t4": ["CD3", "CD4"], "t8": ["CD3", "CD8"], "nk": ["CD56", "CD16"], "mono14": ["CD14", "CD16"],
            "mono16": ["CD16"], "double": ["CD3", "CD4", "CD8"], "none": [], "b_and_t": ["CD19", "CD3"]}
    types, thresholds = gate_cell_types(_clr_table(rows))
    assert types.to_dict() == {"b": "B", "t4": "CD4 T", "t8": "CD8 T", "nk": "NK", "mono14": "CD14 monocyte", "mono16": "CD16 monocyte",
                               "double": "ungated", "none": "ungated", "b_and_t": "ungated"}
    assert list(types.cat.categories) == [*PBMC_GATES, "ambiguous", "ungated"] and types.name == "gated_type"
    assert thresholds.to_dict() == pytest.approx({m: 1.5 for m in ["CD14", "CD16", "CD19", "CD3", "CD4", "CD56", "CD8"]})
    overlapping = {"T": ({"CD3"}, set()), "CD4 T": ({"CD3", "CD4"}, {"CD8"})}
    types, _ = gate_cell_types(_clr_table(rows), overlapping)
    assert types[["t4", "t8", "double", "b"]].tolist() == ["ambiguous", "T", "T", "ungated"]
    with pytest.raises(KeyError, match="'CD56' matches 0 features"):
        gate_cell_types(_clr_table(rows).drop(columns="CD56_TotalSeqB"))
