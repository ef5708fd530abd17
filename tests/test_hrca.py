"""HRCA (`cellmtl.hrca`): the seed's API names, shapes and parameter counts, the denoising transform, bad input.

Uses tiny widths and seeded simulated counts (`simulate_hierarchy`) so that every test runs in seconds.
"""
import inspect
import math

import anndata as ad
import numpy as np
import pytest
import torch

from cellmtl.datasets import simulate_hierarchy
from cellmtl.hrca import (FeatureTokenAttention, GeneAE, GeneAEConfig, SEClassifier, annotate, denoising_pair, fine_tune,
                          load_hrca, pretrain, save_hrca)
from cellmtl.train import CheckpointError

TINY = dict(input_width=64, d_model=32, d_ff=64, head_num=4, n_layers=1)


@pytest.fixture(scope="module")
def cells():
    "300 simulated cells x 120 genes with counts and a 3-type label; SIMULATED."
    adata = simulate_hierarchy(300, 120, n_classes=(3,), density=0.3, effect_size=2.0, seed=5)
    adata.obs["cell_type"] = adata.obs["anno_lv1"]
    return adata


def test_seed_api_names():
    pre = inspect.signature(pretrain).parameters
    for name in ("adata", "save_path", "n_epochs", "batch_size", "n_cpu", "head_num", "n_layers", "lr", "decay_epoch",
                 "lr_decrease_factor", "lr_decrease_patience", "checkpoint_interval", "tb_writer", "use_device", "seed"):
        assert name in pre, name
    assert (pre["n_epochs"].default, pre["head_num"].default, pre["n_layers"].default, pre["lr_decrease_patience"].default) == (1000, 8, 8, 50)
    fine = inspect.signature(fine_tune).parameters
    for name in ("train", "test", "gene_ae", "save_path", "obs_name", "n_epochs", "batch_size", "n_layers", "lr", "decay_epoch",
                 "lr_decrease_patience", "checkpoint_interval"):
        assert name in fine, name
    assert (fine["obs_name"].default, fine["n_epochs"].default, fine["n_layers"].default, fine["decay_epoch"].default) == ("cell_type", 200, 3, 20)
    assert list(inspect.signature(annotate).parameters)[:3] == ["adata", "gene_ae", "classifier"]


def test_parameter_count_of_a_stated_config():
    config = GeneAEConfig(n_genes=100, input_width=50, d_model=16, d_ff=32, head_num=4, n_layers=2)
    model = GeneAE(config)
    io = 100 * 50 + 50 + 2 * 50 + 50 * 16 + 16  # input layer; the decoder mirrors it
    layer = 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16) + 3 * 2 * 16
    decoder = 16 * 50 + 50 + 2 * 50 + 50 * 100 + 100
    assert sum(p.numel() for p in model.parameters()) == io + 2 * layer + decoder
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


def test_log_or_scaled_input_is_refused(cells):
    logged = ad.AnnData(np.log1p(cells.X.toarray().astype(np.float32)) / 2, var=cells.var)
    with pytest.raises(ValueError, match="raw counts are required"):
        pretrain(logged, n_epochs=1, use_device="cpu", **TINY)
    scaled = ad.AnnData(cells.X.toarray().astype(np.float32) - 1, var=cells.var)
    with pytest.raises(ValueError, match="negative"):
        pretrain(scaled, n_epochs=1, use_device="cpu", **TINY)


def test_pretrain_fine_tune_annotate_round(cells, tmp_path):
    gene_ae = pretrain(cells, tmp_path / "pre", n_epochs=2, use_device="cpu", seed=0, **TINY)
    assert (tmp_path / "pre" / "best.pt").exists() and len(gene_ae.history_) == 2
    train, test = cells[:240].copy(), cells[240:].copy()
    with pytest.warns(UserWarning, match="fewer than 300 training cells"):
        gene_ae, classifier = fine_tune(train, test, gene_ae, n_epochs=3, decay_epoch=1, use_device="cpu", seed=0)
    table = annotate(test, gene_ae, classifier)
    assert list(table.columns[:2]) == ["predicted_cell_type", "predicted_cell_type_prob"]
    np.testing.assert_allclose(table.filter(like="prob_").sum(1), 1.0, atol=1e-5)
    save_hrca(tmp_path / "hrca.pt", gene_ae, classifier)
    loaded = load_hrca(tmp_path / "hrca.pt")
    import pandas as pd
    pd.testing.assert_frame_equal(annotate(test, *loaded), table)
    (tmp_path / "broken.pt").write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hrca(tmp_path / "broken.pt")
    with pytest.warns(UserWarning, match="20 reference genes missing"):
        annotate(test[:, 20:].copy(), gene_ae, classifier)  # genes aligned by name, the missing ones reported
    with pytest.raises(KeyError, match="no column 'lineage'"):
        fine_tune(train, test, gene_ae, obs_name="lineage", n_epochs=1, use_device="cpu")
    with pytest.raises(ValueError, match="genes differ"):
        fine_tune(train[:, :60].copy(), test, gene_ae, n_epochs=1, use_device="cpu")
