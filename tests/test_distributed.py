"""Certified optimizers under DDP (torchrun, 2 CPU ranks over gloo)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_certified.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, *, ranks, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if ranks == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(SCRIPT), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("operator", ["gradient_clipping", "model_clipping"])
@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_ddp_matches_single_process_and_ranks_agree(tmp_path, operator, sigma):
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _launch([str(single), operator, str(sigma), "4"], ranks=1)
    _launch([str(multi), operator, str(sigma), "4"], ranks=2)
    a, b, b1 = torch.load(single), torch.load(multi), torch.load(f"{multi}.rank1")
    for name in a:
        assert torch.equal(b[name], b1[name]), f"ranks disagree on {name}"
        # DDP averages the two half-batch mean gradients; float64 keeps the comparison tight.
        torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-12, msg=name)


def test_secure_seed_is_shared_across_ranks(tmp_path):
    out = tmp_path / "secure.pt"
    _launch([str(out), "gradient_clipping", "0.3", "3"], ranks=2, env_extra={"SECURE": "1"})
    a, b = torch.load(out), torch.load(f"{out}.rank1")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_demo_under_torchrun_matches_single_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m pyunlearn.cli demo --quick`: same report as one process."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "pyunlearn.cli", "demo", "--quick", "--no-progress", "--seed", "1"]
    single = subprocess.run(base + ["--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600,
                            env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "pyunlearn.cli",
                            "demo", "--quick", "--no-progress", "--seed", "1", "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, timeout=600, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())["methods"]
    two = json.loads((tmp_path / "two" / "report.json").read_text())["methods"]
    assert list(one) == list(two)
    for name in ("coarse", "retrain", "finetune"):  # deterministic methods agree to float tolerance
        assert two[name]["dice"] == pytest.approx(one[name]["dice"], abs=1e-3), name
        assert two[name]["auroc"] == pytest.approx(one[name]["auroc"], abs=1e-3), name


@pytest.mark.parametrize("noise", [0.0, 0.8])
def test_dpsgd_clips_per_sample_before_the_cross_rank_sum(tmp_path, noise):
    script = Path(__file__).parent / "scripts" / "ddp_dpsgd.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"
    r1 = subprocess.run([sys.executable, str(script), str(single), str(noise)], capture_output=True, text=True,
                        timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(multi),
                         str(noise)], capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b, b1 = torch.load(single), torch.load(multi), torch.load(f"{multi}.rank1")
    for name in a:
        assert torch.equal(b[name], b1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-12, msg=name)
