"""cellmtl.scgpt.tokenize: the scGPT vocabulary format, binning against scGPT's own code, seeded truncation/masking, padding, the loader and bad inputs."""
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellmtl.data import normalize_log1p
from cellmtl.scgpt.tokenize import (CellTokenizer, GeneVocab, TokenLoader, digitize, quantile_edges, random_keys,
                              smallest_per_row, to_uniform)

GENES = [f"G{i}" for i in range(40)]


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    "Seeded sparse counts: 30 cells x 40 genes, many ties, one all-zero cell (row 3)."
    rng = np.random.default_rng(0)
    X = rng.poisson(0.8, (30, 40)).astype(np.float32) * (rng.random((30, 40)) < 0.6)
    X[3] = 0
    return sp.csr_matrix(X)


@pytest.fixture(scope="module")
def vocab() -> GeneVocab:
    return GeneVocab.from_genes(GENES)


def scgpt_binning(row_values: np.ndarray, n_bins: int, uniforms: np.ndarray):
    "scGPT 0.2.4's `binning` + `_digitize(side='both')` for one cell's expressed values, with the uniforms given."
    bins = np.quantile(row_values, np.linspace(0, 1, n_bins - 1))
    left, right = np.digitize(row_values, bins), np.digitize(row_values, bins, right=True)
    return np.ceil(uniforms * (right - left) + left).astype(np.int64), bins


# ---------------------------------------------------------------- vocabulary
def test_vocab_layout_and_mapping(vocab):
    assert vocab.itos[:3] == ["<pad>", "<cls>", "<eoc>"] and (vocab.pad_id, vocab.cls_id) == (0, 1)
    assert len(vocab) == 43 and "G5" in vocab and "G99" not in vocab and 5 not in vocab
    assert vocab.itos == ["<pad>", "<cls>", "<eoc>"] + sorted(GENES)  # scGPT sorts a gene list
    assert dict(vocab)["G0"] == vocab["G0"] == 3
    assert GeneVocab(["B", "A"]).itos[3:] == ["B", "A"]  # explicit order is kept
    with pytest.raises(KeyError, match="not in the vocabulary"): vocab["G99"]
    with pytest.raises(ValueError, match="repeat"): GeneVocab(["A", "B", "A"])


def test_vocab_json_round_trip(vocab, tmp_path):
    path = vocab.save(tmp_path / "sub" / "vocab.json")
    assert json.loads(path.read_text()) == {token: i for i, token in enumerate(vocab.itos)}
    loaded = GeneVocab.from_file(path)
    assert loaded == vocab and loaded.itos == vocab.itos
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic write leaves no temporary file


def test_scgpt_style_vocab_json_keeps_ids(tmp_path):
    # as scGPT's published vocab.json: entries in hash order, specials at the end of the id range
    mapping = {"RP5-973N23.5": 4, "<eoc>": 7, "A1BG": 0, "<pad>": 5, "TSPAN6": 3, "<cls>": 6, "DPM1": 1, "SCYL3": 2}
    (tmp_path / "vocab.json").write_text(json.dumps(mapping, indent=2))
    loaded = GeneVocab.from_file(tmp_path / "vocab.json")
    assert dict(loaded) == mapping
    assert (loaded.pad_id, loaded.cls_id, loaded["<eoc>"]) == (5, 6, 7)
    assert loaded.itos == ["A1BG", "DPM1", "SCYL3", "TSPAN6", "RP5-973N23.5", "<pad>", "<cls>", "<eoc>"]
    np.testing.assert_array_equal(loaded.ids(["TSPAN6", "A1BG"]), [3, 0])
    loaded.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == mapping


@pytest.mark.parametrize("mapping, message", [
    ({"<pad>": 0, "A": 2}, "unused ids: \\[1\\]"),
    ({"<pad>": 0, "A": 0}, "ids used twice: \\[0\\]"),
    ({"<pad>": -1, "A": 0}, "negative ids"),
    ({"<pad>": 0, "A": "1"}, "must be integers"),
    ({"<pad>": 0, "A": 1.0}, "must be integers"),
    ({}, "empty"),
])
def test_bad_vocab_ids(mapping, message, tmp_path):
    (tmp_path / "v.json").write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=message): GeneVocab.from_file(tmp_path / "v.json")


def test_bad_vocab_files(tmp_path):
    with pytest.raises(FileNotFoundError): GeneVocab.from_file(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"): GeneVocab.from_file(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"): GeneVocab.from_file(tmp_path / "broken.json")


def test_missing_specials_and_append():
    vocab = GeneVocab.from_dict({"<pad>": 0, "DIP2A": 1, "CSTB": 2})  # scGPT's tests/vocab.json
    with pytest.raises(KeyError, match="vocab.append_token\\('<cls>'\\)"): vocab.cls_id
    with pytest.raises(KeyError, match="no '<cls>' token"): CellTokenizer(vocab, ["DIP2A"])
    assert vocab.append_token("<cls>") == 3 and vocab.cls_id == 3
    with pytest.raises(ValueError, match="already"): vocab.append_token("<cls>")


def test_ids_missing_genes(vocab):
    with pytest.raises(ValueError, match="2 of 3 genes are not in the vocabulary.*'X1', 'X2'.*missing='skip'"):
        vocab.ids(["G1", "X1", "X2"])
    with pytest.warns(UserWarning, match="2 of 3 genes are not in the vocabulary"):
        ids = vocab.ids(["G1", "X1", "X2"], missing="skip")
    assert ids.dtype == np.int64 and ids.tolist() == [vocab["G1"], -1, -1]
    with pytest.raises(ValueError, match="none of the 2 genes"): vocab.ids(["X1", "X2"], missing="skip")
    with pytest.raises(ValueError, match="missing must be"): vocab.ids(["G1"], missing="drop")


# ---------------------------------------------------------------- random keys and binning
def test_random_keys_are_a_function_of_the_token():
    rows, genes = np.repeat(np.arange(4), 5), np.tile(np.arange(5), 4)
    keys = random_keys(3, "mask", 2, [10, 11, 12, 13], rows, genes)
    np.testing.assert_array_equal(keys, random_keys(3, "mask", 2, [10, 11, 12, 13], rows, genes))
    np.testing.assert_array_equal(keys[10:15], random_keys(3, "mask", 2, [12], np.zeros(5, int), genes[:5]))
    for other in (random_keys(4, "mask", 2, [10, 11, 12, 13], rows, genes), random_keys(3, "mask", 3, [10, 11, 12, 13], rows, genes),
                  random_keys(3, "truncate", 2, [10, 11, 12, 13], rows, genes)):
        assert (other != keys).all()
    uniforms = to_uniform(keys)
    assert ((uniforms >= 0) & (uniforms < 1)).all()


def test_binning_matches_scgpt_bit_for_bit():
    rng = np.random.default_rng(1)
    for trial in range(200):
        lengths = rng.integers(1, 60, rng.integers(1, 6))
        kind = trial % 3
        cells = [(rng.poisson(rng.uniform(0.2, 5), n) + 1).astype(np.float32) if kind == 0 else
                 rng.lognormal(0, 1, n).astype(np.float32) if kind == 1 else
                 np.log1p(rng.poisson(2, n) + 1).astype(np.float32) for n in lengths]
        rows, values = np.repeat(np.arange(len(cells)), lengths), np.concatenate(cells)
        uniforms, n_bins = rng.random(len(values)), int(rng.choice([3, 5, 11, 51]))
        edges = quantile_edges(rows, values, len(cells), n_bins)
        bins = digitize(rows, values, edges, uniforms)
        for row, cell in enumerate(cells):
            expected_bins, expected_edges = scgpt_binning(cell, n_bins, uniforms[rows == row])
            np.testing.assert_array_equal(edges[row], expected_edges)
            np.testing.assert_array_equal(bins[rows == row], expected_bins)


def test_binning_matches_scgpt_on_real_cells(data_dir):
    from cellmtl.datasets import cellbench
    X = cellbench(plates=["sc_celseq2"], data_dir=data_dir).X[:32].astype(np.float32)
    rows = np.repeat(np.arange(32), np.diff(X.indptr))
    uniforms = to_uniform(random_keys(0, "bins", 0, np.arange(32), rows, X.indices))
    edges = quantile_edges(rows, X.data, 32, 51)
    bins = digitize(rows, X.data, edges, uniforms)
    assert bins.min() == 1 and bins.max() == 50
    for row in range(32):
        expected, _ = scgpt_binning(X.data[rows == row], 51, uniforms[rows == row])
        np.testing.assert_array_equal(bins[rows == row], expected)


def test_smallest_per_row_chooses_exactly_k():
    rows = np.repeat(np.arange(4), [6, 0, 9, 3])
    keys = random_keys(0, "mask", 0, np.arange(4), rows, np.arange(len(rows)))
    chosen = smallest_per_row(rows, keys, np.array([2, 3, 4, 5]))
    np.testing.assert_array_equal(np.bincount(rows[chosen], minlength=4), [2, 0, 4, 3])
    in_row = rows == 2
    np.testing.assert_array_equal(np.sort(keys[in_row])[:4], np.sort(keys[in_row & chosen]))


# ---------------------------------------------------------------- the tokenizer
def test_binned_values_are_deterministic_and_in_range(vocab, counts):
    tokenizer = CellTokenizer(vocab, GENES, n_bins=11, mask_ratio=0.0, seed=7)
    first, second = tokenizer(counts), tokenizer(counts)
    for key in first: assert torch.equal(first[key], second[key])
    genes = ~first["src_key_padding_mask"] & (first["gene_ids"] != vocab.cls_id)
    values = first["target_values"][genes]
    assert values.min() >= 1 and values.max() <= 10 and torch.equal(values, values.round())
    assert torch.equal(tokenizer(counts, epoch=5)["target_values"], first["target_values"])  # bins ignore the epoch
    other_seed = CellTokenizer(vocab, GENES, n_bins=11, mask_ratio=0.0, seed=8)(counts)
    assert torch.equal(other_seed["gene_ids"], first["gene_ids"]) and not torch.equal(other_seed["target_values"], first["target_values"])


def test_bins_follow_scgpt_per_cell(vocab, counts):
    tokenizer = CellTokenizer(vocab, GENES, n_bins=21, mask_ratio=0.0, max_len=41)
    batch = tokenizer(counts)
    ids = vocab.ids(GENES)
    for row in range(counts.shape[0]):
        start, end = counts.indptr[row], counts.indptr[row + 1]
        expressed = counts.data[start:end] > 0
        if not expressed.any(): continue
        columns, values = counts.indices[start:end][expressed], counts.data[start:end][expressed]
        uniforms = to_uniform(random_keys(0, "bins", 0, [row], np.zeros(len(columns), int), ids[columns]))
        expected, _ = scgpt_binning(values, 21, uniforms)
        n = len(columns)
        np.testing.assert_array_equal(batch["gene_ids"][row, 1:n + 1].numpy(), ids[columns])
        np.testing.assert_array_equal(batch["target_values"][row, 1:n + 1].numpy(), expected)


@pytest.mark.parametrize("include_zero_genes", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.15, 0.4])
def test_masks_never_touch_pad_or_cls(vocab, counts, include_zero_genes, mask_ratio):
    tokenizer = CellTokenizer(vocab, GENES, max_len=16, mask_ratio=mask_ratio, include_zero_genes=include_zero_genes)
    for epoch in range(3):
        batch = tokenizer(counts, epoch=epoch)
        masked = batch["values"] == tokenizer.mask_value
        assert not (masked & batch["src_key_padding_mask"]).any()
        assert not masked[:, 0].any() and (batch["gene_ids"][:, 0] == vocab.cls_id).all()
        assert (batch["values"][:, 0] == 0).all() and (batch["target_values"][:, 0] == 0).all()
        n_eligible = (~batch["src_key_padding_mask"]).sum(1) - 1  # gene tokens
        assert torch.equal(masked.sum(1), (n_eligible.double() * mask_ratio).long())
        assert torch.equal(batch["values"][~masked], batch["target_values"][~masked])
        assert (batch["target_values"][masked] != tokenizer.mask_value).all()


def test_masks_are_seeded_and_change_with_the_epoch(vocab, counts):
    tokenizer = CellTokenizer(vocab, GENES, mask_ratio=0.3)
    masks = [tokenizer(counts, epoch=e)["values"] == -1 for e in (0, 0, 1)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[0], CellTokenizer(vocab, GENES, mask_ratio=0.3, seed=1)(counts)["values"] == -1)


def test_truncation_keeps_cls_and_is_seeded(vocab, counts):
    tokenizer = CellTokenizer(vocab, GENES, max_len=6, mask_ratio=0.0)
    batch = tokenizer(counts)
    assert batch["gene_ids"].shape == (30, 6) and (batch["gene_ids"][:, 0] == vocab.cls_id).all()
    n_expressed = np.asarray((counts > 0).sum(1)).ravel()
    np.testing.assert_array_equal((~batch["src_key_padding_mask"]).sum(1).numpy(), 1 + np.minimum(n_expressed, 5))
    ids = vocab.ids(GENES)
    for row in range(30):  # the kept genes are the cell's own, in column order
        own = ids[counts.indices[counts.indptr[row]:counts.indptr[row + 1]][counts.data[counts.indptr[row]:counts.indptr[row + 1]] > 0]]
        kept = batch["gene_ids"][row][~batch["src_key_padding_mask"][row]][1:].numpy()
        assert set(kept) <= set(own) and list(kept) == [g for g in own if g in set(kept)]
    assert torch.equal(tokenizer(counts)["gene_ids"], batch["gene_ids"])  # seeded
    assert not torch.equal(tokenizer(counts, epoch=1)["gene_ids"], batch["gene_ids"])  # a new subset per epoch
    assert not torch.equal(CellTokenizer(vocab, GENES, max_len=6, seed=3)(counts)["gene_ids"], batch["gene_ids"])


def test_tokens_do_not_depend_on_the_batch(vocab, counts):
    tokenizer = CellTokenizer(vocab, GENES, max_len=8, mask_ratio=0.25)
    whole = tokenizer(counts, cell_ids=np.arange(30) + 100, epoch=2)
    part = tokenizer(counts[[17, 4]], cell_ids=[117, 104], epoch=2)
    for key in ("gene_ids", "values", "target_values"):
        assert torch.equal(part[key], whole[key][[17, 4], :part[key].shape[1]])


def test_padding_values_and_ids(vocab, counts):
    batch = CellTokenizer(vocab, GENES, max_len=50, mask_ratio=0.2)(counts)
    longest = int(np.asarray((counts > 0).sum(1)).max())
    assert batch["gene_ids"].shape == (30, longest + 1)  # padded to the longest cell, as scGPT
    pad = batch["src_key_padding_mask"]
    assert pad.dtype == torch.bool and torch.equal(pad, batch["gene_ids"] == vocab.pad_id)
    assert (batch["values"][pad] == -2).all() and (batch["target_values"][pad] == -2).all()
    fixed = CellTokenizer(vocab, GENES, max_len=50, pad_to="max_len", pad_value=-5.0)(counts)
    assert fixed["gene_ids"].shape == (30, 50) and (fixed["values"][fixed["src_key_padding_mask"]] == -5).all()
    assert {k: v.dtype for k, v in batch.items()} == {"gene_ids": torch.int64, "values": torch.float32,
                                                      "target_values": torch.float32, "src_key_padding_mask": torch.bool}


def test_all_zero_cell_is_cls_plus_pads(vocab, counts):
    batch = CellTokenizer(vocab, GENES, max_len=10)(counts)
    assert batch["gene_ids"][3, 0] == vocab.cls_id and (batch["gene_ids"][3, 1:] == vocab.pad_id).all()
    assert batch["src_key_padding_mask"][3].tolist() == [False] + [True] * 9
    only_empty = CellTokenizer(vocab, GENES)(counts[[3]])
    assert only_empty["gene_ids"].tolist() == [[vocab.cls_id]] and not only_empty["src_key_padding_mask"].any()
    zeros = CellTokenizer(vocab, GENES, include_zero_genes=True, mask_ratio=0)(counts[[3]])
    assert zeros["gene_ids"].shape == (1, 41) and (zeros["target_values"] == 0).all()


def test_continuous_values_match_normalize_log1p(vocab, counts):
    batch = CellTokenizer(vocab, GENES, n_bins=None, include_zero_genes=True, mask_ratio=0, max_len=41)(counts)
    np.testing.assert_array_equal(batch["gene_ids"][:, 1:].numpy(), np.tile(vocab.ids(GENES), (30, 1)))
    torch.testing.assert_close(batch["target_values"][:, 1:], normalize_log1p(torch.from_numpy(counts.toarray())))
    raw = CellTokenizer(vocab, GENES, n_bins=None, target_sum=None, log1p=False, mask_ratio=0)(counts)
    assert set(raw["target_values"][~raw["src_key_padding_mask"]][1:].tolist()) <= set(counts.data.tolist()) | {0.0}


def test_skipped_genes_are_left_out(vocab, counts):
    genes = GENES[:38] + ["X1", "X2"]
    with pytest.warns(UserWarning, match="2 of 40 genes"):
        tokenizer = CellTokenizer(vocab, genes, missing="skip", max_len=41, mask_ratio=0)
    batch = tokenizer(counts)
    assert not np.isin(batch["gene_ids"].numpy(), [vocab["G38"], vocab["G39"]]).any()
    reference = CellTokenizer(vocab, GENES[:38], max_len=41, mask_ratio=0)(counts[:, :38])
    assert torch.equal(batch["gene_ids"], reference["gene_ids"][:, :batch["gene_ids"].shape[1]])


@pytest.mark.parametrize("kind", ["scipy", "torch_csr", "torch_dense", "numpy"])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_batch_containers(vocab, counts, kind):
    X = {"scipy": counts, "numpy": counts.toarray(), "torch_dense": torch.from_numpy(counts.toarray()),
         "torch_csr": torch.from_numpy(counts.toarray()).to_sparse_csr()}[kind]
    tokenizer = CellTokenizer(vocab, GENES)
    expected = tokenizer(counts)
    got = tokenizer(X)
    for key in expected: assert torch.equal(got[key], expected[key])


def test_bad_inputs(vocab, counts):
    tokenizer = CellTokenizer(vocab, GENES)
    with pytest.raises(ValueError, match="the batch has 39 genes \\(columns\\) but the tokenizer has 40"): tokenizer(counts[:, :39])
    with pytest.raises(ValueError, match="negative values"): tokenizer(-counts)
    with pytest.raises(ValueError, match="NaN/inf"): tokenizer(sp.csr_matrix(np.full((1, 40), np.inf, np.float32)))
    with pytest.raises(ValueError, match="no cells"): tokenizer(counts[:0])
    with pytest.raises(ValueError, match="cell_ids has shape"): tokenizer(counts, cell_ids=[1, 2])
    with pytest.raises(ValueError, match="batch_labels must be 30 integer codes"): tokenizer(counts, batch_labels=np.zeros(30, float))
    with pytest.raises(TypeError, match="expected a scipy sparse matrix"): tokenizer([[1, 2]])
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="max_len must be an int >= 2"): CellTokenizer(vocab, GENES, max_len=bad)
    with pytest.raises(ValueError, match="not in the vocabulary"): CellTokenizer(vocab, GENES + ["X1"])
    with pytest.raises(ValueError, match="occur in several columns.*'G1'"): CellTokenizer(vocab, ["G1", "G2", "G1"])
    with pytest.raises(ValueError, match="genes is empty"): CellTokenizer(vocab, [])
    with pytest.raises(ValueError, match="mask_ratio"): CellTokenizer(vocab, GENES, mask_ratio=1.0)
    with pytest.raises(ValueError, match="n_bins"): CellTokenizer(vocab, GENES, n_bins=2)
    with pytest.raises(ValueError, match="must differ"): CellTokenizer(vocab, GENES, mask_value=-2.0)
    with pytest.raises(ValueError, match="pad_to"): CellTokenizer(vocab, GENES, pad_to="multiple_of_8")


# ---------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def adata(counts) -> ad.AnnData:
    obs = pd.DataFrame({"cell_type": np.array(["T", "B", "NK"])[np.arange(30) % 3],
                        "lineage": np.array(["lymphoid", "lymphoid", "lymphoid"])[np.arange(30) % 3],
                        "sample": pd.Categorical(np.array(["s2", "s1"])[np.arange(30) % 2], categories=["s1", "s2"])},
                       index=[f"c{i}" for i in range(30)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=GENES))


def test_loader_batches(vocab, adata):
    tokenizer = CellTokenizer(vocab, GENES, max_len=12)
    with pytest.warns(UserWarning, match="1 of 30 cells express no gene of the vocabulary"):
        loader = TokenLoader(adata, tokenizer, batch_size=8, label_key=["lineage", "cell_type"], batch_key="sample")
    with pytest.warns(UserWarning, match="1 of 30 cells express no gene"):  # dense X too
        TokenLoader(ad.AnnData(adata.X.toarray(), obs=adata.obs, var=adata.var), tokenizer)
    assert len(loader) == 4 and loader.batch_categories == ["s1", "s2"]
    batches = list(loader)
    assert sum(b["gene_ids"].shape[0] for b in batches) == 30
    index = torch.cat([b["index"] for b in batches]).numpy()
    assert sorted(index) == list(range(30))
    batch = batches[0]
    assert list(batch) == ["gene_ids", "values", "target_values", "src_key_padding_mask", "batch_labels", "labels", "index"]
    np.testing.assert_array_equal(batch["batch_labels"].numpy(), (batch["index"].numpy() + 1) % 2)  # s2 (code 1) at even rows
    codes = loader.hierarchy.encode(adata)["cell_type"]
    np.testing.assert_array_equal(batch["labels"]["cell_type"].numpy(), codes[batch["index"].numpy()])
    alone = tokenizer(adata.X[batch["index"].numpy()], cell_ids=batch["index"].numpy())  # the loader is just the tokenizer on rows
    for key in ("gene_ids", "values", "target_values"): assert torch.equal(alone[key], batch[key])


def test_loader_epochs(vocab, adata):
    tokenizer = CellTokenizer(vocab, GENES, mask_ratio=0.3)
    def epoch_masks(loader, epoch):
        loader.set_epoch(epoch)
        return {int(i): set(b["gene_ids"][r][b["values"][r] == -1].tolist()) for b in loader for r, i in enumerate(b["index"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = TokenLoader(adata, tokenizer, batch_size=7, seed=3)
        other_batching = TokenLoader(adata, tokenizer, batch_size=11, shuffle=False)
        frozen = TokenLoader(adata, tokenizer, batch_size=7, resample_each_epoch=False)
    e0, e1 = epoch_masks(loader, 0), epoch_masks(loader, 1)
    assert epoch_masks(loader, 0) == e0 and e1 != e0
    assert epoch_masks(other_batching, 1) == e1  # masks depend on (seed, epoch, cell), not on the batching
    assert epoch_masks(frozen, 4) == e0
    loader.set_epoch(0); order_0 = torch.cat([b["index"] for b in loader])
    loader.set_epoch(1); assert not torch.equal(order_0, torch.cat([b["index"] for b in loader]))


def test_loader_bad_inputs(vocab, adata):
    tokenizer = CellTokenizer(vocab, GENES)
    other = CellTokenizer(vocab, GENES[::-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="are not the tokenizer's"): TokenLoader(adata, other)
        with pytest.raises(ValueError, match="adata is empty"): TokenLoader(adata[:0], tokenizer)
        with pytest.raises(KeyError, match="'donor' is not an obs column"): TokenLoader(adata, tokenizer, batch_key="donor")
        with pytest.raises(ValueError, match="not in batch_categories"): TokenLoader(adata, tokenizer, batch_key="sample", batch_categories=["s1"])
        with pytest.raises(KeyError, match="gene_key 'symbol'"): TokenLoader(adata, tokenizer, gene_key="symbol")
        with pytest.raises(TypeError, match="CellTokenizer"): TokenLoader(adata, vocab)
        with pytest.raises(ValueError, match="batch_size"): TokenLoader(adata, tokenizer, batch_size=0)
