"""cellmtl.scgpt.generation: scGPT 0.2.4's TransformerGenerator (perturbation model) reproduced, checked against scGPT's own code.

The reference tests load scGPT's scgpt/model/generation_model.py (found like tests/test_scgpt_model.py finds model.py), build its
generator, save its state dict and load it strictly into ours, then compare outputs. The tests without the `scgpt_generation`
fixture check what ours does differently on purpose (scGPT's defects fixed) and run even when scGPT's source is not installed.

Things about scGPT's generator that shape these tests:
* In eval mode under no_grad, torch's TransformerEncoder takes its fast path and packs the batch into a nested tensor, so
  scGPT's transformer output is exactly 0 at pad positions (with grad enabled it is not). Per-token outputs are therefore
  compared at real tokens only, and "avg-pool" (scGPT's mean runs over every position, pads included) only on unpadded input.
  "w-pool" weights tokens by their values, and the pad value here is 0, so it is well defined with padding.
* With explicit_zero_prob, scGPT's forward switches do_sample on in eval mode (and logs a warning), so mlm_output and mvc_output
  are Bernoulli(zero_probs).sample() * pred. See SCGPT_CONFIGS for how those are compared.
* With mvc_decoder_style "concat query" or "sum query", scGPT's MVCDecoder returns a tensor instead of a dict, and the
  generator's forward(MVC=True) fails indexing it with "pred". Ours is compared with scGPT's decoder called directly.
"""
import importlib.util
import logging
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import pytest
import torch

from cellmtl.scgpt.generation import TransformerGenerator

from conftest import ROOT

VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{f"G{i}": i for i in range(3, 40)}}
COMMON = dict(d_model=32, nhead=4, d_hid=64, nlayers=2, nlayers_cls=3, vocab=VOCAB, dropout=0.1, pad_token="<pad>", pad_value=0,
              pert_pad_id=2)
REFERENCE = "scgpt_generation_reference"  # not test_scgpt_model.py's "scgpt_reference": both may load in one pytest process
pytestmark = [pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),  # torch's fast path (scGPT's side)
              pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning"),  # scGPT's pred_perturb
              pytest.mark.filterwarnings("ignore:.*non-tuple sequence for multidimensional indexing:UserWarning")]  # scGPT's MVC "pred" on a tensor


def inputs(batch=5, length=12, n_pad=(0, 2, 4, 7, 10), seed=0, zero_cell=None):
    """(src, values, flags, padding): <cls> (value 0) first, then gene ids with values >= 0, about a third of them 0 but never
    position 1 (so no cell is all zero unless `zero_cell` asks for it), perturbation flags in {0, 1}; padded tails of n_pad[b]
    tokens with pad id 0, value 0 (the pad_value) and flag 2 (pert_pad_id)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, len(VOCAB), (batch, length), generator=g)
    values = torch.rand(batch, length, generator=g) * 3
    values = values.masked_fill(values < 1.0, 0.0)
    values[:, 1] += 0.5
    flags = torch.randint(0, 2, (batch, length), generator=g)
    src[:, 0], values[:, 0], flags[:, 0] = VOCAB["<cls>"], 0.0, 0
    if zero_cell is not None: values[zero_cell] = 0.0
    padding = torch.arange(length)[None] >= (length - torch.tensor(n_pad[:batch]))[:, None]
    return src.masked_fill(padding, 0), values.masked_fill(padding, 0.0), flags.masked_fill(padding, 2), padding


class PertBatch:
    "What scGPT's pred_perturb reads from a torch_geometric batch: .x (B*G, 2) = [values, perturbation flags], .pert (B names), .to()."
    def __init__(self, x, pert): self.x, self.pert = x, pert

    def to(self, device):
        self.x = self.x.to(device)
        return self


def perturbation_data(batch=3, n_genes=9, seed=0):
    """(values (B, G), flags (B, G), gene_ids (G,) numpy, genes zero in every cell). Genes 1 and 5 are zero in every cell (so
    "batch-wise" drops them), gene 2 only in cell 0 (so it is kept); one or two perturbed genes per cell."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, n_genes, generator=g) * 2 + 0.1
    always_zero = [1, 5]
    values[:, always_zero] = 0.0
    values[0, 2] = 0.0
    flags = torch.zeros(batch, n_genes, dtype=torch.long)
    flags[0, 3] = 1; flags[1, 6] = 1; flags[1, 7] = 1; flags[2, 0] = 1
    gene_ids = np.random.default_rng(seed).permutation(np.arange(3, len(VOCAB)))[:n_genes]  # raw gene position -> vocab id
    return values, flags, gene_ids, always_zero


def as_pert_batch(values, flags):
    return PertBatch(torch.stack([values.reshape(-1), flags.float().reshape(-1)], dim=1), [f"cell{i}" for i in range(len(values))])


def small_generator(seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerGenerator(len(VOCAB), **(COMMON | {"n_cls": 3} | kw))


# ---------------------------------------------------------------- scGPT's own TransformerGenerator
def map_raw_id_to_vocab_id(raw_ids: Union[np.ndarray, torch.Tensor], gene_ids: np.ndarray) -> Union[np.ndarray, torch.Tensor]:
    "A faithful copy of scGPT 0.2.4's scgpt/utils/util.py map_raw_id_to_vocab_id (its scgpt.utils needs more than we have)."
    if isinstance(raw_ids, torch.Tensor):
        device = raw_ids.device
        dtype = raw_ids.dtype
        return_pt = True
        raw_ids = raw_ids.cpu().numpy()
    elif isinstance(raw_ids, np.ndarray):
        return_pt = False
        dtype = raw_ids.dtype
    else:
        raise ValueError("raw_ids must be either torch.Tensor or np.ndarray.")
    if raw_ids.ndim != 1:
        raise ValueError(f"raw_ids must be 1d, got {raw_ids.ndim}d.")
    if gene_ids.ndim != 1:
        raise ValueError(f"gene_ids must be 1d, got {gene_ids.ndim}d.")
    mapped_ids: np.ndarray = gene_ids[raw_ids]
    assert mapped_ids.shape == raw_ids.shape
    if return_pt:
        return torch.from_numpy(mapped_ids).type(dtype).to(device)
    return mapped_ids.astype(dtype)


def scgpt_generation_reference():
    """scGPT 0.2.4's scgpt/model/generation_model.py (and the dsbn, grad_reverse, model modules it imports), loaded without
    scGPT's package __init__ files (which need torchtext etc.). generation_model.py imports `.model`, `..utils` and `..`
    (for `logger`), so it lives in a two-level stand-in package: REFERENCE (a `logger`, a `utils` holding only
    map_raw_id_to_vocab_id) with the subpackage REFERENCE.model pointing at scgpt/model."""
    env = os.environ.get("CELLMTL_SCGPT_REFERENCE")
    root = Path(env) if env else ROOT / ".venv" / "reference" / "scgpt-0.2.4"
    source = root / "scgpt" / "model"
    if not (source / "generation_model.py").exists():
        if env: pytest.fail(f"{source / 'generation_model.py'} is missing; `make reference` installs it")
        pytest.skip("scGPT's source is not installed; run `make reference` (make test does)")
    if f"{REFERENCE}.model.generation_model" in sys.modules: return sys.modules[f"{REFERENCE}.model.generation_model"]
    top = types.ModuleType(REFERENCE); top.__path__ = [str(root / "scgpt")]
    top.logger = logging.getLogger(REFERENCE)
    utils = types.ModuleType(f"{REFERENCE}.utils"); utils.map_raw_id_to_vocab_id = map_raw_id_to_vocab_id
    subpackage = types.ModuleType(f"{REFERENCE}.model"); subpackage.__path__ = [str(source)]
    top.utils, top.model = utils, subpackage
    sys.modules.update({REFERENCE: top, utils.__name__: utils, subpackage.__name__: subpackage})
    for name in ("dsbn", "grad_reverse", "model", "generation_model"):
        spec = importlib.util.spec_from_file_location(f"{REFERENCE}.model.{name}", source / f"{name}.py")
        module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash_attn is not installed"
            spec.loader.exec_module(module)
        setattr(subpackage, name, module)
    return sys.modules[f"{REFERENCE}.model.generation_model"]


@pytest.fixture(scope="module")
def scgpt_generation():
    return scgpt_generation_reference()


def reference_pair(reference, tmp_path, **kw):
    "scGPT's generator built with seed 1 and these arguments, its state dict saved and loaded strictly into ours; both in eval mode."
    args = COMMON | {"n_cls": 3} | kw
    torch.manual_seed(1)
    theirs = reference.TransformerGenerator(len(VOCAB), **args)
    torch.save(theirs.state_dict(), tmp_path / "best_model.pt")
    state = torch.load(tmp_path / "best_model.pt", weights_only=True)
    ours = TransformerGenerator(len(VOCAB), **args)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert ours_shapes.keys() == theirs_shapes.keys(), sorted(ours_shapes.keys() ^ theirs_shapes.keys())
    assert ours_shapes == theirs_shapes, {k: (ours_shapes[k], theirs_shapes[k]) for k in ours_shapes if ours_shapes[k] != theirs_shapes[k]}
    ours.load_state_dict(state, strict=True)
    return theirs.eval(), ours.eval()


# explicit-zero-prob: in eval mode scGPT samples mlm_output (and mvc_output) as Bernoulli(zero_probs).sample() * pred even with
# do_sample=False. The zero probabilities are deterministic and compared as they are; for the sampled outputs the torch seed is
# set to the same value right before each model's call. Nothing else draws random numbers in eval mode (dropout is off), so
# a faithful port, which draws the same (B, L) Bernoulli samples in the same order (mlm, then mvc), gets the same masks from
# probabilities that agree to ~1e-7, and then the same values. That checks pred (where the mask is 1), the masks and the
# eval-mode do_sample switch together; a plain (non-sampled) comparison of pred would need to monkeypatch scGPT's module.
SCGPT_CONFIGS = {
    "plain": dict(kw={}),
    "mvc-inner-product": dict(kw=dict(do_mvc=True, mvc_decoder_style="inner product")),
    "mvc-concat-query": dict(kw=dict(do_mvc=True, mvc_decoder_style="concat query")),
    "mvc-sum-query": dict(kw=dict(do_mvc=True, mvc_decoder_style="sum query")),
    "explicit-zero-prob": dict(kw=dict(explicit_zero_prob=True, do_mvc=True)),
    "relu-decoder-one-class": dict(kw=dict(decoder_activation="ReLU", n_cls=1)),
    "adaptive-bias": dict(kw=dict(decoder_adaptive_bias=True)),
    "avg-pool": dict(kw=dict(cell_emb_style="avg-pool", do_mvc=True), padded=False),
    "w-pool": dict(kw=dict(cell_emb_style="w-pool", do_mvc=True)),
}


@pytest.mark.parametrize("name", list(SCGPT_CONFIGS))
def test_scgpt_generator_state_dict_loads_strictly_and_gives_the_same_outputs(name, tmp_path, scgpt_generation, caplog):
    config = SCGPT_CONFIGS[name]
    kw = config["kw"]
    theirs, ours = reference_pair(scgpt_generation, tmp_path, **kw)
    src, values, flags, padding = inputs(n_pad=(0, 2, 4, 7, 10) if config.get("padded", True) else (0,) * 5)
    mvc = kw.get("do_mvc", False)
    mvc_returns_a_tensor = kw.get("mvc_decoder_style") in ("concat query", "sum query")
    with torch.no_grad():
        torch.manual_seed(7)
        expected = theirs(src, values, flags, padding, CLS=True, MVC=mvc and not mvc_returns_a_tensor, ECS=True)
        torch.manual_seed(7)
        got = ours(src, values, flags, padding, CLS=True, MVC=mvc, ECS=True)
        if mvc_returns_a_tensor:  # scGPT's forward indexes the decoder's tensor with "pred"; its decoder itself works
            with pytest.raises((IndexError, TypeError)): theirs(src, values, flags, padding, MVC=True)
            cell_emb = theirs._get_cell_emb_from_layer(theirs._encode(src, values, flags, padding), values)
            expected["mvc_output"] = theirs.mvc_decoder(cell_emb, theirs.cur_gene_token_embs)
    assert set(expected) <= set(got), sorted(set(expected) - set(got))  # ours may return more (cell_emb)
    keep = ~padding
    for key, want in expected.items():
        have = got[key]
        assert have.shape == want.shape, (key, have.shape, want.shape)
        if want.dim() == 2 and want.shape == padding.shape: want, have = want[keep], have[keep]  # per-token outputs: real tokens
        if key == "loss_ecs":  # scGPT averages over all B² pairs, its B zeroed diagonal terms (each 1 − thr²) included;
            B, thr = len(src), ours.ecs_threshold  # ours (the family's ECS) averages over the B(B − 1) pairs of different cells
            want = (want * B * B - B * (1 - thr ** 2)) / (B * (B - 1))
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
    assert expected["cls_output"].shape == (5, kw.get("n_cls", 3))
    if kw.get("explicit_zero_prob"):
        sampled = expected["mlm_output"][keep]
        assert (sampled == 0).any() and (sampled != 0).any()  # the masks were really drawn: both outcomes occur
        assert "Auto set do_sample" in caplog.text  # scGPT's eval-mode switch, which the seeded comparison relies on


@pytest.mark.parametrize("mode", ["all", "batch-wise"])
@pytest.mark.parametrize("kw", [{}, dict(explicit_zero_prob=True)], ids=["plain", "explicit-zero-prob"])
def test_pred_perturb_matches_scgpt(mode, kw, tmp_path, scgpt_generation):
    "Both take a torch_geometric-style batch; ours takes a dict too. Same seed before each call (do_sample=True inside)."
    theirs, ours = reference_pair(scgpt_generation, tmp_path, **kw)
    values, flags, gene_ids, always_zero = perturbation_data()
    torch.manual_seed(3)
    expected = theirs.pred_perturb(as_pert_batch(values, flags), include_zero_gene=mode, gene_ids=gene_ids, amp=False).detach()
    torch.manual_seed(3)
    got = ours.pred_perturb(as_pert_batch(values, flags), include_zero_gene=mode, gene_ids=gene_ids, amp=False).detach()
    torch.manual_seed(3)
    got_dict = ours.pred_perturb({"values": values, "pert_flags": flags}, include_zero_gene=mode, gene_ids=gene_ids, amp=False)
    assert expected.shape == got.shape == values.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_dict.detach(), expected, atol=1e-5, rtol=1e-4)
    if mode == "batch-wise":  # genes zero in every cell are not fed to the model and predicted as 0
        assert (expected[:, always_zero] == 0).all() and (got[:, always_zero] == 0).all()
        assert (expected[:, 2] != 0).any()  # zero in one cell only: kept
    elif not kw:
        assert (expected[:, always_zero] != 0).all()  # "all" feeds every gene


def test_scgpt_adaptive_bias_divides_by_zero_on_an_all_zero_cell_and_ours_does_not(tmp_path, scgpt_generation):
    "scGPT scales the bias by sum(values) / count(values != 0): 0/0 for a cell whose values are all 0."
    theirs, ours = reference_pair(scgpt_generation, tmp_path, decoder_adaptive_bias=True)
    src, values, flags, padding = inputs(zero_cell=2)
    with torch.no_grad():
        expected, got = theirs(src, values, flags, padding)["mlm_output"], ours(src, values, flags, padding)["mlm_output"]
    assert not torch.isfinite(expected[2][~padding[2]]).any()  # scGPT's defect, documented
    assert torch.isfinite(got[~padding]).all()
    others = torch.arange(5) != 2
    torch.testing.assert_close(got[others][~padding[others]], expected[others][~padding[others]], atol=1e-5, rtol=1e-4)


def test_scgpt_encode_batch_forgets_the_flags_and_ours_matches_its_encoder(tmp_path, scgpt_generation):
    theirs, ours = reference_pair(scgpt_generation, tmp_path)
    src, values, flags, padding = inputs()
    with torch.no_grad():
        with pytest.raises(TypeError):  # scGPT's encode_batch calls _encode(src, values, mask): input_pert_flags is missing
            theirs.encode_batch(src, values, padding, 2)
        expected = theirs._encode(src, values, flags, padding)
        got = ours.encode_batch(src, values, flags, padding, 2)
    assert got.shape == expected.shape == (5, 12, 32)
    torch.testing.assert_close(got[~padding], expected[~padding], atol=1e-5, rtol=1e-4)


def test_scgpt_pred_perturb_fails_obscurely_on_an_unknown_mode(tmp_path, scgpt_generation):
    theirs, _ = reference_pair(scgpt_generation, tmp_path)
    values, flags, gene_ids, _ = perturbation_data()
    with pytest.raises(UnboundLocalError):  # scGPT returns a variable only the two known modes assign
        theirs.pred_perturb(as_pert_batch(values, flags), include_zero_gene="none", gene_ids=gene_ids, amp=False)


# ---------------------------------------------------------------- ours only (no scGPT source needed)
def test_adaptive_bias_gives_finite_outputs_on_an_all_zero_cell():
    model = small_generator(decoder_adaptive_bias=True).eval()
    src, values, flags, padding = inputs(zero_cell=2)
    with torch.no_grad():
        out = model(src, values, flags, padding, CLS=True)["mlm_output"]
        others = torch.arange(5) != 2
        alone = model(src[others], values[others], flags[others], padding[others])["mlm_output"]
    assert torch.isfinite(out[~padding]).all()
    torch.testing.assert_close(out[others][~padding[others]], alone[~padding[others]], atol=1e-5, rtol=1e-4)  # cells are independent


def test_encode_batch_uses_the_perturbation_flags_and_any_batch_size():
    model = small_generator().eval()
    src, values, flags, padding = inputs()
    with torch.no_grad():
        chunked = model.encode_batch(src, values, flags, padding, 2)
        whole = model.encode_batch(src, values, flags, padding, 5)
        flipped = model.encode_batch(src, values, torch.where(padding, flags, 1 - flags), padding, 5)
    assert chunked.shape == (5, 12, 32) and chunked.device.type == "cpu"
    torch.testing.assert_close(chunked[~padding], whole[~padding], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(flipped[~padding], whole[~padding], atol=1e-3)  # the flags reach the encoder


def test_pred_perturb_takes_a_batch_object_or_a_dict_and_drops_all_zero_genes_batch_wise():
    model = small_generator()
    values, flags, gene_ids, always_zero = perturbation_data()
    for mode in ("all", "batch-wise"):
        from_batch = model.pred_perturb(as_pert_batch(values, flags), include_zero_gene=mode, gene_ids=gene_ids, amp=False)
        from_dict = model.pred_perturb({"values": values, "pert_flags": flags}, include_zero_gene=mode, gene_ids=gene_ids, amp=False)
        assert from_batch.shape == from_dict.shape == values.shape
        torch.testing.assert_close(from_dict.detach(), from_batch.detach())
        zero_genes = from_batch.detach()[:, always_zero]
        assert (zero_genes == 0).all() if mode == "batch-wise" else (zero_genes != 0).all()
    assert model.training  # pred_perturb runs in eval mode and gives the model back in its mode (scGPT's leaves it in eval mode)


@pytest.mark.parametrize("mode", ["none", "gene-wise"])
def test_pred_perturb_rejects_an_unknown_mode_naming_the_two_it_knows(mode):
    model = small_generator()
    values, flags, gene_ids, _ = perturbation_data()
    with pytest.raises(ValueError) as error:
        model.pred_perturb(as_pert_batch(values, flags), include_zero_gene=mode, gene_ids=gene_ids, amp=False)
    assert "all" in str(error.value) and "batch-wise" in str(error.value), str(error.value)


def test_flags_and_values_of_different_shapes_are_rejected():
    model = small_generator().eval()
    src, values, flags, padding = inputs()
    with pytest.raises(ValueError): model(src, values, flags[:, :-1], padding)
    with pytest.raises(ValueError): model(src, values, flags[:-1], padding)
    values_g, flags_g, gene_ids, _ = perturbation_data()
    with pytest.raises(ValueError):
        model.pred_perturb({"values": values_g, "pert_flags": flags_g[:, :-1]}, include_zero_gene="all", gene_ids=gene_ids, amp=False)
