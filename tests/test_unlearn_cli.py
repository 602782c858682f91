"""``pyunlearn unlearn CONFIG.toml`` on a user's own model: a tiny folder data set, a factory of the user's,
a MONAI U-Net, an output selector, and configuration errors that fail before any work."""
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import pyunlearn.unlearn_job as job
from pyunlearn.certify import Certificate
from pyunlearn.cli import main
from pyunlearn.config import ConfigError

N = 16

MYMODELS = '''
import torch
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self, width=8, tuple_out=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 2, 1)
        self.tuple_out = tuple_out

    def forward(self, x):
        y = self.head(self.body(x))
        return (y, y.mean()) if self.tuple_out else y


def tiny(**kwargs):
    return Tiny(**kwargs)


def tiny_bn(**kwargs):
    model = Tiny(**kwargs)
    model.body.insert(1, nn.BatchNorm2d(model.head.in_channels))
    return model


NOT_CALLABLE = 3
'''

GC = dict(operator="gradient_clipping", epsilon=1.0, delta=1e-5, steps=5, lr=0.1, c0=1.0, c1=0.1, weight_decay=5.0,
          finetune_steps=3, finetune_lr=1e-2, batch_size=4, noise_seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 images 32x32: a disk (bright for label 1), a bar artefact beside it on flagged images; coarse masks
    (disk dilated by 3, so they hold the bar) for all, fine masks (the disk) for 10."""
    root = tmp_path_factory.mktemp("data")
    for name in ("images", "coarse", "fine"):
        (root / name).mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    labels, flags = ["image,label"], ["image,ruler"]
    for i in range(N):
        label, art = i % 2, (i // 2) % 2
        cy, cx = rng.integers(12, 20, size=2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        coarse = (yy - cy) ** 2 + (xx - cx) ** 2 <= 64
        img = rng.normal(60, 10, size=(32, 32, 3))
        img[disk] += 100 if label else 60
        if art:
            img[(np.abs(yy - cy) <= 1) & (np.abs(xx - cx - 7) <= 1)] = 250
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray((coarse * 255).astype(np.uint8)).save(root / "coarse" / f"im{i:02d}.png")
        if i < 10:
            Image.fromarray((disk * 255).astype(np.uint8)).save(root / "fine" / f"im{i:02d}.png")
        labels.append(f"im{i:02d},{label}")
        flags.append(f"im{i:02d},{art}")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    (root / "artefacts.csv").write_text("\n".join(flags) + "\n")
    return root


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("mymodels", None)
    return importlib.import_module("mymodels")


def coarse_model(model, folder, *, steps=60, select=lambda out: out):
    """Train ``model`` a little on the coarse masks (the user's coarse model)."""
    from pyunlearn.data import CoarseFineFolder

    items = [CoarseFineFolder(folder / "images", folder / "coarse")[i] for i in range(N)]
    x = torch.stack([it["image"] for it in items])
    y = torch.stack([it["coarse"] for it in items]).long()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(select(model(x)), y).backward()
        opt.step()
    return model


def toml_value(v):
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_config(tmp_path, folder, *, model, unlearn=None, data=None, split=None, top=None):
    tables = {"model": model, "unlearn": unlearn or GC,
              "data": data if data is not None else dict(kind="folder", images=str(folder / "images"), coarse=str(folder / "coarse"),
                                   fine=str(folder / "fine"), labels_csv=str(folder / "labels.csv"),
                                   artefacts_csv=str(folder / "artefacts.csv")),
              "split": split or dict(test=0.5, seed=0)}
    lines = [f"{k} = {toml_value(v)}" for k, v in (top or {"out": "runs/unlearned"}).items()]
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = tmp_path / "unlearn.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_setup(tmp_path, folder, models, **model_extra):
    torch.manual_seed(0)
    net = coarse_model(models.tiny(), folder)
    torch.save(net.state_dict(), tmp_path / "coarse_model.pt")
    model = dict(factory="mymodels:tiny", kwargs={"width": 8}, weights="coarse_model.pt", certify=["head.*"],
                 **model_extra)
    return net, model


def check_outputs(out, factory, original: dict, certified: set):
    for name in ("unlearned.pt", "certificate.json", "report.json", "report.md"):
        assert (out / name).is_file(), name
    state = torch.load(out / "unlearned.pt", weights_only=True)
    assert set(state) == set(original)  # the user's key names
    fresh = factory()
    fresh.load_state_dict(state, strict=True)
    for k, v in original.items():
        if k in certified:
            assert not torch.equal(state[k], v), k  # unlearned
        else:
            assert torch.equal(state[k], v), k  # frozen: bit-identical
    cert = Certificate.from_json((out / "certificate.json").read_text())
    frozen = sorted(k for k, _ in factory().named_parameters() if k not in certified)
    assert sorted(cert.public_parameters) == frozen and sorted(cert.parameters) == sorted(certified)
    assert any("public_parameters" in a for a in cert.assumptions)
    assert cert.epsilon <= 1.0 + 1e-9 and cert.delta == 1e-5
    return json.loads((out / "report.json").read_text()), cert


def test_unlearn_a_user_model_from_folders(tmp_path, folder, models):
    net, model = tiny_setup(tmp_path, folder, models)
    config = write_config(tmp_path, folder, model=model)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    assert main(["unlearn", str(config), "--no-progress"]) == 0
    out = tmp_path / "runs" / "unlearned"  # relative to the config file
    report, cert = check_outputs(out, models.tiny, original, {"head.weight", "head.bias"})
    assert cert.operator == "gradient_clipping" and cert.seeded
    for side in ("before", "after"):
        r = report[side]
        assert r["status"] == "ok", r
        assert 0.0 <= r["dice"] <= 1.0 and r["n_fine"] > 0
        assert 0.0 <= r["auroc"] <= 1.0
        assert "worst_group_auroc" in r and "group_auroc" in r
    assert report["config"]["split"]["n_test"] == 8 and report["config"]["split"]["n_unlearn"] == 8
    assert report["before"]["dice"] != report["after"]["dice"]
    md = (out / "report.md").read_text()
    assert "| Dice (fine masks) |" in md and "before" in md and "assumed public" in md


def test_unlearn_a_monai_unet(tmp_path, folder):
    from monai.networks.nets import UNet

    kwargs = dict(spatial_dims=2, in_channels=3, out_channels=2, channels=[4, 8], strides=[2], num_res_units=0)
    torch.manual_seed(0)
    net = coarse_model(UNet(**kwargs), folder, steps=20)
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    certify = ["model.2.*"]
    names = [k for k, _ in net.named_parameters()]
    certified = {k for k in names if k.startswith("model.2.")}
    assert certified and len(certified) < len(names)
    config = write_config(tmp_path, folder, model=dict(factory="monai.networks.nets:UNet", kwargs=kwargs,
                                                       weights="unet.pt", certify=certify),
                          unlearn={**GC, "steps": 2, "finetune_steps": 1, "loss": "dice_ce"})
    original = {k: v.clone() for k, v in net.state_dict().items()}
    assert main(["unlearn", str(config), "--no-progress"]) == 0
    report, _ = check_outputs(tmp_path / "runs" / "unlearned", lambda: UNet(**kwargs), original, certified)
    assert report["record"]["hyperparameters"]["loss"] == "dice_ce"


def test_output_selector_unwraps_a_tuple_model(tmp_path, folder, models):
    torch.manual_seed(0)
    net = coarse_model(models.tiny(tuple_out=True), folder, select=lambda out: out[0])
    torch.save(net.state_dict(), tmp_path / "coarse_model.pt")
    model = dict(factory="mymodels:tiny", kwargs={"tuple_out": True}, weights="coarse_model.pt",
                 certify=["head.weight"])
    original = {k: v.clone() for k, v in net.state_dict().items()}
    config = write_config(tmp_path, folder, model=model)
    with pytest.raises(TypeError, match=r"returns a tuple of 2 outputs; set \[model\] output"):
        main(["unlearn", str(config), "--no-progress"])
    config = write_config(tmp_path, folder, model={**model, "output": 0})
    assert main(["unlearn", str(config), "--no-progress"]) == 0
    check_outputs(tmp_path / "runs" / "unlearned", lambda: models.tiny(tuple_out=True), original, {"head.weight"})
    bad = write_config(tmp_path, folder, model={**model, "output": "logits"})
    with pytest.raises(TypeError, match=r"output = 'logits' does not select from a tuple"):
        main(["unlearn", str(bad), "--no-progress"])


def test_uncertified_operator_releases_no_certificate(tmp_path, folder, models):
    _, model = tiny_setup(tmp_path, folder, models)
    config = write_config(tmp_path, folder, model=model, unlearn=dict(operator="finetune", steps=2, batch_size=4),
                          top={"out": "ft"})
    assert main(["unlearn", str(config), "--no-progress"]) == 0
    out = tmp_path / "ft"
    assert (out / "unlearned.pt").is_file() and not (out / "certificate.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["certificate"] is None and "not certified" in (out / "report.md").read_text()


class Shy(torch.nn.Module):
    """``model`` with its foreground logit lowered until no pixel of a batch is foreground; the ranking stays."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)
        margin = y[:, 1] - y[:, 0]
        return torch.stack([y[:, 0], y[:, 1] - margin.max() - 1.0], dim=1)


@pytest.mark.parametrize("death", ["constant output", "blank segmentation"])
def test_a_dead_result_is_reported_dead_and_not_released(tmp_path, folder, models, monkeypatch, death):
    _, model = tiny_setup(tmp_path, folder, models)
    config = write_config(tmp_path, folder, model=model, unlearn=dict(operator="finetune", steps=1, batch_size=4))
    real = job.operator_function

    def killing(name):
        def op(model, data, **kwargs):
            out, record = real(name)(model, data, **kwargs)
            if death == "blank segmentation":
                return Shy(out), record
            with torch.no_grad():
                out.head.weight.zero_()
                out.head.bias.copy_(torch.tensor([5.0, -5.0]))
            return out, record
        return op

    monkeypatch.setattr(job, "operator_function", killing)
    assert main(["unlearn", str(config), "--no-progress"]) == 1
    out = tmp_path / "runs" / "unlearned"
    report = json.loads((out / "report.json").read_text())
    assert report["after"] == {"status": "dead", "reason": report["after"]["reason"]}
    assert death in report["after"]["reason"] and report["before"]["status"] == "ok"
    md = (out / "report.md").read_text()
    assert not (out / "unlearned.pt").exists() and "is dead" in md and death in md


def test_batchnorm_is_refused_unless_replaced(tmp_path, folder, models):
    torch.manual_seed(0)
    net = coarse_model(models.tiny_bn(), folder)
    torch.save(net.state_dict(), tmp_path / "bn.pt")
    model = dict(factory="mymodels:tiny_bn", weights="bn.pt", certify=["head.*"])
    config = write_config(tmp_path, folder, model=model)
    with pytest.raises(ValueError, match=r"BatchNorm2d\) is frozen but model\.train\(\) puts it in training mode"):
        main(["unlearn", str(config), "--no-progress"])
    config = write_config(tmp_path, folder, model={**model, "replace_batchnorm": True})
    assert main(["unlearn", str(config), "--no-progress"]) == 0
    out = tmp_path / "runs" / "unlearned"
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["model"]["converted"] and "GroupNorm" in (out / "report.md").read_text()
    state = torch.load(out / "unlearned.pt", weights_only=True)
    assert "body.1.running_mean" not in state and torch.equal(state["body.0.weight"], net.state_dict()["body.0.weight"])


def test_unlearn_on_isic(tmp_path, models):
    from fixtures_isic import make_isic_folder

    root = make_isic_folder(tmp_path / "isic", n=12, size=(24, 24), seed=1)
    torch.manual_seed(0)
    net = models.tiny()
    with torch.no_grad():
        net.head.bias.fill_(3.0)  # an untrained model that marks lesion somewhere: not a blank segmentation
    torch.save(net.state_dict(), tmp_path / "w.pt")
    config = write_config(tmp_path, None, model=dict(factory="mymodels:tiny", weights="w.pt", certify=["head.*"]),
                          unlearn=dict(operator="finetune", steps=1, lr=1e-4, batch_size=4),
                          data=dict(kind="isic", root=str(root), artefacts_csv="isic2018_artefacts.csv",
                                    positive_classes=["MEL", "NV"], size=16, coarse_radius=1))
    with pytest.warns(UserWarning, match="dropped 1 of 12 images"):
        assert main(["unlearn", str(config), "--no-progress"]) == 0
    report = json.loads((tmp_path / "runs" / "unlearned" / "report.json").read_text())
    assert report["before"]["n_fine"] == report["config"]["split"]["n_test"]  # every ISIC image has a fine mask
    bad = write_config(tmp_path, None, model=dict(factory="mymodels:tiny", weights="w.pt", certify=["head.*"]),
                       data=dict(kind="isic", root=str(root)))
    with pytest.raises(ConfigError, match=r"\[data\] kind = 'isic' needs exactly one of coarse_dir"):
        main(["unlearn", str(bad), "--no-progress"])


# ------------------------------------------------------------------ errors before any work
@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the configuration was checked")

    for name in ("_dataset", "evaluate_stream", "unlearning_data"):
        monkeypatch.setattr(job, name, forbidden)


@pytest.mark.parametrize("change, error, message", [
    (dict(model={"factori": "mymodels:tiny"}), ConfigError,
     r"unlearn\.toml: \[model\] unknown key 'factori' \(did you mean 'factory'\?\)"),
    (dict(unlearn={"stepz": 3}), ConfigError,
     r"\[unlearn\] operator 'gradient_clipping' takes no argument 'stepz' \(did you mean 'steps'\?\)"),
    (dict(unlearn={"epsilon": "1"}), ConfigError, r"\[unlearn\] epsilon must be a number, got str '1'"),
    (dict(unlearn={"delta": 2.0}), ConfigError, r"\[unlearn\] delta must lie in \(0, 1\)"),
    (dict(unlearn={"loss": "dice-ce"}), ConfigError, r"\[unlearn\] loss: unknown value 'dice-ce' \(did you mean"),
    (dict(unlearn={"operator": "gradient_cliping"}), ConfigError,
     r"operator: unknown operator 'gradient_cliping' \(did you mean 'gradient_clipping'\?\)"),
    (dict(unlearn={"eval_fn": "x"}), ConfigError, r"takes no argument 'eval_fn'"),
    (dict(model={"certify": ["decoder.*"]}), ValueError,
     r"\[model\] certify: pattern 'decoder\.\*' matches no parameter of the model; its parameters are: body\.0"),
    (dict(model={"certify": []}), ConfigError, r"\[model\] certify must list at least one"),
    (dict(model={"weights": "missing.pt"}), ConfigError, r"\[model\] weights: no such file .*missing\.pt"),
    (dict(model={"factory": "nomodule:tiny"}), ConfigError, r"\[model\] factory: cannot import module 'nomodule'"),
    (dict(model={"factory": "mymodels:huge"}), ConfigError, r"\[model\] factory: module 'mymodels' has no attribute"),
    (dict(model={"factory": "mymodels:NOT_CALLABLE"}), ConfigError, r"\[model\] factory: .* not a callable"),
    (dict(model={"factory": "mymodels.tiny"}), ConfigError, r"\[model\] factory: must be 'package\.module:callable'"),
    (dict(model={"kwargs": {"widht": 4}}), ValueError,  # tiny(**kwargs): only the call can tell
     r"\[model\] factory: calling it with \[model\.kwargs\] failed: TypeError: .*'widht'"),
    (dict(model={"factory": "mymodels:Tiny", "kwargs": {"widht": 4}}), ConfigError,
     r"\[model\.kwargs\] do not fit mymodels:Tiny: .*'widht'"),
    (dict(model={"kwargs": {"width": 4}}), ValueError,
     r"\[model\] weights: .* has tensors of other shapes than the model"),
    (dict(data={"images": "nowhere"}), ConfigError, r"\[data\] images: no such folder"),
    (dict(data={"fine_masks": "x"}), ConfigError, r"\[data\] unknown key 'fine_masks'"),
    (dict(split={"tests": 0.3}), ConfigError, r"\[split\] unknown key 'tests' \(did you mean 'test'\?\)"),
    (dict(top={"out": "a_file/out"}), ConfigError, r"unlearn\.toml: out: cannot create or write the folder"),
])
def test_config_errors_fail_before_any_work(tmp_path, folder, models, no_work, change, error, message):
    net = models.tiny()
    torch.save(net.state_dict(), tmp_path / "coarse_model.pt")
    (tmp_path / "a_file").write_text("x")
    model = dict(factory="mymodels:tiny", weights="coarse_model.pt", certify=["head.*"])
    tables = dict(model=model, unlearn=dict(GC), split=dict(test=0.5, seed=0), top={"out": "out"})
    data = dict(kind="folder", images=str(folder / "images"), coarse=str(folder / "coarse"))
    for table, values in change.items():
        if table == "data":
            data.update(values)
        else:
            tables[table] = {**tables[table], **values}
    config = write_config(tmp_path, folder, data=data, **tables)
    with pytest.raises(error, match=message):
        main(["unlearn", str(config), "--no-progress"])


def test_weights_with_other_keys_are_listed(tmp_path, folder, models, no_work):
    state = models.tiny().state_dict()
    state["extra.weight"] = state.pop("head.bias")
    torch.save(state, tmp_path / "w.pt")
    config = write_config(tmp_path, folder, model=dict(factory="mymodels:tiny", weights="w.pt", certify=["head.*"]))
    with pytest.raises(ValueError, match=r"missing keys \(1\): head\.bias; unexpected keys \(1\): extra\.weight"):
        main(["unlearn", str(config), "--no-progress"])
    torch.save({"state_dict": models.tiny().state_dict(), "epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"checkpoint holding a 'state_dict' entry"):
        main(["unlearn", str(config), "--no-progress"])


def test_missing_tables_and_top_level_keys(tmp_path, no_work):
    path = tmp_path / "unlearn.toml"
    path.write_text(textwrap.dedent('''
        out = "x"
        [model]
        factory = "a:b"
    '''))
    with pytest.raises(ConfigError, match=r"unlearn\.toml: missing required entry 'unlearn'"):
        main(["unlearn", str(path)])


def test_unlearn_a_3d_monai_unet_on_nifti_volumes(tmp_path):
    nib = pytest.importorskip("nibabel")
    from monai.networks.nets import UNet

    root = tmp_path / "vols"
    for sub in ("images", "coarse", "fine"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (8, 8, 8)
    for i in range(6):
        fine = np.zeros(shape, dtype=np.uint8)
        fine[2:5, 2 + i % 3:5 + i % 3, 2:5] = 1
        coarse = np.zeros(shape, dtype=np.uint8)
        coarse[1:7, 1:8, 1:7] = 1
        nib.Nifti1Image(rng.random(shape).astype(np.float32) + fine, np.eye(4)).to_filename(
            str(root / "images" / f"v{i}.nii.gz"))
        nib.Nifti1Image(coarse, np.eye(4)).to_filename(str(root / "coarse" / f"v{i}.nii.gz"))
        if i < 4:
            nib.Nifti1Image(fine, np.eye(4)).to_filename(str(root / "fine" / f"v{i}.nii.gz"))
    kwargs = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], strides=[2], num_res_units=0)
    torch.manual_seed(0)
    torch.save(UNet(**kwargs).state_dict(), tmp_path / "unet3d.pt")
    config = write_config(tmp_path, None, model=dict(factory="monai.networks.nets:UNet", kwargs=kwargs,
                                                      weights="unet3d.pt", certify=["*"]),
                          unlearn=dict(GC, batch_size=2, steps=2, finetune_steps=1),
                          data=dict(kind="nifti", images=str(root / "images"), coarse=str(root / "coarse"),
                                    fine=str(root / "fine")))
    assert main(["unlearn", str(config), "--no-progress"]) == 0
    out = tmp_path / "runs" / "unlearned"
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert report[side]["status"] == "ok" and report[side]["n_fine"] == 2 and 0 <= report[side]["dice"] <= 1
    cert = Certificate.from_json((out / "certificate.json").read_text())
    assert cert.public_parameters == [] and sorted(cert.parameters) == sorted(n for n, _ in UNet(**kwargs).named_parameters())
    state = torch.load(out / "unlearned.pt", weights_only=True)
    UNet(**kwargs).load_state_dict(state)


def test_unlearn_with_psg_segmentation(tmp_path, folder, models):
    net, model = tiny_setup(tmp_path, folder, models)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    config = write_config(tmp_path, folder, model=model,
                          unlearn=dict(operator="psg_segmentation", steps=3, inner_steps=2, batch_size=4,
                                       loss="dice_ce"))
    assert main(["unlearn", str(config), "--no-progress"]) == 0
    out = tmp_path / "runs" / "unlearned"
    assert not (out / "certificate.json").exists(), "psg_segmentation is not certified"
    state = torch.load(out / "unlearned.pt", weights_only=True)
    assert not torch.equal(state["head.weight"], original["head.weight"])
    assert torch.equal(state["body.0.weight"], original["body.0.weight"]), "frozen parameters stay"
