"""The main job from the command line, on tiny configurations."""
import json
import stat

import pytest

from pyunlearn.cli import main
from pyunlearn.pipeline import METHODS

METRIC_KEYS = {"auroc", "worst_group_auroc", "group_auroc", "dice", "s_global", "s_global_ci", "wall_s", "certificate"}


@pytest.fixture(autouse=True)
def private_key_file(tmp_path_factory, monkeypatch):
    """Checkpoints are authenticated with a key file of the test's own, outside the checkpoint folders."""
    monkeypatch.setenv("PYUNLEARN_CHECKPOINT_KEY_FILE", str(tmp_path_factory.mktemp("keys") / "checkpoint.key"))
    monkeypatch.delenv("PYUNLEARN_CHECKPOINT_KEY", raising=False)


def test_demo_quick_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--seed", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["seed"] == 3
    assert list(report["methods"]) == list(METHODS)
    for name, metrics in report["methods"].items():
        assert METRIC_KEYS <= set(metrics), name
        assert 0.0 <= metrics["auroc"] <= 1.0
        lo, hi = metrics["s_global_ci"]
        assert lo <= hi
        assert set(metrics["group_auroc"]) == {"pos_art_vs_neg_art", "pos_art_vs_neg_clean",
                                               "pos_clean_vs_neg_art", "pos_clean_vs_neg_clean"}
    for name in ("gradient_clipping", "model_clipping"):
        cert = report["methods"][name]["certificate"]
        assert cert["epsilon"] <= 1.0 + 1e-9 and cert["delta"] == 1e-5
        assert cert["parameters"] and all(p.startswith("decoder.") for p in cert["parameters"])
    for name in ("coarse", "retrain", "oracle", "finetune", "neggrad_seg"):
        assert report["methods"][name]["certificate"] is None
    for picture in ("overlays.png", "trajectory.png", "subgroup_auroc.png"):
        assert (out / picture).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "gradient_clipping" in md and "Assumptions" in md
    assert "Noise: secret" in md and "secret noise" in md and "Diagnostics are on" not in md
    for name, noisy in (("gradient_clipping", report["config"]["gc_steps"]),
                        ("model_clipping", report["config"]["mc_steps"])):
        method = report["methods"][name]
        assert "diagnostics" not in method and method["certificate"]["not_covered"] == []
        assert method["trajectory"][0]["step"] == noisy  # starts at the certified model
    assert "worst-group AUROC" in capsys.readouterr().out


def _metrics(report):
    return {name: {k: v for k, v in m.items() if k != "wall_s"} for name, m in report["methods"].items()}


def test_demo_checkpoints_are_private_and_deleted_after_success(tmp_path):
    ckpt = tmp_path / "ckpt"
    base = ["demo", "--quick", "--no-progress", "--noise-seed", "3", "--checkpoint-dir", str(ckpt)]
    assert main(base + ["--out", str(tmp_path / "kept"), "--keep-checkpoints"]) == 0
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == sorted(f"{m}.ckpt" for m in ("public_encoder", "coarse_decoder") + METHODS[1:]), files
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in ckpt.iterdir())
    # The same command without --keep-checkpoints replays every stage from its checkpoint and then deletes
    # them all, the coarse model's included.
    assert main(base + ["--out", str(tmp_path / "replayed")]) == 0
    assert not ckpt.exists()
    kept, replayed = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("kept", "replayed"))
    assert _metrics(kept) == _metrics(replayed)


def test_demo_refuses_a_checkpoint_dir_in_use(tmp_path):
    from pyunlearn.checkpoint import CheckpointLockedError, RunLock

    ckpt = tmp_path / "ckpt"
    with RunLock(ckpt / ".pyunlearn.lock"):
        with pytest.raises(CheckpointLockedError, match="another run"):
            main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "o"), "--checkpoint-dir", str(ckpt)])


def test_demo_diagnostics_are_labelled_not_covered(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--diagnostics", "--noise-seed", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("gradient_clipping", "model_clipping"):
        method = report["methods"][name]
        assert method["diagnostics"]["trajectory"][0]["step"] == 0
        assert method["certificate"]["not_covered"] and method["certificate"]["seeded"] is True
    md = (out / "report.md").read_text()
    assert "Diagnostics are on" in md and "NOT covered by this certificate" in md and "seeded (seed" in md


def test_demo_rejects_cuda_without_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        main(["demo", "--out", str(tmp_path), "--quick", "--device", "cuda", "--no-progress"])


def test_run_config_on_isic_folder(tmp_path):
    from fixtures_isic import make_isic_folder

    root = make_isic_folder(tmp_path / "isic", n=24, size=(24, 24), seed=1)
    config = tmp_path / "job.toml"
    config.write_text(f"""
out = "report"
[data]
kind = "isic"
root = "{root}"
artefacts_csv = "isic2018_artefacts.csv"
positive_classes = ["MEL", "NV", "BCC"]
size = 16
coarse_radius = 1
[split]
public = 0.3
test = 0.3
seed = 0
[pipeline]
width = 4
public_steps = 3
coarse_steps = 3
retrain_steps = 2
finetune_steps = 2
post_steps = 2
gc_steps = 2
mc_steps = 2
eval_every = 1
s_global_boot = 5
blank_is_dead = false  # a smoke run: 3 steps leave the models blank
# Seeded: with secret noise, about 1 run in 10 saturated this width-4 model (reported dead, no certificate).
noise_seed = 1
methods = ["coarse", "retrain", "finetune", "gradient_clipping", "psg_segmentation"]
""")
    with pytest.warns(UserWarning, match="dropped 1 of 24 images"):  # the fixture leaves one image unlabelled
        assert main(["run", str(config), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["coarse", "retrain", "finetune", "gradient_clipping", "psg_segmentation"]
    assert report["methods"]["gradient_clipping"]["certificate"]["epsilon"] <= 1.0 + 1e-9


def test_run_config_errors(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('out = "x"\n[data]\nkind = "nope"\n')
    with pytest.raises(ValueError, match="kind must be 'isic' or 'folder'"):
        main(["run", str(config), "--no-progress"])
    config.write_text('[data]\nkind = "isic"\n')
    with pytest.raises(ValueError, match="missing required entry 'out'"):
        main(["run", str(config), "--no-progress"])


def test_run_config_folder_without_labels_is_refused(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "images" / f"a{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / f"a{i}.png")
    config = tmp_path / "job.toml"
    config.write_text(f'out = "r"\n[data]\nkind = "folder"\nimages = "{tmp_path / "images"}"\n'
                      f'masks = "{tmp_path / "masks"}"\n')
    with pytest.raises(ValueError, match="labels_csv"):
        main(["run", str(config), "--no-progress"])


def test_summarize_seeds_mean_and_spread(tmp_path):
    from pyunlearn.report import summarize_seeds

    def fake(worst):
        return {"methods": {"retrain": {"auroc": 0.8, "worst_group_auroc": worst, "dice": 0.9, "s_global": 0.0,
                                        "wall_s": 1.0}}}

    result = summarize_seeds({0: fake(0.6), 1: fake(0.8)}, tmp_path)
    row = result["methods"]["retrain"]["worst_group_auroc"]
    assert row["mean"] == pytest.approx(0.7)
    assert row["std"] == pytest.approx(0.1414213562, rel=1e-6)
    assert "0.700 ± 0.141" in (tmp_path / "summary.md").read_text()
