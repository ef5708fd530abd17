"""DistributedDataParallel under torchrun (2 CPU processes, gloo) reproduces a single process with a 2x batch.

With interleaved sharding (rank r takes perm[r::2] of the same (seed, epoch) permutation) the union of the
ranks' k-th batches of 16 is the single process's k-th batch of 32, and DDP's gradient averaging equals the
gradient of that batch's mean loss. Float sums are grouped differently, so the weights agree to rounding:
TOLERANCE bounds the max absolute difference of any final weight (observed ~1e-7 after 4 epochs of Adam).
"""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from cellmtl.train import load_checkpoint

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")
TOLERANCE = 1e-5  # max |w_ddp - w_single| over all final weights
TIMEOUT = 240  # seconds per launch


def _run(arguments):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    result = subprocess.run([str(a) for a in arguments], env=environment, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{arguments} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def _history(path):
    return json.loads(Path(path).read_text())


def _has_csr_loader():
    try: from cellmtl.data import CSRBatchLoader  # noqa: F401
    except ImportError: return False
    return True


@pytest.mark.parametrize("loader", ["toy", pytest.param("csr", marks=pytest.mark.skipif(
    not _has_csr_loader(), reason="cellmtl.data.CSRBatchLoader not available"))])
def test_ddp_matches_single_process(tmp_path, loader):
    _run([sys.executable, SCRIPT, tmp_path / "single", "--batch-size", 32, "--loader", loader])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", SCRIPT,
          tmp_path / "ddp", "--batch-size", 16, "--loader", loader])

    single = torch.load(tmp_path / "single" / "weights.pt")
    parallel = torch.load(tmp_path / "ddp" / "weights.pt")
    assert single.keys() == parallel.keys()
    max_difference = max((single[k] - parallel[k]).abs().max().item() for k in single)
    print(f"{loader}: max |w_ddp - w_single| = {max_difference:.3g}")
    assert max_difference < TOLERANCE

    # every rank saw the same all-reduced metrics, hence made the same early-stopping / LR decisions
    rank0, rank1 = _history(tmp_path / "ddp" / "history_rank0.json"), _history(tmp_path / "ddp" / "history_rank1.json")
    assert rank0 == rank1
    reference = _history(tmp_path / "single" / "history_rank0.json")
    assert len(rank0["records"]) == len(reference["records"]) == 4
    for ddp_row, single_row in zip(rank0["records"], reference["records"]):
        assert ddp_row.keys() == single_row.keys()
        for key, value in single_row.items():
            assert abs(ddp_row[key] - value) < 1e-5, (key, ddp_row[key], value)

    # rank 0 alone wrote the checkpoints, with every rank's random number generator states
    checkpoint = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2 and checkpoint["epoch"] == 3
    assert not list((tmp_path / "ddp" / "checkpoints").glob("*.tmp"))
