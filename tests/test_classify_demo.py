"""Smoke run of the ``classify-demo`` job (quick configuration), through its argument parser."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from PIL import Image

from pyunlearn import classify_demo

METHODS = {"original", "retrain", "finetune", "neggrad_plus", "scrub", "boundary_shrink", "psg", "compose"}
KEYS = {"forget_acc", "remain_acc", "test_acc", "mia", "wall_s"}


def test_classify_demo_quick_cli(tmp_path):
    parser = argparse.ArgumentParser(prog="pyunlearn classify-demo")
    classify_demo.add_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(["--out", str(out), "--seed", "1", "--quick", "--quiet"])
    threads = torch.get_num_threads()
    assert classify_demo.main(args) == 0
    assert torch.get_num_threads() == threads  # restored

    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 1 and report["quick"] is True
    assert set(report["scenarios"]) == {"class", "device"}
    assert report["methods"] == report["scenarios"]["class"]["methods"]
    for name, sc in report["scenarios"].items():
        assert set(sc["methods"]) == METHODS
        for method, m in sc["methods"].items():
            assert KEYS <= set(m), (name, method)
            for key in ("forget_acc", "remain_acc", "test_acc", "mia"):
                assert 0.0 <= m[key] <= 1.0, (name, method, key)
            assert m["wall_s"] >= 0
        assert sc["sizes"]["forget"] > 0 and sc["sizes"]["heldout"] > 0
        assert sc["records"]["psg"]["relabel_stayed_true"] <= sc["sizes"]["forget"]
        assert sc["records"]["compose"]["remain_model"] in METHODS
        with Image.open(out / sc["plot"]) as img:
            assert img.format == "PNG" and img.size[0] > img.size[1] > 0
    assert "targets" in report["scenarios"]["class"]
    assert report["scenarios"]["class"]["methods"]["retrain"]["forget_acc"] == 0.0  # never saw the class
    md = (out / "report.md").read_text()
    assert "## Scenario `class`" in md and "| psg |" in md and "embedding_device.png" in md


def test_device_artefact_is_in_range_and_fixed():
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = classify_demo.device_artefact(x), classify_demo.device_artefact(x)
    assert torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert bool((a[..., -1] == 1).all())  # the stripe
    assert float(a.mean()) > float(x.mean())  # raised black level


def test_combined_score():
    perfect = {"forget_acc": 0.0, "remain_acc": 1.0, "mia": 0.5}
    assert classify_demo.combined_score(perfect, 1.0) == 1.0
    worst = {"forget_acc": 1.0, "remain_acc": 0.0, "mia": 1.0}
    assert classify_demo.combined_score(worst, 1.0) == 0.0
    assert math.isclose(classify_demo.combined_score({"forget_acc": 0.1, "remain_acc": 0.9, "mia": 0.6}, 0.95),
                        (0.9 + 0.9 / 0.95 + 0.8) / 3)


def test_run_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="seed"):
        classify_demo.run(str(tmp_path), seed="0")
    with pytest.raises(ValueError, match="threads"):
        classify_demo.run(str(tmp_path), threads=0)
