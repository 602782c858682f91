"""No silent dead model: a training that ends in a (near-)constant output is retried with another
initialisation (trained from scratch) or reported dead, never as a row of numbers."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from pyunlearn import pipeline
from pyunlearn.pipeline import DeadModelError, DemoConfig, dead_reason, retry_seed, run_synthetic_demo
from pyunlearn.report import DEAD_CELL, format_table

TINY = DemoConfig(n_public=16, n_private=24, n_test=16, image_size=16, width=4, batch_size=8, public_steps=15,
                  coarse_steps=15, retrain_steps=5, finetune_steps=5, post_steps=3, gc_steps=2, mc_steps=2,
                  eval_every=5, s_global_boot=5, noise_seed=0, blank_is_dead=False)
METRICS = ("auroc", "worst_group_auroc", "group_auroc", "dice", "s_global", "trajectory")


@pytest.fixture(autouse=True)
def private_key_file(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PYUNLEARN_CHECKPOINT_KEY_FILE", str(tmp_path_factory.mktemp("keys") / "checkpoint.key"))
    monkeypatch.delenv("PYUNLEARN_CHECKPOINT_KEY", raising=False)


class Constant(nn.Module):
    """A collapsed segmenter: the same logit at every pixel of every image."""

    def __init__(self, logit: float = -25.0):
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), self.logit)


class Brightness(nn.Module):
    """A working (if crude) segmenter: foreground where the image is bright."""

    def forward(self, x):
        return 8.0 * (x.mean(dim=1, keepdim=True) - x.mean())


def test_dead_reason_both_ways():
    images = torch.rand(6, 3, 16, 16)
    for logit in (-25.0, 0.0, 25.0):
        assert "constant output" in dead_reason(Constant(logit), images)
    assert "non-finite" in dead_reason(Constant(float("nan")), images)
    assert dead_reason(Brightness(), images) is None
    # every pixel background, with a tiny spread: near-constant
    nearly = lambda x: -3.0 + 0.1 * x[:, :1]  # noqa: E731
    assert "near-constant" in dead_reason(type("M", (nn.Module,), {"forward": lambda self, x: nearly(x)})(), images)


class Shy(nn.Module):
    """A segmenter that ranks pixels (bright ones higher) but never crosses 0.5: a blank segmentation."""

    def forward(self, x):
        return -2.0 + 1.5 * (x.mean(dim=1, keepdim=True) - 0.5)


def test_blank_segmentation_is_dead_only_where_fine_masks_have_foreground():
    images = torch.rand(6, 3, 16, 16)
    fine = torch.zeros(6, 16, 16, dtype=torch.bool)
    fine[:, 4:8, 4:8] = True
    reason = dead_reason(Shy(), images, fine=fine)
    assert "blank segmentation" in reason and f"{int(fine.sum())} foreground pixels" in reason
    assert dead_reason(Shy(), images) is None  # no fine masks: nothing says a lesion was there
    assert dead_reason(Shy(), images, fine=torch.zeros_like(fine)) is None  # no lesion to find
    assert dead_reason(Brightness(), images, fine=fine) is None  # some pixel above 0.5: alive
    # the streamed rule from running sums agrees
    probs = torch.sigmoid(Shy()(images)).double()
    sums = (probs.numel(), float(probs.sum()), float((probs * probs).sum()), int((probs > 0.5).sum()), True)
    assert "blank segmentation" in pipeline.dead_reason_of_sums(*sums, foreground=int(fine.sum()))
    assert pipeline.dead_reason_of_sums(*sums) is None


@pytest.mark.parametrize("blank_is_dead", [True, False])
def test_blank_method_is_reported_dead_unless_the_check_is_off(tmp_path, monkeypatch, blank_is_dead):
    real = pipeline.unlearn.finetune

    def finetune(model, data, **kw):
        _, record = real(model, data, **kw)
        return Shy(), record

    monkeypatch.setattr(pipeline.unlearn, "finetune", finetune)
    monkeypatch.setattr(pipeline, "_check_dead", _blank_only_for(Shy, pipeline._check_dead))
    config = dataclasses.replace(TINY, methods=("coarse", "finetune"), blank_is_dead=blank_is_dead)
    m = run_synthetic_demo(tmp_path, seed=0, config=config, progress=False, figures=False)["methods"]["finetune"]
    if blank_is_dead:
        assert m["status"] == "dead" and "blank segmentation" in m["reason"] and "dice" not in m
    else:
        assert m["status"] == "ok" and m["dice"] < 1e-3


def _blank_only_for(cls, real):
    """The real check, with the blank rule applied to ``cls`` models only (TINY's own models are too
    under-trained to pass it)."""
    def check(model, train_images, test, *, blank=True):
        return real(model, train_images, test, blank=blank and isinstance(model, cls))
    return check


def test_trained_models_are_alive(tmp_path):
    """Every model of a working job passes the check. (Here model_clipping really collapses: at these few
    steps its output's std is ~1e-5, so it is left out; the --quick demo's is alive, see test_cli.)"""
    config = dataclasses.replace(TINY, methods=tuple(m for m in TINY.methods if m != "model_clipping"))
    report = run_synthetic_demo(tmp_path, seed=0, config=config, progress=False, figures=False)
    for name, m in report["methods"].items():
        assert m["status"] == "ok", (name, m.get("reason"))
        assert "auroc" in m
    assert report["methods"]["coarse"]["retries"] == []
    assert report["methods"]["retrain"]["retries"] == [] and report["methods"]["oracle"]["retries"] == []


def _kill(model):
    """Zero the decoder: a constant output (its last bias everywhere)."""
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.zero_()


def test_dead_coarse_decoder_is_retried_and_recorded(tmp_path, monkeypatch):
    real = pipeline.unlearn.train_segmenter

    def train(model, data, **kw):
        out = real(model, data, **kw)
        if kw["method"] == "coarse decoder" and kw["seed"] == 0:
            _kill(model)
        return out

    monkeypatch.setattr(pipeline.unlearn, "train_segmenter", train)
    report = run_synthetic_demo(tmp_path, seed=0, config=dataclasses.replace(TINY, methods=("coarse", "finetune")),
                                progress=False, figures=False)
    retries = report["methods"]["coarse"]["retries"]
    assert [(r["stage"], r["seed"]) for r in retries] == [("coarse decoder", 0)]
    assert "constant output" in retries[0]["reason"]
    assert report["methods"]["coarse"]["status"] == "ok" and report["methods"]["coarse"]["dice"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "Retried" in md and f"seed {retry_seed(0, 1)}" not in md  # the retry succeeded; the dead seed is named
    assert "coarse decoder seed 0" in md


def test_coarse_dead_after_every_retry_fails_clearly(tmp_path, monkeypatch):
    real = pipeline.unlearn.train_segmenter

    def train(model, data, **kw):
        out = real(model, data, **kw)
        if kw["method"] == "coarse decoder":
            _kill(model)
        return out

    monkeypatch.setattr(pipeline.unlearn, "train_segmenter", train)
    with pytest.raises(DeadModelError, match="coarse decoder: dead after 2 retries"):
        run_synthetic_demo(tmp_path, seed=0, config=dataclasses.replace(TINY, methods=("coarse",)),
                           progress=False, figures=False)
    assert not (tmp_path / "report.json").exists()


def test_dead_retrain_is_retried_with_another_seed(tmp_path, monkeypatch):
    real = pipeline.unlearn.retrain
    seeds = []

    def retrain(model, data, **kw):
        seeds.append(kw["seed"])
        trained, record = real(model, data, **kw)
        if kw["seed"] == 0:
            _kill(trained)
        return trained, record

    monkeypatch.setattr(pipeline.unlearn, "retrain", retrain)
    report = run_synthetic_demo(tmp_path, seed=0, config=dataclasses.replace(TINY, methods=("coarse", "retrain")),
                                progress=False, figures=False)
    assert seeds == [0, retry_seed(0, 1)]
    m = report["methods"]["retrain"]
    assert m["status"] == "ok" and "auroc" in m
    assert [r["seed"] for r in m["retries"]] == [0]


def _dead_method(real):
    def method(model, data, **kw):
        trained, record = real(model, data, **kw)
        return Constant(), record
    return method


@pytest.mark.parametrize("name", ["finetune", "gradient_clipping"])
def test_dead_method_from_the_coarse_model_is_reported_dead_without_metrics(tmp_path, monkeypatch, capsys, name):
    from pyunlearn.cli import main

    monkeypatch.setattr(pipeline.unlearn, name, _dead_method(getattr(pipeline.unlearn, name)))
    monkeypatch.setattr("pyunlearn.cli._quick_config", lambda: dataclasses.replace(TINY, noise_seed=None))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--noise-seed", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    m = report["methods"][name]
    assert m["status"] == "dead" and "constant output" in m["reason"]
    assert not set(METRICS) & set(m), m  # no numbers, no trajectory
    assert m["certificate"] is None  # a dead certified model is not released, so nothing is certified
    assert report["methods"]["neggrad_seg"]["status"] == "ok"
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    assert DEAD_CELL in row and not any(ch.isdigit() for ch in row.replace(name, ""))
    assert "Dead models" in md and f"## Certificate: {name}" not in md
    terminal = capsys.readouterr().out
    line = next(line for line in terminal.splitlines() if line.startswith(name + " "))
    assert DEAD_CELL in line and not any(ch.isdigit() for ch in line)
    assert (out / "subgroup_auroc.png").exists()


def test_summary_leaves_dead_seeds_out(tmp_path):
    from pyunlearn.report import summarize_seeds

    alive = {"auroc": 0.8, "worst_group_auroc": 0.7, "dice": 0.5, "s_global": 0.01, "wall_s": 1.0, "status": "ok"}
    dead = {"status": "dead", "reason": "constant output", "wall_s": 1.0}
    result = summarize_seeds({0: {"methods": {"finetune": alive}}, 1: {"methods": {"finetune": dead}}}, tmp_path)
    row = result["methods"]["finetune"]
    assert row["auroc"]["values"] == [0.8] and row["dead_seeds"] == [1]
    assert DEAD_CELL in (tmp_path / "summary.md").read_text()
    assert DEAD_CELL in format_table({"finetune": dead})


def test_hard_demo_trains_its_public_encoder_on_the_shifted_domain():
    import dataclasses

    from pyunlearn.cli import _quick_config
    from pyunlearn.data.synthetic import domain_skin_tones
    from pyunlearn.pipeline import build_synthetic

    config = dataclasses.replace(_quick_config(), difficulty="hard", n_public=12, n_private=12, n_test=12)
    public, private, test = build_synthetic(config, seed=0)
    low, high = domain_skin_tones("public")
    assert public.skin_tone is not None and bool(((public.skin_tone >= low) & (public.skin_tone <= high)).all())
    low, high = domain_skin_tones("private")
    for split in (private, test):
        assert bool(((split.skin_tone >= low) & (split.skin_tone <= high)).all())
    easy = build_synthetic(dataclasses.replace(config, difficulty="easy"), seed=0)[0]
    assert easy.skin_tone is None
