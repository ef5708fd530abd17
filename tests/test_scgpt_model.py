"""cellmtl.scgpt.model: attention backends, every style, DSBN, gradient reversal, checkpoints, scGPT compatibility."""
import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from cellmtl.nn import FLASH_ATTN_AVAILABLE, grad_reverse
from cellmtl.scgpt.model import (TransformerConfig, TransformerModel, config_from_state_dict, convert_scgpt_state_dict, load_scgpt_checkpoint,
                                 save_pretrained)

from conftest import ROOT, load_scgpt_modules, scgpt_model_source

VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{f"G{i}": i for i in range(3, 40)}}


def tokens(batch=5, length=12, n_pad=(0, 2, 4, 7, 11), seed=0, ntoken=40, values_as_bins=None):
    "(gene_ids, values, padding): <cls> first, padded tails of n_pad[b] tokens (pad id 0, value -2), a few masked values (-1)."
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(3, ntoken, (batch, length), generator=g)
    values = torch.randint(1, values_as_bins, (batch, length), generator=g).float() if values_as_bins else torch.rand(batch, length, generator=g) * 4
    if not values_as_bins: values[:, 3] = -1.0  # a masked position
    gene_ids[:, 0], values[:, 0] = 1, 0.0
    padding = torch.arange(length)[None] >= (length - torch.tensor(n_pad[:batch]))[:, None]
    return gene_ids.masked_fill(padding, 0), values.masked_fill(padding, -2.0), padding


def small_model(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return TransformerModel(len(VOCAB), **({"d_model": 32, "nhead": 4, "d_hid": 64, "nlayers": 2, "n_cls": 3, "vocab": VOCAB, "dropout": 0.0} | kw))


# ---------------------------------------------------------------- attention backends
@pytest.mark.parametrize("norm_scheme", ["post", "pre"])
def test_sdpa_and_math_agree_in_outputs_and_gradients_with_padding(norm_scheme):
    "Tolerance: outputs 1e-5, gradients 1e-4 (absolute, float32); dropout 0 so both runs are deterministic."
    gene_ids, values, padding = tokens()
    results = {}
    for backend in ("math", "sdpa"):
        model = small_model(norm_scheme=norm_scheme, do_mvc=True, attention=backend).train()
        out = model(gene_ids, values, padding, CLS=True, MVC=True)
        loss = out["mlm_output"][~padding].pow(2).mean() + out["cls_output"].logsumexp(1).mean() + out["mvc_output"][~padding].mean()
        loss.backward()
        results[backend] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (out_m, grad_m), (out_s, grad_s) = results["math"], results["sdpa"]
    torch.testing.assert_close(out_s["mlm_output"][~padding], out_m["mlm_output"][~padding], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_s["cell_emb"], out_m["cell_emb"], atol=1e-5, rtol=1e-4)
    assert grad_m.keys() == grad_s.keys() and "transformer_encoder.layers.0.self_attn.in_proj_weight" in grad_m
    for name in grad_m: torch.testing.assert_close(grad_s[name], grad_m[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not FLASH_ATTN_AVAILABLE, reason="needs CUDA and the flash-attn extra")
def test_flash_matches_sdpa_on_cuda():
    gene_ids, values, padding = (t.cuda() for t in tokens(length=64, n_pad=(0, 10, 20, 40, 63)))
    model = small_model(d_model=64, nhead=4).cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        assert model.transformer_encoder.layers[0].self_attn.backend(torch.zeros(1, 1, 3, device="cuda", dtype=torch.float16)) == "flash"
        model.attention = "flash"; flash = model(gene_ids, values, padding)
        model.attention = "sdpa"; sdpa = model(gene_ids, values, padding)
    torch.testing.assert_close(flash["mlm_output"][~padding].float(), sdpa["mlm_output"][~padding].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flash["cell_emb"].float(), sdpa["cell_emb"].float(), atol=2e-2, rtol=2e-2)


def test_flash_request_without_flash_falls_back_to_sdpa():
    gene_ids, values, padding = tokens()
    model = small_model(attention="flash").eval()
    reference = small_model(attention="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(gene_ids, values, padding)["cell_emb"], reference(gene_ids, values, padding)["cell_emb"])


# ---------------------------------------------------------------- every style runs forward and backward
STYLES = [dict(input_emb_style=s, cell_emb_style=c, mvc_decoder_style=m)
          for s in ("continuous", "category", "scaling") for c in ("cls", "avg-pool", "w-pool") for m in ("inner product", "concat query", "sum query")]


@pytest.mark.parametrize("style", STYLES, ids=lambda s: "-".join(v.replace(" ", "_") for v in s.values()))
def test_every_input_cell_embedding_and_mvc_style_runs_forward_and_backward(style):
    category = style["input_emb_style"] == "category"
    gene_ids, values, padding = tokens(values_as_bins=51 if category else None)
    if category: values = values.masked_fill(padding, 51)  # category style: pad value = n_bins, its own embedding row
    model = small_model(do_mvc=True, dropout=0.1, n_input_bins=53 if category else None, pad_value=51 if category else -2, **style).train()
    out = model(gene_ids, values, padding, CLS=True, CCE=True, MVC=True, ECS=True)
    assert out["mlm_output"].shape == out["mvc_output"].shape == gene_ids.shape and out["cell_emb"].shape == (5, 32)
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(("encoder.", "transformer_encoder.", "mvc_decoder."))]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_explicit_zero_probabilities_and_batch_labels():
    gene_ids, values, padding = tokens()
    model = small_model(explicit_zero_prob=True, do_mvc=True, use_batch_labels=True, num_batch_labels=3)
    out = model(gene_ids, values, padding, batch_labels=torch.tensor([0, 1, 2, 0, 1]), MVC=True)
    for key in ("mlm_zero_probs", "mvc_zero_probs"): assert ((out[key] > 0) & (out[key] < 1)).all()
    assert model.decoder.fc[0].in_features == 64  # token output ++ batch embedding


def test_pooled_cell_embeddings_ignore_padding():
    "avg-pool and w-pool are functions of the real tokens only: changing what sits in the pads changes nothing."
    gene_ids, values, padding = tokens()
    for style in ("avg-pool", "w-pool"):
        model = small_model(cell_emb_style=style).eval()
        with torch.no_grad():
            a = model(gene_ids, values, padding)["cell_emb"]
            b = model(gene_ids.masked_fill(padding, 5), values.masked_fill(padding, 3.0), padding)["cell_emb"]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- DSBN, gradient reversal
def test_dsbn_normalises_each_cell_with_its_own_batch_in_a_mixed_minibatch():
    "In training mode, a mixed mini-batch gives every cell what a mini-batch of only its own batch gives it."
    gene_ids, values, padding = tokens(batch=6, n_pad=(0, 1, 2, 3, 4, 5))
    labels = torch.tensor([0, 1, 1, 0, 2, 2])
    model = small_model(domain_spec_batchnorm=True, num_batch_labels=3).train()  # dropout 0: the only cross-cell op is DSBN
    mixed = model(gene_ids, values, padding, batch_labels=labels)["cell_emb"]
    for b in range(3):
        cells = labels == b
        alone = model(gene_ids[cells], values[cells], padding[cells], batch_labels=labels[cells])["cell_emb"]
        torch.testing.assert_close(mixed[cells], alone, atol=1e-5, rtol=1e-4)
    assert all(int(bn.num_batches_tracked) > 0 for bn in model.dsbn.bns)


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    (grad_reverse(x, lambd=0.3) * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4, 8), -0.6))
    gene_ids, values, padding = tokens()
    model = small_model(do_dab=True, num_batch_labels=2, dab_lambda=1.0)
    labels = torch.tensor([0, 1, 0, 1, 0])
    cell_emb = model(gene_ids, values, padding, batch_labels=labels)["cell_emb"]
    cell_emb.retain_grad()
    disc = model.grad_reverse_discriminator
    disc_out = disc(cell_emb)
    torch.nn.functional.cross_entropy(disc_out, labels).backward()
    plain = cell_emb.detach().clone().requires_grad_(True)
    disc.reverse_grad = False
    torch.nn.functional.cross_entropy(disc(plain), labels).backward()
    torch.testing.assert_close(cell_emb.grad, -plain.grad)


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    gene_ids, values, padding = tokens()
    model = small_model(do_mvc=True, explicit_zero_prob=True, input_emb_style="continuous", cell_emb_style="avg-pool", norm_scheme="pre").eval()
    save_pretrained(model, tmp_path / "m", VOCAB, n_bins=51)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["args.json", "best_model.pt", "vocab.json"]
    loaded, vocab, args = load_scgpt_checkpoint(tmp_path / "m")
    assert vocab == VOCAB and args["embsize"] == 32 and args["n_bins"] == 51 and loaded.norm_scheme == "pre"
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        a, b = model(gene_ids, values, padding, MVC=True), loaded.eval()(gene_ids, values, padding, MVC=True)
    for key in a: torch.testing.assert_close(a[key], b[key])


def test_checkpoint_errors(tmp_path):
    model = small_model()
    with pytest.raises(FileNotFoundError, match="not a directory"): load_scgpt_checkpoint(tmp_path / "nothing")
    save_pretrained(model, tmp_path / "m", VOCAB)
    (tmp_path / "m" / "best_model.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not be read"): load_scgpt_checkpoint(tmp_path / "m")
    state = model.state_dict() | {"some_new_head.weight": torch.zeros(2)}
    torch.save(state, tmp_path / "m" / "best_model.pt")
    with pytest.raises(ValueError, match="unexpected.*some_new_head"): load_scgpt_checkpoint(tmp_path / "m")


def test_transformer_config_round_trips_and_rebuilds_the_model(tmp_path):
    model = small_model(do_mvc=True, do_dab=True, num_batch_labels=2, domain_spec_batchnorm=True, explicit_zero_prob=True)
    config = model.config
    assert isinstance(config, TransformerConfig) and config.padding_idx == VOCAB["<pad>"] and config.nlayers == 2
    assert TransformerConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config  # through JSON (args.json) and back
    rebuilt = TransformerModel(**asdict(config))  # scGPT's keyword signature, plus padding_idx
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert TransformerModel.from_config(config).state_dict().keys() == model.state_dict().keys()
    save_pretrained(model, tmp_path / "m", VOCAB)
    loaded, _, args = load_scgpt_checkpoint(tmp_path / "m")
    assert loaded.config == config and args["cellmtl_config"] == asdict(config)
    inferred = config_from_state_dict(convert_scgpt_state_dict(model.state_dict()), {"nheads": 4, "dropout": 0.0})
    assert isinstance(inferred, TransformerConfig)
    assert replace(inferred, padding_idx=0, attention="auto") == config  # the architecture is all in the weights
    model.attention = "math"
    assert model.config.attention == "math" and all(layer.self_attn.attention == "math" for layer in model.transformer_encoder.layers)
    with pytest.raises(ValueError, match=r"unknown TransformerConfig field\(s\) \['use_fast'\]"): TransformerConfig.from_dict(asdict(config) | {"use_fast": 1})
    with pytest.raises(ValueError, match="unknown TransformerModel argument"): load_scgpt_checkpoint(tmp_path / "m", d_modell=8)
    with pytest.raises(ValueError, match="has id 0"): TransformerModel(len(VOCAB), d_model=32, nhead=4, vocab=VOCAB, padding_idx=5)
    with pytest.raises(ValueError, match="padding_idx 99 is not a token id"): TransformerConfig(len(VOCAB), padding_idx=99)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors():
    gene_ids, values, padding = tokens()
    model = small_model()
    with pytest.raises(ValueError, match="one value per gene token"): model(gene_ids, values[:, :-1], padding)
    with pytest.raises(ValueError, match="vocabulary size"): model(gene_ids + 100, values, padding)
    with pytest.raises(ValueError, match="only pad tokens"): model(gene_ids, values, torch.ones_like(padding))
    with pytest.raises(ValueError, match="must be bool"): model(gene_ids, values, padding.long())
    with pytest.raises(ValueError, match="batch_labels given"): model(gene_ids, values, padding, batch_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="do_mvc"): model(gene_ids, values, padding, MVC=True)
    with pytest.raises(ValueError, match="need num_batch_labels"): small_model(do_dab=True)
    with pytest.raises(ValueError, match="n_input_bins"): small_model(input_emb_style="category")
    with pytest.raises(ValueError, match="divisible"): small_model(nhead=5)
    with pytest.raises(ValueError, match="attention must be"): small_model(attention="fast")
    dsbn = small_model(domain_spec_batchnorm=True, num_batch_labels=2)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"): dsbn(gene_ids, values, padding, batch_labels=torch.tensor([0, 1, 2, 0, 1]))


# ---------------------------------------------------------------- scGPT's own TransformerModel
def scgpt_reference():
    "scGPT 0.2.4's scgpt/model/{model,dsbn,grad_reverse}.py, loaded without its package __init__ (which needs torchtext etc.)."
    return load_scgpt_modules("scgpt_reference", scgpt_model_source("model.py"), ("dsbn", "grad_reverse", "model"))["model"]


SCGPT_CONFIGS = {
    "continuous-cls-everything": dict(kw=dict(input_emb_style="continuous", cell_emb_style="cls", do_mvc=True, do_dab=True, use_batch_labels=True,
                                             num_batch_labels=3, domain_spec_batchnorm=True, explicit_zero_prob=True), padded=True),
    "category-avgpool-batchnorm": dict(kw=dict(input_emb_style="category", n_input_bins=53, pad_value=51, cell_emb_style="avg-pool",
                                              do_mvc=True, domain_spec_batchnorm="batchnorm"), padded=False),
    "scaling-wpool": dict(kw=dict(input_emb_style="scaling", cell_emb_style="w-pool", do_mvc=True), padded=False),
}


@pytest.mark.parametrize("name", list(SCGPT_CONFIGS))
def test_scgpt_state_dict_loads_strictly_and_gives_the_same_outputs(name, tmp_path):
    reference = scgpt_reference()
    kw, padded = SCGPT_CONFIGS[name]["kw"], SCGPT_CONFIGS[name]["padded"]
    torch.manual_seed(1)
    common = dict(d_model=32, nhead=4, d_hid=64, nlayers=2, nlayers_cls=3, n_cls=4, vocab=VOCAB, dropout=0.1, pad_token="<pad>")
    theirs = reference.TransformerModel(len(VOCAB), **common, **{"pad_value": -2} | kw)
    for module in theirs.modules():  # non-trivial normalisation statistics
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5); module.running_var.uniform_(0.5, 2.0)
    torch.save(theirs.state_dict(), tmp_path / "best_model.pt")

    state = convert_scgpt_state_dict(torch.load(tmp_path / "best_model.pt", weights_only=True))
    ours = TransformerModel(len(VOCAB), **common, **{"pad_value": -2} | kw)
    ours.load_state_dict(state, strict=True)
    inferred = config_from_state_dict(state, {"nheads": 4, "dropout": 0.1})
    for key in ("input_emb_style", "do_mvc", "explicit_zero_prob", "num_batch_labels", "domain_spec_batchnorm", "n_input_bins"):
        if key in kw: assert getattr(inferred, key) == kw[key], key

    category = kw["input_emb_style"] == "category"
    gene_ids, values, padding = tokens(n_pad=(0, 2, 4, 7, 11) if padded else (0,) * 5, values_as_bins=51 if category else None)
    if not padded and not category: values = values.clamp(min=0)  # w-pool: scGPT weights by raw values, so no masks or pads here
    batch = {"batch_labels": torch.full((5,), 2)} if kw.get("use_batch_labels") or kw.get("domain_spec_batchnorm") else {}  # one batch: scGPT normalises by the first cell's
    flags = dict(CLS=True, CCE=kw["cell_emb_style"] != "w-pool", MVC=True)  # scGPT's CCE pass drops the w-pool weights and raises
    theirs.eval(); ours.eval()
    with torch.no_grad():
        expected = theirs(gene_ids, values, padding, **batch, **flags)
        got = ours(gene_ids, values, padding, **batch, **flags)
    assert set(expected) == set(got), (set(expected) ^ set(got))
    keep = ~padding
    for key, want in expected.items():
        have = got[key]
        if want.dim() == 2 and want.shape == padding.shape: want, have = want[keep], have[keep]  # per-token outputs: real tokens
        torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4, msg=f"{name}: {key}")
