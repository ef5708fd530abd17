"""cellmtl.train: the cosine LR schedule and epoch-level validation metrics (e.g. AUC) through `fit`."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from cellmtl.train import CosineSchedule, fit


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    return [{"x": x[i:i + 16], "y": y[i:i + 16]} for i in range(0, n, 16)]


def _loss(model, batch):
    logits = model(batch["x"])
    return {"loss": nn.functional.cross_entropy(logits, batch["y"])}


def _auc(model, loader, device):
    "Rank AUC of class 1 over the whole loader: not a mean over batches."
    scores, labels = [], []
    for batch in loader:
        scores.append(model(batch["x"].to(device)).softmax(1)[:, 1].cpu()); labels.append(batch["y"])
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    ranks = s.argsort().argsort() + 1
    n1, n0 = y.sum(), len(y) - y.sum()
    return {"auc": (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0), "calls": 1}


def test_fit_follows_the_cosine_schedule():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    history = fit(model, _loss, _data(), epochs=6, lr=0.1, lr_schedule="cosine", warmup_epochs=1, min_lr=0.01, device="cpu", monitor="train_loss")
    expected = [0.1 * 0.5] + [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    np.testing.assert_allclose(history.df["lr"].to_numpy(), expected, rtol=1e-9)
    assert history.df["lr"].iloc[-1] == pytest.approx(0.01)


def test_epoch_metrics_are_logged_and_can_select_the_best_epoch():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    train, val = _data(seed=0), _data(seed=1)
    history = fit(model, _loss, train, val, epochs=5, lr=0.05, epoch_metrics=_auc, monitor="val_auc", mode="max", device="cpu")
    assert {"val_auc", "val_calls", "val_loss"} <= set(history.df.columns)
    assert history.best_epoch == int(history.df["val_auc"].to_numpy().argmax())
    with torch.no_grad(): restored = _auc(model.eval(), val, "cpu")["auc"]
    np.testing.assert_allclose(restored, history.df["val_auc"].max(), rtol=1e-6)  # the best epoch's weights are restored
    assert model.training is False


def test_epoch_metrics_errors():
    with pytest.raises(ValueError, match="epoch_metrics"):
        fit(nn.Linear(4, 2), _loss, _data(), epochs=1, epoch_metrics="auc", device="cpu", monitor="train_loss")
    with pytest.raises(TypeError, match="must return a dict"):
        fit(nn.Linear(4, 2), _loss, _data(), _data(seed=1), epochs=1, epoch_metrics=lambda m, l, d: 0.5, device="cpu")


def test_cosine_resume_continues_the_curve(tmp_path):
    torch.manual_seed(0)
    full = fit(nn.Linear(4, 2), _loss, _data(), epochs=6, lr=0.1, lr_schedule="cosine", device="cpu", monitor="train_loss", seed=3)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    fit(model, _loss, _data(), epochs=3, lr=0.1, lr_schedule="cosine", device="cpu", monitor="train_loss", seed=3, checkpoint_dir=tmp_path)
    # a run of 6 epochs resumed from the 3-epoch run's last.pt: the curve of a 6-epoch run from its epoch 3 on
    resumed = fit(model, _loss, _data(), epochs=6, lr=0.1, lr_schedule="cosine", device="cpu", monitor="train_loss", seed=3,
                  checkpoint_dir=tmp_path, resume=True)
    schedule = CosineSchedule(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), epochs=6)
    lrs = []
    for epoch in range(6): lrs.append(schedule.optimizer.param_groups[0]["lr"]); schedule.step(epoch)
    np.testing.assert_allclose(full.df["lr"].to_numpy(), lrs, rtol=1e-9)
    assert len(resumed.df) == 6
    np.testing.assert_allclose(resumed.df["lr"].to_numpy()[3:], lrs[3:], rtol=1e-9)
