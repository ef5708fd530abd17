"""The gene-token transformer (cellmtl.genetoken): every mode's gradients, sdpa = math, frozen parts stay fixed, save/load,
determinism, the prior's alignment and widths, the memory check and the input-value checks, on real CellBench cells."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellmtl
import cellmtl.genetoken as genetoken
from cellmtl.data import normalize_log1p
from cellmtl.datasets import cellbench
from cellmtl.genetoken import (ClassificationLoss, GeneTokenAnnotator, GeneTokenConfig, GeneTokenTransformer, MaskedValueLoss,
                               check_memory, estimate_memory)
from cellmtl.priors import GenePrior

SMALL = dict(label_key="cell_line", n_top_genes=None, d_model=16, n_heads=2, d_hid=32, n_layers=2)
QUICK = dict(batch_size=16, lr=2e-3, device="cpu")


@pytest.fixture(scope="module")
def cells():
    "120 real Drop-seq + CEL-seq2 cells (raw counts) on their 48 most often detected genes, gene symbols as var_names."
    data = cellbench(["sc_celseq2", "sc_dropseq"], singlets_only=True)
    data = data[np.sort(np.random.default_rng(0).permutation(data.n_obs)[:120])].copy()
    detected = np.asarray((data.X > 0).sum(0)).ravel()
    data = data[:, np.sort(np.argsort(-detected, kind="stable")[:48])].copy()
    data.var_names = data.var["gene_symbol"].astype(str).to_numpy()
    data.var_names_make_unique()
    return data


@pytest.fixture(scope="module")
def values(cells):
    return torch.from_numpy(normalize_log1p(cells.X).toarray().astype(np.float32))  # (120, 48) log1p


@pytest.fixture(scope="module")
def prior(cells):
    "A real knowledge prior (GO/KEGG/Pfam 0/1 columns, PCA; no text model, so it is quick) of width 16."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GenePrior.build(cells, sources=["knowledge"], text=False, feature_size=16)


def _configs():
    base = dict(n_genes=48, d_model=16, n_heads=2, d_hid=32, n_layers=2, n_classes=3, dropout=0.0)
    return {"learned": GeneTokenConfig(**base), "fixed prior": GeneTokenConfig(**base, prior_dim=16),
            "projected prior": GeneTokenConfig(**base, prior_dim=24, project_prior=True),
            "trained prior": GeneTokenConfig(**base, prior_dim=16, train_prior=True)}


@pytest.mark.parametrize("arm", list(_configs()))
def test_every_mode_runs_forward_and_backward(arm, values):
    config = _configs()[arm]
    torch.manual_seed(0)
    model = GeneTokenTransformer(config, None if config.prior_dim is None else torch.randn(48, config.prior_dim))
    x = values[:8]
    mask = genetoken.mask_values(x, 0.3, torch.Generator().manual_seed(0))
    assert mask.any()
    for mode, used in [("pretrain", ("linear_out", "mask_embedding")), ("classify", ("reduce", "classifier"))]:
        model.zero_grad(set_to_none=True)
        out = model(x, mode=mode, mask=mask if mode == "pretrain" else None)
        assert out.shape == ((8, 48) if mode == "pretrain" else (8, 3)) and torch.isfinite(out).all()
        out.square().mean().backward()
        for name, parameter in model.named_parameters():
            head_of_other_mode = name.startswith(("reduce", "classifier") if mode == "pretrain" else ("linear_out", "mask_embedding"))
            assert (parameter.grad is None) == head_of_other_mode, (mode, name)
    tokens, cell = model(x, mode="embed")
    assert tokens.shape == (8, 48, 16) and cell.shape == (8, 16)
    torch.testing.assert_close(cell, tokens.mean(1))
    assert ("prior" in dict(model.named_buffers())) == (config.prior_dim is not None and not config.train_prior)


@pytest.mark.parametrize("training", [False, True])
def test_sdpa_and_math_attention_agree_outputs_and_gradients(training, values):
    torch.manual_seed(0)
    models = {b: GeneTokenTransformer(GeneTokenConfig(n_genes=48, d_model=16, n_heads=4, d_hid=32, n_layers=2, dropout=0.0, attention=b))
              for b in ("math", "sdpa")}
    models["sdpa"].load_state_dict(models["math"].state_dict())
    outputs, grads = {}, {}
    for backend, model in models.items():
        model.train(training)
        out = model(values[:16], mode="pretrain")
        out.square().mean().backward()
        outputs[backend], grads[backend] = out.detach(), model.linear_in.weight.grad.clone()
    torch.testing.assert_close(outputs["sdpa"], outputs["math"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["sdpa"], grads["math"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("finetune", ["head", "last_layer"])
def test_frozen_parameters_really_do_not_change(finetune, cells, prior):
    model = GeneTokenAnnotator(prior=prior, finetune=finetune, dropout=0.2, **SMALL).pretrain(cells, epochs=2, **QUICK)
    before = {k: v.clone() for k, v in model.model_.state_dict().items()}
    model.fit(cells, epochs=3, **QUICK)
    after = model.model_.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected_to_train = ("reduce.",) + (("encoder.layers.1.",) if finetune == "last_layer" else ())
    assert changed and all(k.startswith(expected_to_train) for k in changed), sorted(changed)
    assert any(k.startswith("reduce.") for k in changed)
    assert finetune == "head" or any(k.startswith("encoder.layers.1.") for k in changed)
    assert torch.equal(before["prior"], after["prior"])
    assert model.finetune_ == finetune and model.pretrained_


def test_without_pretraining_auto_trains_everything(cells):
    model = GeneTokenAnnotator(**SMALL).fit(cells, epochs=2, **QUICK)
    assert model.finetune_ == "all" and not model.pretrained_
    assert all(p.requires_grad for n, p in model.model_.named_parameters() if not n.startswith(("linear_out", "mask_embedding")))


def test_save_load_round_trip_keeps_the_prior_and_the_predictions(cells, prior, tmp_path):
    model = GeneTokenAnnotator(prior=prior, **SMALL).pretrain(cells, epochs=1, **QUICK).fit(cells, epochs=2, **QUICK)
    probabilities, embedding = model.predict_proba(cells), model.embed(cells)
    folder = model.save(tmp_path / "gt")
    again = cellmtl.load(folder)
    assert type(again) is GeneTokenAnnotator and again.config == model.config and again.genes_ == model.genes_
    pd.testing.assert_frame_equal(again.predict_proba(cells), probabilities)
    np.testing.assert_array_equal(again.embed(cells), embedding)
    assert torch.equal(again.model_.prior, model.model_.prior) and again.model_.prior.abs().sum() > 0
    assert again.prior_report_["source"].startswith("GenePrior(") and again.pretrain_history_ is not None
    with pytest.raises(FileExistsError, match="already holds"):
        model.save(folder)


def test_same_seed_same_model_other_seed_another(cells):
    def run(seed):
        model = GeneTokenAnnotator(**SMALL).pretrain(cells, epochs=1, seed=seed, **QUICK).fit(cells, epochs=2, seed=seed, **QUICK)
        return model.predict_proba(cells).to_numpy()
    first = run(0)
    np.testing.assert_array_equal(run(0), first)
    assert not np.allclose(run(1), first)


def test_log_values_and_counts_give_the_same_model(cells):
    logged = ad.AnnData(normalize_log1p(cells.X), obs=cells.obs, var=cells.var)  # log1p over the same genes
    from_counts = GeneTokenAnnotator(**SMALL).fit(cells, epochs=2, **QUICK)
    from_logs = GeneTokenAnnotator(**SMALL).fit(logged, epochs=2, **QUICK)
    np.testing.assert_allclose(from_logs.predict_proba(logged).to_numpy(), from_counts.predict_proba(cells).to_numpy(), atol=1e-5)
    np.testing.assert_allclose(from_counts.predict_proba(logged).to_numpy(), from_counts.predict_proba(cells).to_numpy(), atol=1e-5)


def test_counts_where_log_values_are_expected_and_scaled_values_are_refused(cells):
    with pytest.raises(ValueError, match=r"looks like raw counts.*input='log1p'.*sc.pp.log1p"):
        GeneTokenAnnotator(input="log1p", **SMALL).fit(cells, epochs=1, **QUICK)
    scaled = cells.copy()
    scaled.X = cells.X.toarray() - cells.X.toarray().mean(0)
    with pytest.raises(ValueError, match="looks scaled"):
        GeneTokenAnnotator(**SMALL).fit(scaled, epochs=1, **QUICK)
    logged = ad.AnnData(normalize_log1p(cells.X), obs=cells.obs, var=cells.var)
    with pytest.raises(ValueError, match="non-integer"):
        GeneTokenAnnotator(input="counts", **SMALL).fit(logged, epochs=1, **QUICK)


def test_genes_missing_from_the_prior_get_zero_rows_and_are_reported(cells, prior):
    partial = pd.DataFrame(prior.matrix[:30], index=prior.genes[:30])  # a table that knows 30 of the 48 genes
    model = GeneTokenAnnotator(prior=partial, **SMALL)
    with pytest.warns(UserWarning, match=r"18 of the 48 model genes are not in the prior \(or have a zero row there\) and get a zero identity row") as caught:
        model.fit(cells, epochs=1, **QUICK)
    assert caught[0].filename == __file__  # at the user's line
    rows = model.model_.prior.numpy()
    known = np.isin(model.genes_, list(prior.genes[:30]))
    assert (np.abs(rows[~known]).sum(1) == 0).all() and (np.abs(rows[known]).sum(1) > 0).all()
    np.testing.assert_allclose(np.linalg.norm(rows[known], axis=1).mean(), 4.0, rtol=1e-5)  # prior_scale: mean norm √d_model
    assert model.prior_report_["n_in_prior"] == 30 and len(model.prior_report_["missing"]) == 18


def test_query_genes_are_aligned_and_the_gap_reported(cells):
    model = GeneTokenAnnotator(**SMALL).fit(cells, epochs=1, **QUICK)
    query = cells[:10, 5:].copy()  # 43 of the 48 genes
    with pytest.warns(UserWarning, match="query genes differ from the training genes"):
        predictions = model.predict(query)
    assert predictions.attrs["gene_alignment"].n_missing == 5 and len(predictions) == 10


def test_a_prior_of_another_width_needs_a_projection(cells, prior):
    with pytest.raises(ValueError, match=r"the prior is 16 wide but d_model is 32.*prior_projection='pca'"):
        GeneTokenAnnotator(prior=prior, **{**SMALL, "d_model": 32}).fit(cells, epochs=1, **QUICK)
    pca = GeneTokenAnnotator(prior=prior, prior_projection="pca", **{**SMALL, "d_model": 8}).fit(cells, epochs=1, **QUICK)
    assert pca.model_.prior.shape == (48, 8) and pca.model_.prior_projection is None
    linear = GeneTokenAnnotator(prior=prior, prior_projection="linear", **{**SMALL, "d_model": 32}).fit(cells, epochs=1, **QUICK)
    assert linear.model_.prior.shape == (48, 16) and linear.model_.prior_projection.weight.shape == (32, 16)
    with pytest.raises(TypeError, match="GenePrior, a pandas DataFrame"):
        GeneTokenAnnotator(prior=np.zeros((48, 16)), **SMALL)


def test_too_many_genes_for_the_device_is_refused_with_the_estimate(cells, monkeypatch):
    config = GeneTokenConfig(n_genes=20_000, d_model=64, n_heads=4, attention="math")
    with pytest.raises(MemoryError, match=r"about [\d.]+ GiB .*20,000 gene tokens, math attention.*n_top_genes=[\d,]+ would fit.*attention='sdpa'"):
        check_memory(config, 32, "cpu", available=16 * 2**30)
    assert estimate_memory(2_000, 32, backend="math") > 5 * estimate_memory(2_000, 32, backend="sdpa")  # measured: 8.8x (benchmarks/genetoken_speed.py)
    monkeypatch.setattr(genetoken, "available_memory", lambda device: 2**20)  # a device with 1 MiB free
    with pytest.raises(MemoryError, match="n_top_genes="):
        GeneTokenAnnotator(**SMALL).fit(cells, epochs=1, **QUICK)


def test_highly_variable_genes_from_counts_or_log_values(cells):
    model = GeneTokenAnnotator(**{**SMALL, "n_top_genes": 20}).fit(cells, epochs=1, **QUICK)
    assert len(model.genes_) == 20 and set(model.genes_) <= set(cells.var_names)
    logged = ad.AnnData(normalize_log1p(cells.X), obs=cells.obs, var=cells.var)
    assert genetoken.top_genes(logged, 20, from_counts=False) == model.genes_


def test_the_losses_mask_only_non_zero_values_and_skip_unlabelled_cells(values):
    torch.manual_seed(0)
    model = GeneTokenTransformer(GeneTokenConfig(n_genes=48, d_model=16, n_heads=2, n_classes=3))
    batch = {"x": values[:8], "index": torch.arange(8), "labels": {"y": torch.tensor([0, 1, 2, -1, 0, 1, 2, -1])}}
    model.eval()
    loss = MaskedValueLoss(0.15, seed=3)
    assert loss(model, batch)["loss"].item() == loss(model, batch)["loss"].item()  # fixed validation masks
    zeros = {**batch, "x": torch.zeros(8, 48)}
    assert loss(model.train(), zeros)["loss"].item() == 0.0  # nothing to mask, no NaN
    labelled = ClassificationLoss("y")(model.eval(), batch)
    manual = torch.nn.functional.cross_entropy(model(values[:8], mode="classify")[batch["labels"]["y"] >= 0], torch.tensor([0, 1, 2, 0, 1, 2]))
    torch.testing.assert_close(labelled["loss"], manual)


def test_counts_are_normalised_over_every_gene_passed_not_only_the_models(cells):
    model = GeneTokenAnnotator(**SMALL).fit(cells, epochs=1, **QUICK)
    extra = np.random.default_rng(0).poisson(3.0, size=(cells.n_obs, 100)).astype(np.float32)  # 100 more genes' counts
    wide = ad.AnnData(np.hstack([cells.X.toarray(), extra]), obs=cells.obs,
                      var=pd.DataFrame(index=list(cells.var_names) + [f"EXTRA{i}" for i in range(100)]))
    logged = ad.AnnData(normalize_log1p(wide.X), obs=wide.obs, var=wide.var)[:, list(cells.var_names)].copy()  # library size: all 148 genes
    np.testing.assert_allclose(model.predict_proba(wide).to_numpy(), model.predict_proba(logged).to_numpy(), atol=1e-5)
    assert model.input_ == "counts"


def test_pretrain_and_frozen_backbone_fit_under_ddp_keep_every_rank_in_step(tmp_path):
    "torchrun with 2 CPU processes (gloo): both stages through DDP, no unused-parameter error, the same weights on every rank."
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).with_name("ddp_genetoken_script.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    weights = [torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]: torch.testing.assert_close(weights[0][key], weights[1][key], msg=key)
    histories = [json.loads((tmp_path / f"history_rank{r}.json").read_text()) for r in (0, 1)]
    assert histories[0] == histories[1] and histories[0]["finetune"] == "head"  # all-reduced losses: the same decisions


def test_validation_cells_are_read_from_the_same_layer(cells):
    in_layer = ad.AnnData(obs=cells.obs, var=cells.var, layers={"counts": cells.X.copy()})
    train, held = in_layer[:90].copy(), in_layer[90:].copy()
    model = GeneTokenAnnotator(**SMALL).pretrain(train, epochs=1, validation=held, layer="counts", **QUICK)
    model.fit(train, epochs=1, validation=held, layer="counts", **QUICK)
    assert "val_loss" in model.history_.df and "val_loss" in model.pretrain_history_.df
