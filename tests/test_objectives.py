"""cellmtl.scgpt.objectives: each loss against a hand computation, the combined loss, and training through the engine."""
import math

import pytest
import torch

from cellmtl.scgpt.objectives import DEFAULT_WEIGHTS, OBJECTIVES, TransformerLoss, criterion_neg_log_bernoulli, masked_mse_loss
from cellmtl.train import fit
from cellmtl.scgpt.model import TransformerModel

VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{f"G{i}": i for i in range(3, 40)}}


def batch(n=8, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    gene_ids = torch.randint(3, 40, (n, length), generator=g)
    target = torch.randint(0, 5, (n, length), generator=g).float()
    gene_ids[:, 0], target[:, 0] = 1, 0.0
    padding = torch.arange(length)[None] >= (length - torch.arange(n) % 3)[:, None]
    masked = (torch.rand(n, length, generator=g) < 0.3) & ~padding
    masked[:, 0] = False
    masked[:, 1] = True  # at least one masked position per cell
    return {"gene_ids": gene_ids.masked_fill(padding, 0), "values": target.masked_fill(masked, -1.0).masked_fill(padding, -2.0),
            "target_values": target.masked_fill(padding, -2.0), "src_key_padding_mask": padding,
            "batch_labels": torch.arange(n) % 2, "labels": {"cell_line": torch.arange(n) % 3}}


def model(**kw):
    torch.manual_seed(0)
    return TransformerModel(len(VOCAB), **({"d_model": 16, "nhead": 2, "d_hid": 32, "nlayers": 1, "n_cls": 3, "vocab": VOCAB, "dropout": 0.0} | kw))


def test_masked_losses_match_hand_computation():
    pred, target = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 2.0, 5.0]])
    mask = torch.tensor([[True, False, True]])
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx((1 + 4) / 2)
    p = torch.tensor([[0.9, 0.5, 0.2]])
    assert criterion_neg_log_bernoulli(p, target, mask).item() == pytest.approx(-(math.log(0.1) + math.log(0.2)) / 2, rel=1e-5)
    assert masked_mse_loss(pred, target, torch.zeros_like(mask)).item() == 0.0  # nothing masked: 0, not NaN


def test_combined_loss_is_the_weighted_sum_of_its_terms():
    b = batch()
    m = model(do_mvc=True, do_dab=True, num_batch_labels=2, explicit_zero_prob=True).eval()
    weights = {"ecs": 3.0, "dab": 0.5}
    logs = TransformerLoss(OBJECTIVES, weights=weights, label_key="cell_line")(m, b)
    w = DEFAULT_WEIGHTS | weights
    terms = ["mlm", "mlm_zero", "mvc", "mvc_zero", "cls", "cce", "ecs", "dab"]
    assert set(terms) <= set(logs) and {"acc", "dab_acc"} <= set(logs)
    torch.testing.assert_close(logs["loss"], sum(w[t] * logs[t] for t in terms))
    masked = b["values"].eq(-1)
    with torch.no_grad(): out = m(b["gene_ids"], b["values"], b["src_key_padding_mask"], batch_labels=b["batch_labels"], CLS=True)
    torch.testing.assert_close(logs["mlm"], ((out["mlm_output"] - b["target_values"])[masked] ** 2).mean())
    torch.testing.assert_close(logs["cls"], torch.nn.functional.cross_entropy(out["cls_output"], b["labels"]["cell_line"]))


def test_dab_gradient_reaches_the_encoder_reversed():
    "The discriminator descends the batch loss; the cell embedding (hence the encoder) gets the opposite gradient."
    b = batch()
    m = model(do_dab=True, num_batch_labels=2)
    loss_fn = TransformerLoss(("dab",))
    logs = loss_fn(m, b)
    logs["loss"].backward()
    reversed_grad = m.encoder.embedding.weight.grad.clone()
    m.zero_grad()
    m.grad_reverse_discriminator.reverse_grad = False
    loss_fn(m, b)["loss"].backward()
    torch.testing.assert_close(m.encoder.embedding.weight.grad, -reversed_grad)


def test_missing_requirements_give_clear_errors():
    b = batch()
    with pytest.raises(ValueError, match="do_mvc"): TransformerLoss(("mvc",))(model(), b)
    with pytest.raises(ValueError, match="do_dab"): TransformerLoss(("dab",))(model(), b)
    with pytest.raises(KeyError, match="cell_type"): TransformerLoss(("cls",), label_key="cell_type")(model(), b)
    with pytest.raises(KeyError, match="labels"): TransformerLoss(("cls",))(model(), {k: v for k, v in b.items() if k != "labels"})
    with pytest.raises(ValueError, match="subset"): TransformerLoss(())


def test_training_through_the_engine_lowers_the_masked_error():
    loader = [batch(seed=s) for s in range(4)]
    m = model(do_mvc=True, d_model=32, nhead=4)
    history = fit(m, TransformerLoss(("mlm", "mvc", "cls"), label_key="cell_line"), loader, loader, epochs=25, lr=3e-3,
                  progress=False, seed=0, monitor="val_loss", device="cpu")
    df = history.df
    assert df["val_mlm"].iloc[-1] < 0.6 * df["val_mlm"].iloc[0]
    assert df["val_acc"].max() > 0.5
