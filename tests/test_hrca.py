"""HRCA (`cellmtl.hrca`): `HRCAAnnotator` on the one model surface, HRCA's published functions as adapters over it.

Tiny widths; the round trips run on real CellBench counts (a few hundred singlets x 200 genes, the local mirror
in CELLMTL_DATA_DIR), the input checks on seeded simulated counts (`simulate_hierarchy`, SIMULATED).
"""
import copy
import inspect
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellmtl
from cellmtl.datasets import cellbench, simulate_hierarchy
from cellmtl.hrca import (FeatureTokenAttention, GeneAE, GeneAEConfig, HRCAAnnotator, SEClassifier, _engine_options, annotate,
                          denoising_pair, fine_tune, pretrain, torch_threads)
from cellmtl.train import CheckpointError

TINY = dict(input_width=64, d_model=32, d_ff=64, n_heads=4, n_layers=1)  # HRCAAnnotator's names
TINY_HRCA = dict(input_width=64, d_model=32, d_ff=64, head_num=4, n_layers=1)  # the same widths under HRCA's pretrain names


@pytest.fixture(scope="module")
def cells():
    "300 simulated cells x 120 genes with counts and a 3-type label; SIMULATED."
    adata = simulate_hierarchy(300, 120, n_classes=(3,), density=0.3, effect_size=2.0, seed=5)
    adata.obs["cell_type"] = adata.obs["anno_lv1"]
    return adata


@pytest.fixture(scope="module")
def bench(data_dir):
    "Real CellBench singlets, 200 genes with the most counts: CEL-seq2 split into train/validation, Drop-seq as the query."
    data = cellbench(singlets_only=True, data_dir=data_dir)
    top = np.sort(np.argsort(-np.asarray(data.X.sum(0)).ravel())[:200])
    data = data[:, top].copy()
    is_dropseq = (data.obs["protocol"] == "sc_dropseq").to_numpy()
    celseq = data[~is_dropseq]
    rng = np.random.default_rng(0)
    val_rows = rng.random(celseq.n_obs) < 0.2
    return celseq[~val_rows].copy(), celseq[val_rows].copy(), data[is_dropseq][:150].copy()


def test_published_api_names():
    pre = inspect.signature(pretrain).parameters
    for name in ("adata", "save_path", "n_epochs", "batch_size", "n_cpu", "head_num", "n_layers", "lr", "decay_epoch",
                 "lr_decrease_factor", "lr_decrease_patience", "checkpoint_interval", "tb_writer", "use_device", "seed"):
        assert name in pre, name
    assert (pre["n_epochs"].default, pre["head_num"].default, pre["n_layers"].default, pre["lr_decrease_patience"].default) == (1000, 8, 8, 50)
    fine = inspect.signature(fine_tune).parameters
    for name in ("train", "test", "gene_ae", "save_path", "obs_name", "n_epochs", "batch_size", "n_cpu", "n_layers", "lr", "decay_epoch",
                 "lr_decrease_factor", "lr_decrease_patience", "checkpoint_interval", "tb_writer", "use_device"):
        assert name in fine, name
    assert (fine["obs_name"].default, fine["n_epochs"].default, fine["n_layers"].default, fine["decay_epoch"].default) == ("cell_type", 200, 3, 20)
    assert list(inspect.signature(annotate).parameters)[:3] == ["adata", "gene_ae", "classifier"]
    # the class speaks the engine's vocabulary
    assert list(inspect.signature(HRCAAnnotator).parameters)[:5] == ["label_key", "input_width", "d_model", "d_ff", "n_heads"]
    for method, names in ((HRCAAnnotator.pretrain, ("epochs", "batch_size", "lr", "lr_factor", "lr_patience", "warmup_epochs", "device", "seed", "checkpoint_dir")),
                          (HRCAAnnotator.fit, ("validation", "epochs", "batch_size", "lr", "lr_factor", "lr_patience", "warmup_epochs", "device", "seed", "checkpoint_dir"))):
        assert set(names) <= set(inspect.signature(method).parameters), method
    assert inspect.signature(HRCAAnnotator.fit).parameters["warmup_epochs"].default == 20


def test_hrca_names_translate_to_the_engines():
    options = _engine_options(None, 20, 0.5, 7, 20, True, 0)
    assert options == dict(warmup_epochs=20, lr_factor=0.5, lr_patience=7, device="cuda:0", checkpoint_dir=None, tensorboard=False, checkpoint_every=None)
    options = _engine_options("runs/a", -1, 0.1, 10, -1, True, "cpu")
    assert (options["lr_schedule"], options["warmup_epochs"], options["checkpoint_every"], options["tensorboard"]) == (None, 0, None, None)
    assert _engine_options("runs/a", 0, 0.1, 10, 100, False, "auto")["tensorboard"] is False


def test_parameter_count_and_state_dict_keys_of_a_stated_config():
    config = GeneAEConfig(n_genes=100, input_width=50, d_model=16, d_ff=32, n_heads=4, n_layers=2)
    model = GeneAE(config)
    io = 100 * 50 + 50 + 2 * 50 + 50 * 16 + 16  # input layer; the decoder mirrors it
    layer = 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16) + 3 * 2 * 16
    decoder = 16 * 50 + 50 + 2 * 50 + 50 * 100 + 100
    assert sum(p.numel() for p in model.parameters()) == io + 2 * layer + decoder
    keys = list(model.state_dict())  # the hand-written layout the shared cellmtl.nn blocks replaced: old weights still load
    for key in ("input_layer.0.weight", "input_layer.1.weight", "input_layer.4.bias", "encoder.1.attention.w_o.weight",
                "encoder.0.feed_forward.2.weight", "encoder.0.norm_out.bias", "decoder.4.weight", "decoder.1.bias"):
        assert key in keys, key
    z, x_hat = model(torch.rand(7, 100))
    assert z.shape == (7, 16) and x_hat.shape == (7, 100) and (x_hat >= 0).all()
    classifier = SEClassifier(16, 4, n_layers=2)
    assert classifier.eval()(z).shape == (7, 4)


def test_sdpa_matches_the_explicit_attention_with_gradients():
    torch.manual_seed(0)
    attention = FeatureTokenAttention(32, 4, "math")
    x = torch.randn(5, 32, requires_grad=True)
    reference = attention(x); reference.sum().backward(); grad_reference = x.grad.clone(); x.grad = None
    attention.attention = "sdpa"
    out = attention(x); out.sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, grad_reference, atol=1e-5, rtol=1e-5)


def test_denoising_pair():
    counts = torch.tensor([[5.0, 0.0, 5.0], [2.0, 2.0, 0.0]])
    corrupted, target = denoising_pair(counts, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(target, torch.log1p(counts / counts.sum(1, keepdim=True) * 1e4))
    assert ((corrupted > 0) <= (counts > 0)).all()
    with pytest.raises(ValueError, match="drop_rate"):
        denoising_pair(counts, 1.0)


def test_bad_config_and_input_are_refused(cells):
    with pytest.raises(TypeError, match="HRCAConfig's fields"):
        HRCAAnnotator(head_num=4)  # HRCA's name belongs to the adapter; the class says n_heads
    with pytest.raises(ValueError, match="divisible"):
        HRCAAnnotator(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="classifier_layers"):
        HRCAAnnotator(d_model=8, classifier_layers=3)
    logged = ad.AnnData(np.log1p(cells.X.toarray().astype(np.float32)) / 2, var=cells.var)
    with pytest.raises(ValueError, match="raw counts are required"):
        pretrain(logged, n_epochs=1, use_device="cpu", **TINY_HRCA)
    scaled = ad.AnnData(cells.X.toarray().astype(np.float32) - 1, var=cells.var)
    with pytest.raises(ValueError, match="negative"):
        HRCAAnnotator(**TINY).pretrain(scaled, epochs=1, device="cpu")
    with pytest.raises(RuntimeError, match="not fitted"):
        HRCAAnnotator(**TINY).predict(cells)
    with pytest.raises(ValueError, match="n_cpu must be None or an integer"):
        with torch_threads(0): pass


def test_thread_count_is_restored_after_pretrain(cells):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gene_ae = pretrain(cells, n_epochs=1, n_cpu=1, use_device="cpu", seed=0, **TINY_HRCA)
        assert isinstance(gene_ae, GeneAE) and torch.get_num_threads() == 2
        logged = ad.AnnData(np.log1p(cells.X.toarray().astype(np.float32)) / 2, var=cells.var)
        with pytest.raises(ValueError, match="raw counts"):
            pretrain(logged, n_epochs=1, n_cpu=1, use_device="cpu", **TINY_HRCA)
        assert torch.get_num_threads() == 2  # restored after a failed call too
    finally:
        torch.set_num_threads(before)


def test_few_cells_warning_once_per_call_at_the_callers_line(cells):
    train, test = cells[:240].copy(), cells[240:].copy()
    gene_ae = pretrain(cells, n_epochs=1, use_device="cpu", seed=0, **TINY_HRCA)
    for call in (lambda: fine_tune(train, test, copy.deepcopy(gene_ae), n_epochs=3, decay_epoch=1, use_device="cpu", seed=0),
                 lambda: HRCAAnnotator(**TINY).fit(train, validation=test, epochs=3, device="cpu")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        few = [w for w in caught if "fewer than 300 training cells" in str(w.message)]
        assert len(few) == 1, [str(w.message) for w in caught]  # one per call, though it trains 3 epochs
        assert few[0].filename == __file__, few[0].filename  # points at the user's line, not into cellmtl
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HRCAAnnotator(**TINY, min_cells_per_type=0).fit(train, epochs=1, device="cpu")
    assert not [w for w in caught if "fewer than" in str(w.message)]


def test_class_round_trip_on_real_cells(bench, tmp_path):
    train, val, query = bench
    model = HRCAAnnotator(label_key="cell_line", min_cells_per_type=0, **TINY)
    model.pretrain(train, epochs=2, device="cpu", seed=0)
    assert len(model.pretrain_history_) == 2 and model.classifier_ is None and model.embed(query).shape == (query.n_obs, 32)
    assert model.fit(train, validation=val, epochs=3, warmup_epochs=0, device="cpu", seed=0) is model
    assert len(model.history_) == 3 and model.classes_ == sorted(train.obs["cell_line"].astype(str).unique())
    probabilities = model.predict_proba(query)
    assert list(probabilities.columns) == model.classes_ and list(probabilities.index) == list(query.obs_names)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    predictions = model.predict(query)
    assert list(predictions.columns) == ["predicted_cell_line", "predicted_cell_line_prob"]
    assert isinstance(predictions["predicted_cell_line"].dtype, pd.CategoricalDtype)
    embedding = model.embed(query, key_added="X_hrca")
    assert embedding.shape == (query.n_obs, 32) and embedding.dtype == np.float32 and "X_hrca" in query.obsm
    annotated = model.annotate(query.copy(), key_added="hrca")
    assert annotated.obs["hrca_cell_line"].astype(str).tolist() == predictions["predicted_cell_line"].astype(str).tolist()

    saved = model.save(tmp_path / "hrca")
    for loaded in (HRCAAnnotator.load(saved), cellmtl.load(saved)):
        assert type(loaded) is HRCAAnnotator and loaded.config == model.config
        pd.testing.assert_frame_equal(loaded.predict(query), predictions)
        pd.testing.assert_frame_equal(loaded.predict_proba(query), probabilities)
        np.testing.assert_array_equal(loaded.embed(query), embedding)
        assert len(loaded.history_) == 3 and len(loaded.pretrain_history_) == 2
    with pytest.raises(FileExistsError, match="already holds"):
        model.save(saved)
    with pytest.warns(UserWarning, match="20 reference genes missing") as record:
        partial = model.predict(query[:, 20:].copy())  # genes aligned by name, the missing ones zero-filled and reported
    assert partial.attrs["gene_alignment"].n_missing == 20 and record[0].filename == __file__
    with pytest.warns(UserWarning, match="20 reference genes missing") as record:
        model.embed(query[:, 20:].copy())  # through BaseModel.embed: still the caller's line
    assert record[0].filename == __file__, record[0].filename


def test_fit_without_pretrain_starts_from_pretrains_initial_weights(bench):
    train, val, _ = bench
    options = dict(label_key="cell_line", min_cells_per_type=0, **TINY)
    untrained = HRCAAnnotator(**options).pretrain(train, epochs=1, lr=1e-12, device="cpu", seed=3)  # ~ the initial weights
    scratch = HRCAAnnotator(**options).fit(train, epochs=1, lr=1e-12, device="cpu", seed=3)
    for (name, a), b in zip(untrained.gene_ae_.state_dict().items(), scratch.gene_ae_.state_dict().values()):
        if a.is_floating_point(): torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_adapters_are_thin_over_the_class(bench, tmp_path):
    train, val, query = bench
    gene_ae = pretrain(train, tmp_path / "pre", n_epochs=2, use_device="cpu", seed=0, **TINY_HRCA)
    assert (tmp_path / "pre" / "best.pt").exists() and not hasattr(gene_ae, "history_")  # history lives on HRCAAnnotator
    reference = HRCAAnnotator.from_modules(copy.deepcopy(gene_ae), label_key="cell_line", min_cells_per_type=0)
    reference.fit(train, validation=val, epochs=3, warmup_epochs=1, device="cpu", seed=0)
    with pytest.warns(UserWarning, match="fewer than 300 training cells"):
        gene_ae, classifier = fine_tune(train, val, gene_ae, obs_name="cell_line", n_epochs=3, decay_epoch=1, use_device="cpu", seed=0)
    table = annotate(query, gene_ae, classifier, obs_name="cell_line")
    assert list(table.columns[:2]) == ["predicted_cell_line", "predicted_cell_line_prob"]
    np.testing.assert_allclose(table.filter(like="prob_").to_numpy(), reference.predict_proba(query).to_numpy(), atol=1e-5)
    assert "predicted_cell_line" not in query.obs  # HRCA's annotate returns a DataFrame and leaves the AnnData alone
    saved = HRCAAnnotator.from_modules(gene_ae, classifier, label_key="cell_line").save(tmp_path / "model")
    pd.testing.assert_frame_equal(HRCAAnnotator.load(saved).predict(query), table.iloc[:, :2])
    (tmp_path / "broken").mkdir(); (tmp_path / "broken" / "model.pt").write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        HRCAAnnotator.load(tmp_path / "broken")
    with pytest.raises(KeyError, match="no column 'lineage'"):
        fine_tune(train, val, gene_ae, obs_name="lineage", n_epochs=1, use_device="cpu")
    with pytest.raises(ValueError, match="genes differ"):
        fine_tune(train[:, :60].copy(), val, gene_ae, obs_name="cell_line", n_epochs=1, use_device="cpu")


def test_one_cell_type_is_refused_and_shared_validation_cells_are_named(cells):
    one_type = cells.copy()
    one_type.obs["cell_type"] = "T cell"
    with pytest.raises(ValueError, match="single cell type"):
        HRCAAnnotator(**TINY, min_cells_per_type=0).fit(one_type, epochs=1, device="cpu")
    with pytest.warns(UserWarning, match="300 of the 300 validation cells are also training cells") as caught:
        HRCAAnnotator(**TINY, min_cells_per_type=0).fit(cells, validation=cells, epochs=1, device="cpu")
    assert caught[0].filename == __file__  # points at the user's line, not into cellmtl or torch
    with pytest.raises(TypeError, match=r"ad.AnnData\(X, var=pd.DataFrame\(index=gene_names\)\)"):
        HRCAAnnotator(**TINY).fit(cells.X, epochs=1)
