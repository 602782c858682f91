"""Resumable unlearning runs: killed at an arbitrary step, resumed, bit-identical to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pyunlearn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyunlearn.data import SyntheticShortcuts
from pyunlearn.models import EncoderDecoder
from pyunlearn.unlearn import SegmentationUnlearningData, finetune, gradient_clipping, model_clipping

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from pyunlearn.data import SyntheticShortcuts
    from pyunlearn.models import EncoderDecoder
    from pyunlearn.unlearn import SegmentationUnlearningData, gradient_clipping
    ds = SyntheticShortcuts(24, image_size=16, fine_fraction=0.5, seed=0)
    data = SegmentationUnlearningData.from_masks(ds.images, ds.coarse, ds.fine, ds.has_fine)
    torch.manual_seed(0)
    model = EncoderDecoder(width=4).freeze_encoder()
    kill_at = int(sys.argv[2])
    calls = []
    def eval_fn(m):  # runs after every step (diagnostics); SIGKILL ourselves at the chosen step
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), 9)
        return {"worst_group_auroc": 0.0}
    out, record = gradient_clipping(model, data, steps=4, lr=0.1, c0=1.0, c1=0.1, weight_decay=1.0,
                                    finetune_steps=4, batch_size=8, seed=0, noise_seed=5, checkpoint=sys.argv[1],
                                    checkpoint_every=1, eval_fn=eval_fn, eval_every=1, diagnostics=True)
    torch.save({"state": out.state_dict(), "certificate": record["certificate"]}, sys.argv[3])
""")


def _run(tmp_path, ckpt, kill_at, result):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), str(kill_at), str(result)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def private_key_file(tmp_path_factory, monkeypatch):
    """Each test (and the subprocesses it starts) authenticates checkpoints with its own key file, outside
    the checkpoint folders and never in the real home."""
    path = tmp_path_factory.mktemp("keys") / "checkpoint.key"
    monkeypatch.setenv("PYUNLEARN_CHECKPOINT_KEY_FILE", str(path))
    monkeypatch.delenv("PYUNLEARN_CHECKPOINT_KEY", raising=False)
    return path


@pytest.mark.parametrize("kill_at", [3, 7])  # inside the noisy phase, inside the post-processing phase
def test_sigkill_then_resume_is_bit_identical(tmp_path, kill_at):
    reference = _run(tmp_path, tmp_path / "full.ckpt", 10_000, tmp_path / "full.pt")
    assert reference.returncode == 0, reference.stderr
    killed = _run(tmp_path, tmp_path / "run.ckpt", kill_at, tmp_path / "never.pt")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "run.ckpt").exists() and not (tmp_path / "never.pt").exists()
    resumed = _run(tmp_path, tmp_path / "run.ckpt", 10_000, tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    full = torch.load(tmp_path / "full.pt")
    again = torch.load(tmp_path / "resumed.pt")
    for name, value in full["state"].items():
        assert torch.equal(value, again["state"][name]), name
    assert full["certificate"]["epsilon"] == again["certificate"]["epsilon"]
    assert full["certificate"]["hyperparameters"]["sigma"] == again["certificate"]["hyperparameters"]["sigma"]
    assert not (tmp_path / "run.ckpt").exists(), "a run that succeeded leaves no checkpoint"


@pytest.fixture
def tiny():
    ds = SyntheticShortcuts(16, image_size=16, fine_fraction=0.5, seed=1)
    data = SegmentationUnlearningData.from_masks(ds.images, ds.coarse, ds.fine, ds.has_fine)
    torch.manual_seed(0)
    return EncoderDecoder(width=4).freeze_encoder(), data


def test_checkpoint_of_other_hyperparameters_is_refused(tmp_path, tiny):
    model, data = tiny
    path = tmp_path / "c.ckpt"
    finetune(model, data, steps=2, batch_size=4, checkpoint=path, checkpoint_every=1, keep_checkpoints=True)
    with pytest.raises(CheckpointError, match="different run.*hyperparameters"):
        finetune(model, data, steps=2, lr=0.5, batch_size=4, checkpoint=path)
    with pytest.raises(CheckpointError, match="different run"):
        model_clipping(model, data, steps=2, finetune_steps=1, batch_size=4, checkpoint=path, noise_seed=1)
    other = EncoderDecoder(width=8).freeze_encoder()
    with pytest.raises(CheckpointError, match="model"):
        finetune(other, data, steps=2, batch_size=4, checkpoint=path)


def test_corrupt_checkpoint_is_refused(tmp_path, tiny):
    model, data = tiny
    path = tmp_path / "c.ckpt"
    finetune(model, data, steps=2, batch_size=4, checkpoint=path, checkpoint_every=1, keep_checkpoints=True)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails authentication"):
        finetune(model, data, steps=2, batch_size=4, checkpoint=path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a pyunlearn checkpoint"):
        finetune(model, data, steps=2, batch_size=4, checkpoint=path)
    path.write_bytes(bytes(raw[:40]))
    with pytest.raises(CheckpointError):
        finetune(model, data, steps=2, batch_size=4, checkpoint=path)


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path / "a.ckpt", {"x": torch.arange(3)}, identity={"k": 1})
    save_checkpoint(tmp_path / "a.ckpt", {"x": torch.arange(4)}, identity={"k": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]
    assert torch.equal(load_checkpoint(tmp_path / "a.ckpt", identity={"k": 1})["x"], torch.arange(4))
    with pytest.raises(CheckpointError, match=r"\['k'\]"):
        load_checkpoint(tmp_path / "a.ckpt", identity={"k": 2})


def test_finished_run_resumes_to_the_same_result(tmp_path, tiny):
    model, data = tiny
    path = tmp_path / "gc.ckpt"
    first, rec1 = gradient_clipping(model, data, steps=2, finetune_steps=2, batch_size=4, noise_seed=3,
                                    checkpoint=path, checkpoint_every=1, keep_checkpoints=True)
    again, rec2 = gradient_clipping(model, data, steps=2, finetune_steps=2, batch_size=4, noise_seed=3,
                                    checkpoint=path, checkpoint_every=1)
    for (n, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert rec1["certificate"] == rec2["certificate"]
    assert not path.exists()  # the second run succeeded without keep_checkpoints


def _metrics(report):
    return {name: {k: v for k, v in m.items() if k not in ("wall_s", "hyperparameters")}
            for name, m in report["methods"].items()}


def test_cli_demo_killed_and_rerun_gives_the_same_report(tmp_path):
    """SIGKILL `pyunlearn demo` once a mid-pipeline checkpoint exists; the same command resumes."""
    import json
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "pyunlearn.cli", "demo", "--quick", "--no-progress", "--noise-seed", "3"]
    full = subprocess.run(base + ["--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=600,
                          env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    cmd = base + ["--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(ckpt)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while not (ckpt / "finetune.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "resumed" / "report.json").exists(), "the run finished before it could be killed"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    one = json.loads((tmp_path / "full" / "report.json").read_text())
    two = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert _metrics(one) == _metrics(two)


def test_checkpoint_of_another_starting_model_is_refused(tmp_path, tiny):
    """Same architecture and data, other weights: resuming would silently return the other run."""
    model, data = tiny
    path = tmp_path / "gc.ckpt"
    gradient_clipping(model, data, steps=2, finetune_steps=1, batch_size=4, noise_seed=1, checkpoint=path,
                      checkpoint_every=1, keep_checkpoints=True)
    other = EncoderDecoder(width=4).freeze_encoder()
    with pytest.raises(CheckpointError, match="model"):
        gradient_clipping(other, data, steps=2, finetune_steps=1, batch_size=4, noise_seed=1, checkpoint=path)
