"""cellmtl.scgpt.multiomic: scGPT 0.2.4's MultiOmicTransformerModel reproduced, checked against scGPT's own code.

scGPT's scgpt/model/multiomic_model.py is loaded without its package __init__ (as tests/test_scgpt_model.py loads model.py), its
model is built and its state dict saved, loaded strictly into ours and the outputs compared in eval mode. What shapes the tests:
* In eval mode under no_grad, torch's TransformerEncoder packs a padded batch into a nested tensor, so scGPT's transformer output is
  0 at pad positions. Per-token outputs are compared at real tokens; "avg-pool" (scGPT averages over every position, pads included)
  only on unpadded input.
* ECS: scGPT averages over all B² similarities with the diagonal zeroed, ours over the B(B − 1) pairs; the test converts.
* scGPT's DSBN normalises the whole batch with the first cell's batch, so the DSBN case gives every cell the same batch.
* With "w-pool", scGPT's MVC and CCE branches pool without the weights and raise; that case runs without MVC and CCE.
"""
import warnings

import pytest
import torch

from cellmtl.scgpt.multiomic import MultiOmicTransformerModel

from conftest import load_scgpt_modules, scgpt_model_source

VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{f"G{i}": i for i in range(3, 40)}}
MOD_VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, "RNA": 3, "Protein": 4, "ATAC": 5}
REFERENCE = "scgpt_multiomic_reference"  # its own package name: other test files load scGPT's modules under theirs
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")


@pytest.fixture(scope="module")
def scgpt_multiomic():
    "scGPT 0.2.4's scgpt/model/{dsbn,grad_reverse,multiomic_model}.py as a package of their own."
    source = scgpt_model_source("multiomic_model.py")
    return load_scgpt_modules(REFERENCE, source, ("dsbn", "grad_reverse", "multiomic_model"))["multiomic_model"]


def inputs(batch=5, length=12, n_pad=(0, 2, 4, 7, 10), seed=0, bins=None):
    "(gene_ids, values, padding, mod_types): <cls> first, RNA tokens then protein then ATAC tokens, padded tails of n_pad[b] tokens."
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(3, len(VOCAB), (batch, length), generator=g)
    values = torch.randint(1, bins, (batch, length), generator=g).float() if bins else torch.rand(batch, length, generator=g) * 4
    if not bins: values[:, 3] = -1.0  # a masked position
    mod_types = torch.full((batch, length), MOD_VOCAB["RNA"])
    mod_types[:, 6:9], mod_types[:, 9:] = MOD_VOCAB["Protein"], MOD_VOCAB["ATAC"]
    gene_ids[:, 0], values[:, 0], mod_types[:, 0] = 1, 0.0, MOD_VOCAB["<cls>"]
    padding = torch.arange(length)[None] >= (length - torch.tensor(n_pad[:batch]))[:, None]
    return gene_ids.masked_fill(padding, 0), values.masked_fill(padding, -2.0), padding, mod_types.masked_fill(padding, 0)


CONFIGS = {
    "modalities-cls-mvc": dict(kw=dict(use_mod=True, do_mvc=True), padded=True, flags=dict(CLS=True, CCE=True, MVC=True, ECS=True)),
    "modalities-batches-dsbn-dab-zero": dict(kw=dict(use_mod=True, do_mvc=True, use_batch_labels=True, num_batch_labels=3, domain_spec_batchnorm=True,
                                                    do_dab=True, explicit_zero_prob=True), padded=True, flags=dict(CLS=True, CCE=True, MVC=True)),
    "batches-only-mvc": dict(kw=dict(do_mvc=True, use_batch_labels=True, num_batch_labels=3), padded=True, flags=dict(MVC=True)),
    "modalities-category-avgpool": dict(kw=dict(use_mod=True, do_mvc=True, input_emb_style="category", n_input_bins=53, pad_value=51,
                                               cell_emb_style="avg-pool", domain_spec_batchnorm="batchnorm"), padded=False,
                                        flags=dict(CLS=True, CCE=True, MVC=True, ECS=True)),
    "modalities-scaling-wpool": dict(kw=dict(use_mod=True, input_emb_style="scaling", cell_emb_style="w-pool"), padded=False, flags=dict(CLS=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scgpt_state_dict_loads_strictly_and_gives_the_same_outputs(scgpt_multiomic, name, tmp_path):
    case = CONFIGS[name]
    kw = {"pad_value": -2} | case["kw"]
    mods = dict(vocab_mod=MOD_VOCAB, ntokens_mod=len(MOD_VOCAB)) if kw.get("use_mod") else {}
    common = dict(d_model=32, nhead=4, d_hid=64, nlayers=2, nlayers_cls=3, n_cls=4, vocab=VOCAB, dropout=0.1, pad_token="<pad>")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = scgpt_multiomic.MultiOmicTransformerModel(len(VOCAB), **common, **kw, **mods)
    for module in theirs.modules():  # non-trivial normalisation statistics
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5); module.running_var.uniform_(0.5, 2.0)
    torch.save(theirs.state_dict(), tmp_path / "best_model.pt")
    ours = MultiOmicTransformerModel(len(VOCAB), **common, **kw, **mods)
    ours.load_state_dict(torch.load(tmp_path / "best_model.pt", weights_only=True), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}

    category = kw.get("input_emb_style") == "category"
    gene_ids, values, padding, mod_types = inputs(n_pad=(0, 2, 4, 7, 10) if case["padded"] else (0,) * 5, bins=51 if category else None)
    if kw.get("cell_emb_style") == "w-pool": values = values.clamp(min=0)  # scGPT weights by the raw values
    extra = {"batch_labels": torch.full((5,), 2)} if kw.get("use_batch_labels") or kw.get("domain_spec_batchnorm") else {}  # scGPT asserts them for any batch norm
    if kw.get("use_mod"): extra["mod_types"] = mod_types
    theirs.eval(); ours.eval()
    with torch.no_grad():
        expected = theirs(gene_ids, values, padding, **extra, **case["flags"])
        got = ours(gene_ids, values, padding, **extra, **case["flags"])
    assert set(expected) == set(got), set(expected) ^ set(got)
    keep = ~padding
    for key, want in expected.items():
        have = got[key]
        if want.dim() == 2 and want.shape == padding.shape: want, have = want[keep], have[keep]  # per-token outputs: real tokens
        if key == "loss_ecs":  # scGPT averages over all B² entries with a zeroed diagonal, ours over the B(B - 1) pairs (31_model)
            n = len(gene_ids); have = (n * (n - 1) * have + n * (1 - 0.3 ** 2)) / n ** 2
        torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_the_modality_embedding_changes_the_decoders_not_the_transformer(scgpt_multiomic):
    "In both implementations: relabelling protein tokens as RNA leaves cell_emb unchanged and moves mlm_output."
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = scgpt_multiomic.MultiOmicTransformerModel(len(VOCAB), 32, 4, 64, 2, vocab=VOCAB, use_mod=True, ntokens_mod=len(MOD_VOCAB),
                                                          vocab_mod=MOD_VOCAB, pad_value=-2).eval()
    ours = MultiOmicTransformerModel(len(VOCAB), 32, 4, 64, 2, vocab=VOCAB, use_mod=True, vocab_mod=MOD_VOCAB, pad_value=-2).eval()
    ours.load_state_dict(theirs.state_dict())
    gene_ids, values, padding, mod_types = inputs(n_pad=(0,) * 5)
    relabelled = mod_types.masked_fill(mod_types == MOD_VOCAB["Protein"], MOD_VOCAB["RNA"])
    for model in (theirs, ours):
        with torch.no_grad():
            a, b = model(gene_ids, values, padding, mod_types=mod_types), model(gene_ids, values, padding, mod_types=relabelled)
        torch.testing.assert_close(a["cell_emb"], b["cell_emb"])
        assert (a["mlm_output"][:, 6:9] - b["mlm_output"][:, 6:9]).abs().min() > 0
