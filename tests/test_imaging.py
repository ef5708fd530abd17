"""cellmtl.imaging: time targets, the multi-task ResNet and its weight loader, the loss, the metrics, the time-lapse data
(manifest, stacks, dataset, splits, loader) and MultiTaskImageModel on tiny TIFF stacks written here with tifffile."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import torch.nn.functional as F
import torchvision
from sklearn import metrics as skm
from torch import nn

import cellmtl
from cellmtl.base import KINDS
from cellmtl.imaging import (BACKBONES, MANIFEST_COLUMNS, FrameLoader, MultiTaskImageModel, MultiTaskLoss, MultiTaskResNet,
                             TimeCourseDataset, build_multitask_targets, classification_metrics, load_backbone_weights,
                             multitask_metrics, read_manifest, read_stack, regression_metrics, scale_frames, split_stacks)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------- helpers

def _write_stack(path, frames, axes="TYX"):
    "An ImageJ TIFF with the given axes (tifffile reads them back as the series' axes)."
    tifffile.imwrite(path, np.asarray(frames), imagej=True, metadata={"axes": axes})
    return path


def _write_wells(folder, wells, n_frames=6, size=32, frames_per_hour=2.0, channels=1, seed=0, name="manifest.csv"):
    """One stack per (infected, onset) in `wells`: noise around 100, plus a bright 6×6 spot (at a random place) from the
    onset's frame on in infected wells; channel 1 (when asked) is a top-to-bottom gradient. Returns the manifest's path."""
    rng = np.random.default_rng(seed)
    rows = []
    for well, (infected, onset) in enumerate(wells):
        frames = rng.normal(100, 5, (n_frames, size, size))  # (T, Y, X)
        if infected:
            y, x = rng.integers(2, size - 8, 2)
            frames[int(round(onset * frames_per_hour)):, y:y + 6, x:x + 6] += 200
        if channels == 2:
            gradient = np.broadcast_to(np.linspace(50, 350, size)[:, None], (size, size))
            frames = np.stack([frames, gradient + rng.normal(0, 5, frames.shape)], 1)  # (T, C, Y, X)
        _write_stack(folder / f"well{well}.tif", frames.astype(np.uint16), "TCYX" if channels == 2 else "TYX")
        rows.append({"path": f"well{well}.tif", "infected": infected, "infection_onset_hour": onset,
                     "frames_per_hour": frames_per_hour, "group": f"well{well}"})
    pd.DataFrame(rows).to_csv(folder / name, index=False)
    return folder / name


FOUR_WELLS = [(True, 1.0), (True, 2.0), (False, None), (False, None)]


@pytest.fixture(scope="module")
def four_wells(tmp_path_factory):
    "A manifest of 2 infected wells (onset 1 h and 2 h) and 2 mock wells, 6 frames of 2 channels at 2 frames per hour."
    return _write_wells(tmp_path_factory.mktemp("four_wells"), FOUR_WELLS, channels=2)


@pytest.fixture(scope="module")
def four_well_set(four_wells):
    return TimeCourseDataset(four_wells, image_size=16)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    "A state dict saved from torchvision's own ResNet-18 (random weights stand in for ImageNet's): (path, the network)."
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(rgb.state_dict(), path)
    return path, rgb


def _backbone_state(network):
    return {k: v for k, v in network.state_dict().items() if not k.startswith("fc.")}


def _assert_same_state(loaded, expected):
    assert set(loaded) == set(expected)
    for k in expected: torch.testing.assert_close(loaded[k], expected[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------------------- 1. targets

HOURS = np.array([0, 2, 4, 6, 0, 2, 4, 6], float)
INFECTED = np.array([True] * 4 + [False] * 4)


def test_targets_design_rule_vs_old_rule():
    design = build_multitask_targets(HOURS, INFECTED, 3.0)
    old = build_multitask_targets(HOURS, INFECTED, 3.0, rule="uninfected_zero")
    np.testing.assert_array_equal(design, [0, 0, 1, 3, 0, 2, 4, 6])  # infected: hours since onset (0 before); mock: hours since start
    np.testing.assert_array_equal(old, [0, 0, 1, 3, 0, 0, 0, 0])  # the old rule: 0 for every mock sample
    assert design.dtype == np.float32 and old.dtype == np.float32


def test_targets_array_onset_is_per_sample_and_matches_a_scalar():
    onset = np.array([1.0, 1.0, 5.0, 5.0, 9.0, 9.0, 9.0, 9.0])  # mock entries are ignored
    np.testing.assert_array_equal(build_multitask_targets(HOURS, INFECTED, onset), [0, 1, 0, 1, 0, 2, 4, 6])
    np.testing.assert_array_equal(build_multitask_targets(HOURS, INFECTED, np.full(8, 3.0)), build_multitask_targets(HOURS, INFECTED, 3.0))
    np.testing.assert_array_equal(build_multitask_targets(HOURS, INFECTED.astype(int), 3.0), build_multitask_targets(HOURS, INFECTED, 3.0))


def test_targets_clamping():
    np.testing.assert_array_equal(build_multitask_targets(HOURS, INFECTED, 3.0, clamp=(0, 2)), [0, 0, 1, 2, 0, 2, 2, 2])
    np.testing.assert_array_equal(build_multitask_targets(HOURS, INFECTED, 3.0, clamp=(1, None)), [1, 1, 1, 3, 1, 2, 4, 6])
    np.testing.assert_array_equal(build_multitask_targets(HOURS, INFECTED, 3.0, clamp=(None, 4)), [0, 0, 1, 3, 0, 2, 4, 4])
    np.testing.assert_array_equal(build_multitask_targets(HOURS, INFECTED, 3.0, clamp=None), [0, 0, 1, 3, 0, 2, 4, 6])


def test_targets_nan_onset_is_fine_for_uninfected_samples():
    onset = np.r_[[3.0] * 4, [np.nan] * 4]
    targets = build_multitask_targets(HOURS, INFECTED, onset)
    assert np.isfinite(targets).all()
    np.testing.assert_array_equal(targets, [0, 0, 1, 3, 0, 2, 4, 6])
    np.testing.assert_array_equal(build_multitask_targets([1.0, 2.0], [False, False], np.nan), [1, 2])  # all mock: no onset at all


def test_targets_errors():
    onset = np.r_[[3.0, np.nan, 3.0, 3.0], [np.nan] * 4]
    with pytest.raises(ValueError, match=r"1 infected sample\(s\) have no infection_onset_hour"):
        build_multitask_targets(HOURS, INFECTED, onset)
    with pytest.raises(ValueError, match="have no infection_onset_hour"):
        build_multitask_targets(HOURS, INFECTED, np.nan)
    with pytest.raises(ValueError, match="hours must be finite and >= 0"):
        build_multitask_targets(HOURS - 1, INFECTED, 3.0)
    with pytest.raises(ValueError, match="hours must be finite and >= 0"):
        build_multitask_targets(np.r_[HOURS[:-1], np.nan], INFECTED, 3.0)
    with pytest.raises(ValueError, match="rule must be 'since_onset' or 'uninfected_zero'"):
        build_multitask_targets(HOURS, INFECTED, 3.0, rule="zero")
    with pytest.raises(ValueError, match="infected has 7 entries but hours has 8"):
        build_multitask_targets(HOURS, INFECTED[:-1], 3.0)
    with pytest.raises(ValueError, match="infected must be bool"):
        build_multitask_targets(HOURS, np.r_[INFECTED[:-1].astype(int), 2], 3.0)
    with pytest.raises(ValueError):  # an onset array of the wrong length (numpy's broadcast message: see the report)
        build_multitask_targets(HOURS, INFECTED, [3.0, 3.0, 3.0])


# ------------------------------------------------------------------------------------------------------------ 2. model

@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("classification", ["two_logits", "one_logit"])
def test_output_shapes(backbone, classification):
    torch.manual_seed(0)
    net = MultiTaskResNet(backbone, classification=classification, hidden=8).eval()
    with torch.no_grad(): logits, time_pred = net(torch.rand(3, 1, 16, 16))  # (B, C, H, W)
    assert tuple(logits.shape) == ((3, 2) if classification == "two_logits" else (3,))
    assert tuple(time_pred.shape) == (3,)
    assert not any(k.startswith("fc.") for k in net.backbone.state_dict())
    assert net.classifier[0].in_features == (2048 if backbone == "resnet50" else 512)


def test_infection_probability_softmax_column_1_vs_sigmoid():
    logits2 = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, -1.0]])
    two = MultiTaskResNet("resnet18", classification="two_logits", hidden=4)
    torch.testing.assert_close(two.infection_probability(logits2), logits2.softmax(1)[:, 1])
    torch.testing.assert_close(two.infection_probability(logits2), torch.tensor([0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(3))]))
    one = MultiTaskResNet("resnet18", classification="one_logit", hidden=4)
    logits1 = torch.tensor([0.0, 2.0, -3.0])
    torch.testing.assert_close(one.infection_probability(logits1), torch.sigmoid(logits1))
    torch.testing.assert_close(one.infection_probability(logits1), torch.tensor([0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(3))]))


def test_channel_modes():
    torch.manual_seed(0)
    grey = torch.rand(2, 1, 16, 16)
    repeat = MultiTaskResNet("resnet18", in_channels=1, channel_mode="repeat", hidden=4).eval()
    assert tuple(repeat.backbone.conv1.weight.shape) == (64, 3, 7, 7)  # the RGB first layer, fed the channel three times
    with torch.no_grad():
        torch.testing.assert_close(repeat.backbone(grey.expand(-1, 3, -1, -1)), repeat.backbone(grey.repeat(1, 3, 1, 1)))
        logits, _ = repeat(grey)
        torch.testing.assert_close(logits, repeat.classifier(repeat.backbone(grey.repeat(1, 3, 1, 1))))
    conv1 = MultiTaskResNet("resnet18", in_channels=1, channel_mode="conv1", hidden=4).eval()
    assert tuple(conv1.backbone.conv1.weight.shape) == (64, 1, 7, 7)
    two = MultiTaskResNet("resnet18", in_channels=2, channel_mode="conv1", hidden=4).eval()
    assert tuple(two.backbone.conv1.weight.shape) == (64, 2, 7, 7)
    with torch.no_grad(): assert tuple(two(torch.rand(2, 2, 16, 16))[0].shape) == (2, 2)
    with pytest.raises(ValueError, match=r"images must be \(batch, 2, height, width\)"): two(grey)
    with pytest.raises(ValueError, match=r"images must be \(batch, 1, height, width\)"): conv1(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="use channel_mode='conv1'"): MultiTaskResNet(in_channels=2)
    assert tuple(MultiTaskResNet(in_channels=3, hidden=4).backbone.conv1.weight.shape) == (64, 3, 7, 7)
    with pytest.raises(ValueError, match="backbone must be one of"): MultiTaskResNet("resnet101")
    with pytest.raises(ValueError, match="classification must be"): MultiTaskResNet(classification="softmax")
    with pytest.raises(ValueError, match="channel_mode must be"): MultiTaskResNet(channel_mode="tile")


def test_load_torchvision_state_dict_drops_fc(resnet18_file):
    path, rgb = resnet18_file
    assert any(k.startswith("fc.") for k in torch.load(path, weights_only=True))  # the file has torchvision's classifier
    net = MultiTaskResNet("resnet18", pretrained=path, hidden=4)
    _assert_same_state(net.backbone.state_dict(), _backbone_state(rgb))
    backbone = torchvision.models.resnet18(weights=None); backbone.fc = nn.Identity()
    assert load_backbone_weights(backbone, path) is backbone
    _assert_same_state(backbone.state_dict(), _backbone_state(rgb))


def test_load_accepts_ddp_prefix_and_state_dict_wrapper(resnet18_file, tmp_path):
    path, rgb = resnet18_file
    state = rgb.state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "both.pth")
    for name in ("ddp.pth", "wrapped.pth", "both.pth"):
        _assert_same_state(MultiTaskResNet("resnet18", pretrained=tmp_path / name, hidden=4).backbone.state_dict(), _backbone_state(rgb))


def test_conv1_summed_kernels_give_a_grey_image_the_rgb_features(resnet18_file):
    path, rgb = resnet18_file
    torch.manual_seed(1)
    grey = torch.rand(2, 1, 32, 32)
    features = nn.Sequential(*list(rgb.children())[:-1]).eval()  # torchvision's network up to the pooled features
    with torch.no_grad():
        expected = features(grey.expand(-1, 3, -1, -1)).flatten(1)  # (B, 512)
        one = MultiTaskResNet("resnet18", pretrained=path, channel_mode="conv1", hidden=4).eval()
        torch.testing.assert_close(one.backbone(grey), expected, rtol=1e-4, atol=1e-4)
        two = MultiTaskResNet("resnet18", pretrained=path, in_channels=2, channel_mode="conv1", hidden=4).eval()
        torch.testing.assert_close(two.backbone(grey.expand(-1, 2, -1, -1)), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one.backbone.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
        repeat = MultiTaskResNet("resnet18", pretrained=path, hidden=4).eval()
        torch.testing.assert_close(repeat.backbone(grey.expand(-1, 3, -1, -1)), expected, rtol=1e-6, atol=1e-6)


def test_load_refuses_another_architecture_with_counts(resnet18_file, tmp_path):
    path, rgb = resnet18_file
    r34 = _backbone_state(torchvision.models.resnet34(weights=None))
    r18 = _backbone_state(rgb)
    n_missing, n_unexpected = len(set(r18) - set(r34)), len(set(r34) - set(r18))
    n_shape = sum(r18[k].shape != r34[k].shape for k in set(r18) & set(r34))
    assert n_unexpected > 0
    torch.save(r34, tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="is not a state dict of this backbone") as error:
        MultiTaskResNet("resnet18", pretrained=tmp_path / "resnet34.pth")
    message = str(error.value)
    assert f"{n_missing} missing key(s)" in message and f"{n_unexpected} unexpected" in message and f"{n_shape} of another shape" in message
    assert "resnet34.pth" in message


def test_load_refuses_extra_and_missing_keys(resnet18_file, tmp_path):
    path, rgb = resnet18_file
    state = dict(rgb.state_dict())
    del state["layer4.1.bn2.weight"], state["layer4.1.bn2.bias"]
    state["projection.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(ValueError) as error:
        MultiTaskResNet("resnet18", pretrained=tmp_path / "edited.pth")
    message = str(error.value)
    assert "2 missing key(s)" in message and "layer4.1.bn2.bias" in message
    assert "1 unexpected ['projection.weight']" in message and "0 of another shape" in message
    state = dict(rgb.state_dict()); state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match=r"0 missing key\(s\) \[\], 0 unexpected \[\], 1 of another shape \['conv1.weight'\]"):
        MultiTaskResNet("resnet18", pretrained=tmp_path / "reshaped.pth")


def test_load_refuses_a_missing_file_and_files_that_are_not_state_dicts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file at .*absent.pth"):
        MultiTaskResNet("resnet18", pretrained=tmp_path / "absent.pth")
    torch.save([torch.zeros(3), torch.ones(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth holds a list, not a state dict"):
        MultiTaskResNet("resnet18", pretrained=tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"these are not weights")
    with pytest.raises(ValueError, match="junk.pth could not be read as a torch state dict"):
        MultiTaskResNet("resnet18", pretrained=tmp_path / "junk.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not a state dict: weights_only refuses it
    with pytest.raises(ValueError, match="module.pth could not be read as a torch state dict"):
        MultiTaskResNet("resnet18", pretrained=tmp_path / "module.pth")


# ------------------------------------------------------------------------------------------------------------- 3. loss

class _FixedOutputs(nn.Module):
    "A stand-in network with chosen outputs, to check the loss terms exactly."
    infection_probability = MultiTaskResNet.infection_probability

    def __init__(self, logits, time_pred, classification):
        super().__init__()
        self.logits, self.time_pred, self.classification = logits, time_pred, classification
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, images): return self.logits + self.offset, self.time_pred + self.offset


class _Wrapped(nn.Module):
    "Like DDP: the network is `.module`."
    def __init__(self, module):
        super().__init__(); self.module = module

    def forward(self, images): return self.module(images)


def _batch(n=4):
    return {"image": torch.zeros(n, 1, 16, 16), "infected": torch.tensor([1, 0, 1, 0]), "time_target": torch.tensor([0.5, 2.0, 4.0, 0.0])}


def test_loss_weights_and_smooth_l1_in_hours():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.5, 0.0], [0.0, 3.0]])
    net = _FixedOutputs(logits, torch.tensor([0.0, 0.0, 0.0, 0.25]), "two_logits")
    terms = MultiTaskLoss(classification_weight=0.3, regression_weight=2.0)(net, _batch())
    # SmoothL1 (β = 1 h) of the errors 0.5, 2, 4, 0.25 hours: 0.5·0.5², 2 − 0.5, 4 − 0.5, 0.5·0.25²
    assert terms["reg"].item() == pytest.approx((0.125 + 1.5 + 3.5 + 0.03125) / 4)
    assert terms["cls"].item() == pytest.approx(F.cross_entropy(logits, torch.tensor([1, 0, 1, 0])).item())
    assert terms["loss"].item() == pytest.approx(0.3 * terms["cls"].item() + 2.0 * terms["reg"].item())
    assert terms["acc"].item() == pytest.approx(0.5)  # rows 0, 1 right; row 2 calls an infected sample mock, row 3 a mock one infected
    assert terms["loss"].requires_grad and not terms["cls"].requires_grad
    wide = MultiTaskLoss(smooth_l1_beta=2.0)(net, _batch())  # quadratic within 2 h: 0.5·e²/2, linear beyond: e − 1
    assert wide["reg"].item() == pytest.approx((0.0625 + 1.0 + 3.0 + 0.015625) / 4)
    only_time = MultiTaskLoss(classification_weight=0.0)(_Wrapped(net), _batch())  # a DDP-style wrapper
    assert only_time["loss"].item() == pytest.approx(only_time["reg"].item())


@pytest.mark.parametrize("classification", ["two_logits", "one_logit"])
def test_loss_classification_term_on_the_network(classification):
    torch.manual_seed(0)
    net = MultiTaskResNet("resnet18", classification=classification, hidden=8).eval()  # eval: no dropout, fixed batch norm
    batch = _batch() | {"image": torch.rand(4, 1, 16, 16)}
    terms = MultiTaskLoss(classification_weight=0.7, regression_weight=0.2)(net, batch)
    with torch.no_grad(): logits, time_pred = net(batch["image"])
    if classification == "two_logits": expected = F.cross_entropy(logits, batch["infected"])
    else: expected = F.binary_cross_entropy_with_logits(logits, batch["infected"].float())
    regression = F.smooth_l1_loss(time_pred, batch["time_target"])
    assert terms["cls"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["reg"].item() == pytest.approx(regression.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.7 * expected.item() + 0.2 * regression.item(), rel=1e-5)


def test_loss_refuses_both_weights_zero_and_negative_weights():
    with pytest.raises(ValueError, match="not both 0"): MultiTaskLoss(0, 0)
    with pytest.raises(ValueError, match="must be >= 0"): MultiTaskLoss(-1, 1)


# ---------------------------------------------------------------------------------------------------------- 4. metrics

def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50).astype(bool)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 50), 0, 1)
    for threshold in (0.5, 0.35):
        scores = classification_metrics(y, p, threshold=threshold)
        hard = p >= threshold
        assert scores["auc"] == pytest.approx(skm.roc_auc_score(y, p))
        assert scores["accuracy"] == pytest.approx(skm.accuracy_score(y, hard))
        assert scores["precision"] == pytest.approx(skm.precision_score(y, hard))
        assert scores["recall"] == pytest.approx(skm.recall_score(y, hard))
        assert scores["f1"] == pytest.approx(skm.f1_score(y, hard))
        assert (scores["n"], scores["n_infected"]) == (50, int(y.sum()))
    assert math.isnan(classification_metrics([1, 1, 1], [0.2, 0.9, 0.5])["auc"])
    assert math.isnan(classification_metrics([False, False], [0.2, 0.9])["auc"])
    with pytest.raises(ValueError, match="of one length"): classification_metrics([1, 0], [0.5])
    with pytest.raises(ValueError, match="non-empty"): classification_metrics([], [])


def test_regression_metrics_by_hand():
    scores = regression_metrics([1, 2, 3, 4], [1.5, 2, 2, 5])  # errors 0.5, 0, −1, 1
    assert scores["mae"] == pytest.approx(2.5 / 4)
    assert scores["mse"] == pytest.approx(2.25 / 4)
    assert scores["rmse"] == pytest.approx(0.75)
    assert scores["r2"] == pytest.approx(1 - 2.25 / 5)  # SS_res = 2.25, SS_tot = 5
    assert scores["n"] == 4
    assert math.isnan(regression_metrics([2, 2, 2], [1, 2, 3])["r2"])  # constant target
    assert math.isnan(regression_metrics([2], [1])["r2"]) and regression_metrics([2], [1])["mae"] == 1
    empty = regression_metrics([], [])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("mae", "rmse", "mse", "r2"))
    with pytest.raises(ValueError, match="differ in length"): regression_metrics([1, 2], [1])


def _window_case():
    "3 mock samples (P = 0.2, 0.4, 0.6) and infected samples in known windows after onset."
    return pd.DataFrame({
        "infected": [False, False, False, True, True, True, True, True, True],
        "probability": [0.2, 0.4, 0.6, 0.7, 0.8, 0.1, 0.5, 0.3, 0.05],
        "hours_since_onset": [np.nan, np.nan, np.nan, 0.5, 1.5, 2.0, 3.5, 6.0, -1.0],  # the last: a frame before its onset
        "time_target": [1.0, 2.0, 3.0, 0.5, 1.5, 2.0, 3.5, 6.0, 0.0],
        "time_pred": [1.0, 3.0, 3.0, 1.5, 1.5, 2.0, 2.5, 4.0, 0.0]})


def test_multitask_metrics_windows_compare_the_window_against_all_uninfected():
    case = _window_case()
    table = multitask_metrics(case, windows=(0, 2, 4, 6, 8, 12))
    assert set(table.index) == {"overall", "infected", "uninfected", "0-2 h after onset", "2-4 h after onset",
                                "4-6 h after onset", "6-8 h after onset", "8-12 h after onset"}
    windows = ["0-2 h after onset", "2-4 h after onset", "4-6 h after onset", "6-8 h after onset", "8-12 h after onset"]
    assert table.loc["overall", "auc"] == pytest.approx(skm.roc_auc_score(case["infected"], case["probability"]))
    assert table.loc["0-2 h after onset", "auc"] == pytest.approx(1.0)  # 0.7, 0.8 beat all three mock samples
    assert table.loc["2-4 h after onset", "auc"] == pytest.approx(2 / 6)  # 0.1 beats none, 0.5 beats 0.2 and 0.4
    assert table.loc["6-8 h after onset", "auc"] == pytest.approx(1 / 3)  # 6.0 h falls in [6, 8): 0.3 beats 0.2 only
    for empty in ("4-6 h after onset", "8-12 h after onset"):
        assert math.isnan(table.loc[empty, "auc"]) and table.loc[empty, "n_infected"] == 0
    np.testing.assert_array_equal(table.loc[windows, "n_infected"].to_numpy(), [2, 2, 0, 1, 0])  # the frame before its onset is in none
    assert (table.loc[windows, "n_uninfected"] == 3).all()
    assert table.loc["0-2 h after onset", "time_mae"] == pytest.approx(0.5)  # errors 1 and 0
    assert table.loc["2-4 h after onset", "time_mae"] == pytest.approx(0.5)  # errors 0 and 1
    assert table.loc["2-4 h after onset", "time_n"] == 2


def test_multitask_metrics_per_class_rows_and_missing_columns():
    case = _window_case()
    table = multitask_metrics(case, windows=(0, 2))
    assert table.loc["uninfected", "mae"] == pytest.approx(1 / 3)  # errors 0, 1, 0
    assert table.loc["infected", "mae"] == pytest.approx((1 + 0 + 0 + 1 + 2 + 0) / 6)
    assert table.loc["uninfected", "accuracy"] == pytest.approx(2 / 3)  # 0.6 ≥ 0.5 is called infected
    assert table.loc["infected", "accuracy"] == pytest.approx(3 / 6)  # 0.7, 0.8, 0.5
    assert table.loc["uninfected", "n"] == 3 and table.loc["infected", "n"] == 6
    assert table.loc["overall", "mae"] == pytest.approx(5 / 9)
    with pytest.raises(KeyError, match="hours_since_onset"):
        multitask_metrics(case.drop(columns="hours_since_onset"))


# ------------------------------------------------------------------------------------------------------------- 5. data

def _manifest_rows():
    return [{"path": "stacks/a.tif", "infected": "true", "infection_onset_hour": 1.5, "frames_per_hour": 2, "group": "A"},
            {"path": "stacks/b.tif", "infected": "False", "infection_onset_hour": None, "frames_per_hour": 2, "group": "B"},
            {"path": "stacks/c.tif", "infected": 1, "infection_onset_hour": 0.5, "frames_per_hour": 4, "group": "C"},
            {"path": "stacks/d.tif", "infected": 0, "infection_onset_hour": None, "frames_per_hour": 0.5, "group": "D"}]


def test_read_manifest_csv_and_yaml_agree_with_parsed_booleans_and_resolved_paths(tmp_path, monkeypatch):
    import yaml
    folder = tmp_path / "experiment"; folder.mkdir()
    pd.DataFrame(_manifest_rows()).to_csv(folder / "manifest.csv", index=False)
    (folder / "manifest.yaml").write_text(yaml.safe_dump({"stacks": _manifest_rows()}))  # keys sorted: another column order
    monkeypatch.chdir(tmp_path)  # paths are relative to the manifest, not to the working directory
    from_csv, from_yaml = read_manifest(folder / "manifest.csv"), read_manifest("experiment/manifest.yaml")
    assert set(from_csv.columns) == set(from_yaml.columns)
    pd.testing.assert_frame_equal(from_csv, from_yaml[from_csv.columns], check_dtype=False)
    assert from_csv["infected"].tolist() == [True, False, True, False] and from_csv["infected"].dtype == bool
    assert from_csv["path"].tolist() == [str((folder / "stacks" / f"{s}.tif").resolve()) for s in "abcd"]
    assert from_csv["infection_onset_hour"].isna().tolist() == [False, True, False, True]
    assert set(MANIFEST_COLUMNS) <= set(from_csv.columns)
    absolute = _manifest_rows(); absolute[0]["path"] = str(tmp_path / "elsewhere" / "a.tif")
    pd.DataFrame(absolute).to_csv(folder / "absolute.csv", index=False)
    assert read_manifest(folder / "absolute.csv")["path"][0] == str(tmp_path / "elsewhere" / "a.tif")


def test_read_manifest_errors(tmp_path):
    for rate in (0, -2, "fast"):
        rows = _manifest_rows(); rows[2]["frames_per_hour"] = rate
        pd.DataFrame(rows).to_csv(tmp_path / "rate.csv", index=False)
        with pytest.raises(ValueError, match=r"frames_per_hour must be a positive number; row\(s\) \[(np.int64\()?2\)?\]"):
            read_manifest(tmp_path / "rate.csv")
    pd.DataFrame(_manifest_rows()).drop(columns=["group", "frames_per_hour"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['frames_per_hour', 'group'\]"):
        read_manifest(tmp_path / "short.csv")
    rows = _manifest_rows(); rows[0]["infection_onset_hour"] = None
    pd.DataFrame(rows).to_csv(tmp_path / "no_onset.csv", index=False)
    with pytest.raises(ValueError, match="have no infection_onset_hour"):
        read_manifest(tmp_path / "no_onset.csv")
    (tmp_path / "flat.yaml").write_text("- path: a.tif\n")
    with pytest.raises(ValueError, match="a list under 'stacks:'"):
        read_manifest(tmp_path / "flat.yaml")
    with pytest.raises(FileNotFoundError, match="no manifest at"):
        read_manifest(tmp_path / "absent.csv")


def test_read_stack_axes(tmp_path):
    rng = np.random.default_rng(0)
    tyx = rng.integers(0, 1000, (5, 8, 10)).astype(np.uint16)
    frames = read_stack(_write_stack(tmp_path / "tyx.tif", tyx, "TYX"))
    assert frames.shape == (5, 1, 8, 10)
    np.testing.assert_array_equal(frames[:, 0], tyx)
    tcyx = rng.integers(0, 1000, (4, 2, 8, 10)).astype(np.uint16)
    frames = read_stack(_write_stack(tmp_path / "tcyx.tif", tcyx, "TCYX"))
    assert frames.shape == (4, 2, 8, 10)
    np.testing.assert_array_equal(frames, tcyx)
    yx = rng.integers(0, 1000, (8, 10)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "yx.tif", yx)
    frames = read_stack(tmp_path / "yx.tif")
    assert frames.shape == (1, 1, 8, 10)
    np.testing.assert_array_equal(frames[0, 0], yx)


def test_read_stack_folder_of_frames(tmp_path):
    folder = tmp_path / "frames"; folder.mkdir()
    for name, value in (("t2.tif", 2), ("t0.tif", 0), ("t1.tiff", 1)):  # written out of order
        tifffile.imwrite(folder / name, np.full((6, 7), value, np.uint16))
    (folder / "notes.txt").write_text("not a frame")
    frames = read_stack(folder)
    assert frames.shape == (3, 1, 6, 7)
    np.testing.assert_array_equal(frames[:, 0, 0, 0], [0, 1, 2])  # sorted by name
    tifffile.imwrite(folder / "t3.tif", np.zeros((5, 7), np.uint16))
    with pytest.raises(ValueError, match="the frames differ in shape"):
        read_stack(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without .tif frames"):
        read_stack(tmp_path / "empty")


def test_read_stack_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.tif, which does not exist"):
        read_stack(tmp_path / "absent.tif")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="broken.tif could not be read as a TIFF stack"):
        read_stack(tmp_path / "broken.tif")


def test_scale_frames_maps_percentiles_per_frame_and_channel():
    rng = np.random.default_rng(0)
    base = np.stack([rng.permutation(100).reshape(10, 10) for _ in range(4)]).reshape(2, 2, 10, 10).astype(float)  # (T, C, Y, X)
    gain, offset = np.array([1, 7, 0.5, 30.0]).reshape(2, 2, 1, 1), np.array([0, 500, 3, 1000.0]).reshape(2, 2, 1, 1)
    raw = (base * gain + offset).astype(np.float32)
    full = scale_frames(raw, low=0, high=100)
    assert full.dtype == np.float32 and full.shape == raw.shape
    np.testing.assert_allclose(full.min(axis=(2, 3)), 0)
    np.testing.assert_allclose(full.max(axis=(2, 3)), 1)
    np.testing.assert_allclose(full, base / 99, atol=1e-6)  # every frame and channel on its own scale
    scaled = scale_frames(raw)  # the 1st and 99.8th percentiles of 0..99: 0.99 and 98.802
    np.testing.assert_allclose(scaled, np.clip((base - 0.99) / (98.802 - 0.99), 0, 1), atol=1e-5)
    assert np.all(scale_frames(np.full((1, 1, 4, 4), 7.0)) == 0)  # a constant frame: no division by zero


def test_dataset_shapes_targets_and_channels(four_wells, four_well_set):
    data = four_well_set
    assert data.images.shape == (24, 2, 16, 16) and data.images.dtype == torch.float32 and len(data) == 24 and data.n_channels == 2
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    frames = data.frames
    np.testing.assert_allclose(frames.query("stack == 0")["time_target"], [0, 0, 0, 0.5, 1.0, 1.5])  # onset 1 h
    np.testing.assert_allclose(frames.query("stack == 1")["time_target"], [0, 0, 0, 0, 0, 0.5])  # onset 2 h
    np.testing.assert_allclose(frames.query("stack == 2")["time_target"], [0, 0.5, 1, 1.5, 2, 2.5])  # mock: since the start
    np.testing.assert_allclose(frames.query("stack == 0")["hours_since_onset"], [-1, -0.5, 0, 0.5, 1.0, 1.5])
    assert frames.query("not infected")["hours_since_onset"].isna().all() and frames.query("infected")["hours_since_onset"].notna().all()
    old = TimeCourseDataset(four_wells, image_size=16, rule="uninfected_zero", channels=[0])
    np.testing.assert_allclose(old.frames.query("stack == 3")["time_target"], 0)
    np.testing.assert_allclose(old.frames.query("stack == 0")["time_target"], [0, 0, 0, 0.5, 1.0, 1.5])
    capped = TimeCourseDataset(four_wells, image_size=16, max_hours=1.0, channels=[0])
    np.testing.assert_allclose(capped.frames.query("stack == 2")["time_target"], [0, 0.5, 1, 1, 1, 1])
    sample = data[5]
    assert tuple(sample["image"].shape) == (2, 16, 16) and sample["infected"].item() == 1
    assert sample["time_target"].item() == pytest.approx(1.5) and sample["index"].item() == 5


def test_dataset_channel_selection(four_wells, four_well_set):
    second = TimeCourseDataset(four_wells, image_size=16, channels=[1])
    assert second.n_channels == 1
    torch.testing.assert_close(second.images, four_well_set.images[:, [1]])
    swapped = TimeCourseDataset(four_wells, image_size=16, channels=[1, 0])
    torch.testing.assert_close(swapped.images, four_well_set.images[:, [1, 0]])
    gradient = second.images[0, 0]  # channel 1 is the top-to-bottom gradient: rows brighten downwards
    assert gradient[-1].mean() > gradient[0].mean() + 0.5
    with pytest.raises(ValueError, match=r"has 2 channel\(s\); channels=\[2\] asks for more"):
        TimeCourseDataset(four_wells, image_size=16, channels=[2])


def test_dataset_errors(tmp_path):
    late = _write_wells(tmp_path, [(True, 3.0), (False, None)], name="late.csv")  # 6 frames at 2 per hour: the last at 2.5 h
    with pytest.raises(ValueError, match=r"well0.tif: infection_onset_hour 3.0 is after its last frame \(2.50 h"):
        TimeCourseDataset(late, image_size=16)
    mixed = tmp_path / "mixed"; mixed.mkdir()
    _write_wells(mixed, [(True, 1.0)], channels=1, name="one.csv")
    _write_stack(mixed / "well1.tif", np.zeros((6, 2, 32, 32), np.uint16), "TCYX")
    manifest = pd.read_csv(mixed / "one.csv")
    manifest = pd.concat([manifest, manifest.assign(path="well1.tif", infected=False, infection_onset_hour=np.nan, group="well1")])
    manifest.to_csv(mixed / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=r"different channel counts \[1, 2\]; pass channels="):
        TimeCourseDataset(mixed / "manifest.csv", image_size=16)
    assert TimeCourseDataset(mixed / "manifest.csv", image_size=16, channels=[0]).images.shape == (12, 1, 16, 16)
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        TimeCourseDataset(mixed / "manifest.csv", image_size=4)


def _frame_table(n_infected, n_mock, frames_per_group=3):
    groups = [(f"inf{i}", True) for i in range(n_infected)] + [(f"mock{i}", False) for i in range(n_mock)]
    return pd.DataFrame([{"group": g, "infected": infected, "frame": t} for g, infected in groups for t in range(frames_per_group)])


def test_split_stacks_keeps_groups_whole_and_stratifies():
    for n_groups in (3, 5, 8):
        frames = _frame_table(n_groups, n_groups)
        splits = split_stacks(frames, val_fraction=0.2, test_fraction=0.2, seed=0)
        np.testing.assert_array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(len(frames)))  # every frame once
        owners = {name: set(frames.loc[index, "group"]) for name, index in splits.items()}
        assert not (owners["train"] & owners["val"]) and not (owners["train"] & owners["test"]) and not (owners["val"] & owners["test"])
        for name, index in splits.items():
            assert set(frames.loc[index, "infected"]) == {True, False}, (n_groups, name)  # each split has both classes
    assert len(split_stacks(_frame_table(4, 4), val_fraction=0.5, test_fraction=0.0)["test"]) == 0


def test_split_stacks_is_seeded_and_refuses_mixed_groups():
    frames = _frame_table(40, 40, frames_per_group=2)
    first, again, other = (split_stacks(frames, seed=s) for s in (0, 0, 1))
    for name in first: np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[name], other[name]) for name in first)
    mixed = _frame_table(2, 2).assign(group=lambda t: np.where(t["frame"] == 0, "plate", t["group"]))
    with pytest.raises(ValueError, match=r"group\(s\) \['plate'\] hold infected and mock frames"):
        split_stacks(mixed)
    with pytest.raises(ValueError, match="a sum below 1"):
        split_stacks(frames, val_fraction=0.6, test_fraction=0.4)


def _epoch_order(loader, epoch):
    loader.set_epoch(epoch)
    return np.concatenate([batch["index"].numpy() for batch in loader])


def test_frame_loader_draws_every_frame_once_in_a_seeded_order(four_well_set):
    indices = np.arange(3, 20)  # 17 frames, batches of 5: 4 batches, the last of 2
    loader = FrameLoader(four_well_set, indices, batch_size=5, seed=0)
    assert len(loader) == 4 and [len(b["index"]) for b in loader] == [5, 5, 5, 2]
    orders = {epoch: _epoch_order(loader, epoch) for epoch in (0, 1)}
    for order in orders.values(): np.testing.assert_array_equal(np.sort(order), indices)
    np.testing.assert_array_equal(_epoch_order(loader, 0), orders[0])  # same (seed, epoch): same order
    np.testing.assert_array_equal(_epoch_order(FrameLoader(four_well_set, indices, batch_size=5, seed=0), 0), orders[0])
    assert not np.array_equal(orders[0], orders[1])  # another epoch: another order
    assert not np.array_equal(_epoch_order(FrameLoader(four_well_set, indices, batch_size=5, seed=1), 0), orders[0])
    np.testing.assert_array_equal(_epoch_order(FrameLoader(four_well_set, indices, batch_size=5, shuffle=False), 0), indices)
    with pytest.raises(ValueError, match="no frames"): FrameLoader(four_well_set, [])


def _symmetries(image):
    "The 8 symmetries of a square of a (C, S, S) image."
    return [torch.rot90(flipped, k, dims=(-2, -1)) for flipped in (image, image.flip(-1)) for k in range(4)]


def test_frame_loader_augmentation_only_permutes_pixels_by_square_symmetries(four_well_set):
    before = four_well_set.images.clone()
    plain = list(FrameLoader(four_well_set, batch_size=7, augment=False, seed=3))
    for batch in plain: assert torch.equal(batch["image"], four_well_set.images[batch["index"]])  # unchanged
    changed = 0
    for epoch in (0, 1):
        loader = FrameLoader(four_well_set, batch_size=7, augment=True, seed=3); loader.set_epoch(epoch)
        for batch in loader:
            for image, index in zip(batch["image"], batch["index"]):
                original = four_well_set.images[index]
                for c in range(original.shape[0]):  # the sorted pixel values of each image and channel are kept
                    assert torch.equal(image[c].flatten().sort().values, original[c].flatten().sort().values)
                matches = [k for k, candidate in enumerate(_symmetries(original)) if torch.equal(image, candidate)]
                assert matches, f"frame {int(index)} is not a flip/rotation of its original"
                changed += matches[0] != 0
    assert changed > 10  # 48 draws of 8 symmetries: most are not the identity
    assert torch.equal(four_well_set.images, before)  # the dataset's images are not modified in place


# ---------------------------------------------------------------------------------------------------- 6. the model class

@pytest.fixture(scope="module")
def toy_wells(tmp_path_factory):
    """A learnable toy set: 8 infected wells (a bright spot from the onset at 0.5 h, frame 1 of 8) and 8 mock wells;
    split by well into 12 training and 4 validation wells (2 of each class)."""
    folder = tmp_path_factory.mktemp("toy_wells")
    manifest = _write_wells(folder, [(True, 0.5)] * 8 + [(False, None)] * 8, n_frames=8, size=16, seed=1)
    data = TimeCourseDataset(manifest, image_size=16)
    splits = split_stacks(data.frames, val_fraction=0.25, test_fraction=0.0, seed=0)
    return data, splits


@pytest.fixture(scope="module")
def fitted(toy_wells):
    data, splits = toy_wells
    # seed 1: its untrained network ranks the validation frames at chance (AUC 0.48), so a high AUC here is learned; with seed 0
    # the untrained network's features already follow the frames' brightness (AUC 1.0 before any step) and prove nothing
    return MultiTaskImageModel(hidden=32).fit(data, splits["train"], splits["val"], epochs=5, batch_size=16, lr=3e-3, device="cpu", seed=1)


def test_fit_learns_the_toy_set_and_keeps_the_best_epoch(toy_wells, fitted):
    data, splits = toy_wells
    history = fitted.history_.df
    # Observed (torch 2.14 CPU, 1 thread): val_auc per epoch 0.977, 0.984, 0.949, 0.918, 0.914 (best: epoch 1); train_cls 0.431 → 0.190;
    # val_time_mae 1.37 → 1.05 h; the restored epoch-1 weights: val accuracy 0.9375 (30 of 32 frames: the two frames before the
    # onset are called mock), mean P(infected) 0.94 on frames after the onset and 0.17 on mock frames; untrained: AUC 0.48, accuracy 0.5.
    # (Each infected well's frame 0 precedes its onset and looks like a mock frame, so an AUC near 0.94 is what a perfect model gets.)
    assert {"train_loss", "train_cls", "train_reg", "val_auc", "val_time_mae", "lr"} <= set(history.columns)
    assert len(history) == 5
    assert history["val_auc"].max() >= 0.9
    assert history["train_cls"].iloc[-1] < history["train_cls"].iloc[0] and history["val_time_mae"].iloc[-1] < history["val_time_mae"].iloc[0]
    assert fitted.history_.best_epoch == history["val_auc"].idxmax()
    scored = fitted.predict(data, splits["val"])
    assert len(scored) == len(splits["val"]) and scored["probability"].between(0, 1).all()
    assert classification_metrics(scored["infected"], scored["probability"])["accuracy"] >= 0.85  # calibrated, not only ranked
    assert scored["predicted_infected"].tolist() == (scored["probability"] >= 0.5).tolist()
    assert classification_metrics(scored["infected"], scored["probability"])["auc"] == pytest.approx(history["val_auc"].max(), abs=1e-6)
    every = fitted.predict(data)
    assert len(every) == len(data) and every["probability"].between(0, 1).all() and np.isfinite(every["time_pred"]).all()
    assert list(every[["stack", "frame", "infected", "time_target"]].itertuples(index=False)) == \
        list(data.frames[["stack", "frame", "infected", "time_target"]].itertuples(index=False))
    table = fitted.evaluate(data, splits["val"], windows=(0, 2, 4))
    assert table.loc["overall", "auc"] == pytest.approx(history["val_auc"].max(), abs=1e-6)


def test_save_load_round_trip_and_refusals(toy_wells, fitted, tmp_path, four_wells):
    data, splits = toy_wells
    fitted.save(tmp_path / "imaging")
    config = json.loads((tmp_path / "imaging" / "config.json").read_text())
    assert config["kind"] == "cellmtl.imaging.MultiTaskImageModel" and config["image_size"] == 16 and config["in_channels"] == 1
    again = cellmtl.load(tmp_path / "imaging")
    assert isinstance(again, MultiTaskImageModel)
    before, after = fitted.predict(data), again.predict(data)
    np.testing.assert_array_equal(after["probability"].to_numpy(), before["probability"].to_numpy())
    np.testing.assert_array_equal(after["time_pred"].to_numpy(), before["time_pred"].to_numpy())
    assert again.history_.best_epoch == fitted.history_.best_epoch
    larger = TimeCourseDataset(data.manifest, image_size=24)
    with pytest.raises(ValueError, match="Build it with image_size=16"): fitted.predict(larger)
    with pytest.raises(ValueError, match="1-channel 16² frames; this dataset has 2-channel"):
        fitted.predict(TimeCourseDataset(four_wells, image_size=16))
    with pytest.raises(NotImplementedError, match="use predict"): fitted.annotate(data)
    assert KINDS["cellmtl.imaging.MultiTaskImageModel"] == "cellmtl.imaging"
    assert MultiTaskImageModel.kind == "cellmtl.imaging.MultiTaskImageModel"


def test_fit_writes_checkpoints(tmp_path, four_wells):
    data = TimeCourseDataset(four_wells, image_size=16, channels=[0])
    splits = split_stacks(data.frames, val_fraction=0.5, test_fraction=0.0)
    model = MultiTaskImageModel(hidden=8, classification="one_logit").fit(data, splits["train"], splits["val"], epochs=1, batch_size=8,
                                                                           device="cpu", checkpoint_dir=tmp_path / "run")
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    assert model.predict(data)["probability"].between(0, 1).all()
    with pytest.raises(TypeError, match="fit takes a TimeCourseDataset"): MultiTaskImageModel().fit(data.images)


def test_manifest_values_are_parsed_strictly_whatever_the_source(tmp_path):
    "true/false, yes/no, 1/0 and 1.0/0.0 parse; a typo or an empty cell is an error naming the rows; a DataFrame gets the same checks."
    tifffile.imwrite(tmp_path / "w.tif", np.zeros((3, 8, 8), np.uint16), imagej=True, metadata={"axes": "TYX"})
    rows = {"path": ["w.tif"] * 4, "infected": ["1.0", "0.0", "yes", "False"], "infection_onset_hour": [1.0, None, 1.0, None],
            "frames_per_hour": [1.0] * 4, "group": list("abcd")}
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    assert read_manifest(tmp_path / "m.csv")["infected"].tolist() == [True, False, True, False]
    pd.DataFrame(rows | {"infected": ["ture", "0", "1", ""]}).to_csv(tmp_path / "typo.csv", index=False)
    with pytest.raises(ValueError, match=r"infected must be true/false .* row\(s\) \[0, 3\]"):
        read_manifest(tmp_path / "typo.csv")
    frame = pd.DataFrame(rows | {"path": [str(tmp_path / "w.tif")] * 4})
    assert TimeCourseDataset(frame, image_size=8).manifest["infected"].tolist() == [True, False, True, False]  # "False" is mock, not truthy
    with pytest.raises(ValueError, match="frames_per_hour must be a positive number; row\\(s\\) \\[1\\]"):
        TimeCourseDataset(frame.assign(frames_per_hour=[1.0, 0.0, 1.0, 1.0]), image_size=8)


def test_a_folder_stack_refuses_multi_frame_files_and_onsets_of_the_wrong_length(tmp_path):
    (tmp_path / "f").mkdir()
    for name in ("a.tif", "b.tif"): tifffile.imwrite(tmp_path / "f" / name, np.zeros((3, 8, 8), np.uint16), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(ValueError, match="one frame per file"): read_stack(tmp_path / "f")
    with pytest.raises(ValueError, match="infection_onset_hour has 3 entries but there are 4 samples"):
        build_multitask_targets([0, 1, 2, 3], [True] * 4, [1, 2, 3])
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((3, 8, 8), np.uint8))  # no axes metadata: tifffile reads SYX
    with pytest.warns(UserWarning, match="no frame axis and 3 samples per pixel"): read_stack(tmp_path / "plain.tif")


def test_multitask_metrics_rows_are_overall_then_classes_then_windows():
    table = multitask_metrics(pd.DataFrame({"infected": [True, True, False, False], "probability": [0.9, 0.6, 0.2, 0.4],
                                            "time_target": [1.0, 3.0, 1.0, 2.0], "time_pred": [1.0, 2.0, 1.0, 2.0],
                                            "hours_since_onset": [1.0, 3.0, np.nan, np.nan]}), windows=(0, 2, 4))
    assert list(table.index) == ["overall", "infected", "uninfected", "0-2 h after onset", "2-4 h after onset"]


def _example_config(tmp_path, **training):
    "configs/multitask_example.yaml, shrunk to seconds (fewer and smaller simulated wells, 2 epochs), writing under tmp_path."
    import yaml
    from conftest import ROOT
    config = yaml.safe_load((ROOT / "configs" / "multitask_example.yaml").read_text())
    config.update(output_dir=str(tmp_path / "outputs"), run_id="test")
    config["simulate"].update(n_wells=8, n_frames=12, image_size=32)
    config["data"]["image_size"] = 16
    config["training"].update({"epochs": 2, "batch_size": 16} | training)
    config["model"]["hidden"] = 16
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_cli_trains_and_evaluates_the_example_config_end_to_end(tmp_path):
    from conftest import run_cli
    config = _example_config(tmp_path)
    result = run_cli("imaging", "train", "--config", config, "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / "simulated_wells" / "test"
    assert {"best.pt", "last.pt", "model", "results.json", "predictions.csv", "train.log", "tensorboard", "simulated_wells"} <= {p.name for p in run.iterdir()}
    results = json.loads((run / "results.json").read_text())
    assert results["simulated"] is True and set(results["frames"]) == {"train", "val", "test"} and 0 <= results["test"]["overall"]["auc"] <= 1
    assert "epoch 1:" in (run / "train.log").read_text()  # the engine's per-epoch lines reach the log
    evaluated = run_cli("imaging", "evaluate", "--config", config, "--model", run / "model")
    assert evaluated.returncode == 0 and "overall" in evaluated.stdout and "h after onset" in evaluated.stdout
    again = run_cli("imaging", "train", "--config", config, "--no-progress")
    assert again.returncode == 2 and "already holds a run" in again.stderr  # a finished run is never replaced without --overwrite


def test_config_errors_name_the_valid_keys(tmp_path):
    import yaml
    from cellmtl.imaging import load_experiment_config
    config = _example_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["training"]["learning_rate"] = 0.1
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\] in .*training; valid keys: \['epochs', 'batch_size', 'lr'"):
        load_experiment_config(config)
    raw["training"].pop("learning_rate"); raw["colour"] = "red"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"): load_experiment_config(config)
    raw.pop("colour"); raw.pop("simulate")
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="give data.manifest"): load_experiment_config(config)
