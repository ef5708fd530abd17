"""Checkpoint robustness of cellmtl.train: atomic writes, crash + resume, clear errors for unusable files."""
import math, pickle, warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cellmtl.train as train
from cellmtl.train import CheckpointError, fit, load_checkpoint, save_checkpoint, seed_everything


class Loader:
    "Dict batches of two seeded blobs; the order is a pure function of (seed, epoch)."
    def __init__(self, n=256, seed=0, batch_size=32, shuffle=True):
        generator = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=generator)
        self.x = torch.randn(n, 2, generator=generator) + (2 * self.y[:, None] - 1)  # (n, 2)
        self.batch_size, self.shuffle, self.epoch = batch_size, shuffle, 0
    def set_epoch(self, epoch): self.epoch = epoch
    def __len__(self): return math.ceil(len(self.x) / self.batch_size)
    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch)) if self.shuffle else torch.arange(len(self.x))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield {"x": self.x[index], "y": self.y[index]}


def loss_fn(model, batch):
    return {"loss": F.cross_entropy(model(batch["x"]), batch["y"])}


def make_model(seed):
    seed_everything(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


CONFIG = dict(epochs=6, lr=0.05, lr_schedule="plateau", lr_patience=0, lr_factor=0.5, warmup_epochs=1,
              checkpoint_every=1, tensorboard=False, seed=5)


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", weights=torch.arange(3.0), epoch=1)
    def crash_midway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(train.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, weights=torch.zeros(3), epoch=2)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temporary file was removed


def test_crash_then_resume_matches_uninterrupted_run(tmp_path):
    train_loader, val_loader = Loader(seed=0), Loader(seed=1, shuffle=False)
    reference = make_model(0)
    fit(reference, loss_fn, train_loader, val_loader, checkpoint_dir=tmp_path / "reference", **CONFIG)

    def crashing_loss(model, batch):  # the job dies in the middle of epoch 3
        if model.training and train_loader.epoch == 3: raise RuntimeError("simulated crash")
        return loss_fn(model, batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(make_model(0), crashing_loss, train_loader, val_loader, checkpoint_dir=tmp_path / "run", **CONFIG)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2

    resumed = make_model(99)  # fresh weights: the checkpoint must provide everything
    history = fit(resumed, loss_fn, train_loader, val_loader, checkpoint_dir=tmp_path / "run", resume=True, **CONFIG)
    assert len(history) == 6
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert history.df["lr"].min() < CONFIG["lr"]  # the plateau schedule was active


def test_truncated_checkpoint_names_the_file_and_alternatives(tmp_path):
    seed_everything(0)
    fit(nn.Linear(2, 2), loss_fn, Loader(), Loader(seed=1), epochs=2, lr=0.05, checkpoint_dir=tmp_path, tensorboard=False)
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        fit(nn.Linear(2, 2), loss_fn, Loader(), Loader(seed=1), epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert str(last) in str(error.value) and "best.pt" in str(error.value)


class NotTensors:  # a foreign pickled object
    pass


def test_foreign_and_future_files_are_rejected(tmp_path):
    with open(tmp_path / "foreign.pt", "wb") as file: torch.save({"thing": NotTensors()}, file, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not a cellmtl checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a cellmtl checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")
    path = save_checkpoint(tmp_path / "future.pt", epoch=0)
    state = torch.load(path, weights_only=True)
    state["format_version"] = 99
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="upgrade cellmtl"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="adds"):
        save_checkpoint(tmp_path / "x.pt", format="mine")


def test_resume_checks_the_checkpoint_kind_and_the_options(tmp_path):
    plain = save_checkpoint(tmp_path / "weights_only.pt", model=nn.Linear(2, 2).state_dict())
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        fit(nn.Linear(2, 2), loss_fn, Loader(), epochs=2, monitor="train_loss", resume=plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        fit(nn.Linear(2, 2), loss_fn, Loader(), epochs=2, monitor="train_loss", resume=tmp_path / "missing.pt")
    seed_everything(0)
    fit(nn.Linear(2, 2), loss_fn, Loader(), epochs=2, lr=0.05, monitor="train_loss", checkpoint_dir=tmp_path / "run")
    with pytest.warns(UserWarning, match="changed options"):
        fit(nn.Linear(2, 2), loss_fn, Loader(), epochs=3, lr=0.01, monitor="train_loss",
            checkpoint_dir=tmp_path / "run", resume=True)


def test_diverging_training_stops_with_a_clear_error(tmp_path):
    def nan_loss(model, batch):
        return {"loss": model(batch["x"]).sum() * float("nan")}
    with pytest.raises(FloatingPointError, match="training diverged"):
        fit(nn.Linear(2, 2), nan_loss, Loader(), epochs=2, monitor="train_loss", checkpoint_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()  # nothing written from a diverged epoch
