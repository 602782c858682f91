"""Every segmentation operator takes ``loss=`` (a name of pyunlearn.losses.get_loss or a callable): validated
before any work, used in every phase, recorded in the hyper-parameters and bound into the checkpoint identity."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from pyunlearn import losses
from pyunlearn.checkpoint import CheckpointError
from pyunlearn.masks import coarsen
from pyunlearn.unlearn import SegmentationUnlearningData, segmentation

POST = dict(finetune_steps=2, finetune_lr=1e-3, noise_seed=3)
OPERATORS = {
    "train_segmenter": (segmentation.train_segmenter, dict(steps=2, lr=1e-3)),
    "train_segmenter_all": (functools.partial(segmentation.train_segmenter, target="all"), dict(steps=2, lr=1e-3)),
    "finetune": (segmentation.finetune, dict(steps=2, lr=1e-3)),
    "retrain": (segmentation.retrain, dict(steps=2, lr=1e-3)),
    "relabel": (segmentation.relabel, dict(steps=2, lr=1e-3)),
    "neggrad_seg": (segmentation.neggrad_seg, dict(steps=2, lr=1e-3, beta=0.7)),
    "gradient_clipping": (segmentation.gradient_clipping, dict(steps=2, lr=0.05, epsilon=2.0, **POST)),
    "model_clipping": (segmentation.model_clipping, dict(steps=2, lr=0.05, epsilon=2.0, c2=5.0, **POST)),
    "output_perturbation": (segmentation.output_perturbation, dict(epsilon=2.0, c0=5.0, **POST)),
}
CERTIFIED = {"gradient_clipping", "model_clipping", "output_perturbation"}
COMMON = dict(batch_size=3, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread (two wait for each other on a loaded 2-core machine); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def private_key_file(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("keys") / "checkpoint.key"
    monkeypatch.setenv("PYUNLEARN_CHECKPOINT_KEY_FILE", str(path))
    monkeypatch.delenv("PYUNLEARN_CHECKPOINT_KEY", raising=False)


def make_data() -> SegmentationUnlearningData:
    g = torch.Generator().manual_seed(0)
    fine = torch.zeros(6, 8, 8, dtype=torch.bool)
    for i in range(6):
        r, c = 2 + i % 3, 2 + i // 3
        fine[i, r:r + 3, c:c + 3] = True
    coarse = coarsen(fine, radius=1)
    images = torch.randn(6, 1, 8, 8, generator=g) + 2.0 * coarse[:, None].float()
    return SegmentationUnlearningData.from_masks(images, coarse, fine, torch.tensor([1, 1, 1, 0, 0, 0]).bool())


def make_model(k: int = 2) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, k, 1))


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(name, model, data, **extra):
    fn, kw = OPERATORS[name]
    return fn(model, data, **COMMON, **{**kw, **extra})


@pytest.mark.parametrize("name", list(OPERATORS))
def test_unknown_or_bad_loss_is_refused_before_any_work(name, tmp_path):
    data, model = make_data(), make_model()
    before = state(model)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(ValueError, match=r"unknown loss 'dicee'.*'ce', 'dice', 'dice_ce', 'focal'"):
        run(name, model, data, loss="dicee", inplace=True, **({} if name == "output_perturbation"
                                                               else {"checkpoint": ckpt}))
    with pytest.raises(TypeError, match="must accept"):
        run(name, model, data, loss=lambda logits, target: logits.sum(), inplace=True)
    with pytest.raises(TypeError, match="loss must be a name"):
        run(name, model, data, loss=3, inplace=True)
    assert same(state(model), before), "a refused loss must leave the model unchanged"
    assert list(tmp_path.iterdir()) == [], "nothing may be written before the loss is validated"


class Spy:
    """A loss callable recording the masks it was given (and delegating to masked_focal)."""

    def __init__(self):
        self.calls = []

    def __call__(self, logits, target, mask, *, weight=None, reduction="mean"):
        self.calls.append((tuple(logits.shape), mask.detach().clone(), torch.is_grad_enabled()))
        return losses.masked_focal(logits, target, mask, weight=weight, reduction=reduction)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_loss_is_used_in_every_phase_and_recorded(name):
    data = make_data()
    fn, kw = OPERATORS[name]
    spy = Spy()
    out, record = run(name, make_model(), data, loss=spy)
    assert record["hyperparameters"]["loss"] == f"{__name__}.Spy"
    trained = [c for c in spy.calls if c[2]]
    steps = kw.get("steps", 0) + kw.get("finetune_steps", 0) if name in CERTIFIED else kw["steps"]
    terms = 2 if name == "neggrad_seg" else 1  # retain and forget terms
    assert len(trained) == steps * terms
    if name in CERTIFIED:  # plus the probe before any work, without gradients
        assert len(spy.calls) == len(trained) + 1 and not spy.calls[0][2]
    assert all(shape[1:] == (2, 8, 8) for shape, _, _ in spy.calls)
    masks = [m for _, m, _ in trained]

    def rows_of(batch, pool):  # every sample's mask is one of the data's masks
        return all(any(torch.equal(row, ref) for ref in pool) for row in batch)

    if name in ("relabel", "train_segmenter_all"):
        assert all(bool(m.all()) for m in masks), "on every pixel"
    elif name == "neggrad_seg":
        assert all(rows_of(m, data.retain) for m in masks[0::2]) and all(rows_of(m, data.forget) for m in masks[1::2])
    else:
        assert all(rows_of(m, data.retain) for m in masks), "on the retain pixels"

    _, named = run(name, make_model(), data, loss="dice")
    assert named["hyperparameters"]["loss"] == "dice"


def test_callable_names_of_partials_and_functions():
    name = segmentation._resolve_loss(functools.partial(losses.masked_focal, gamma=3.0, alpha=0.25))[1]
    assert name == "functools.partial(pyunlearn.losses.masked_focal, gamma=3.0, alpha=0.25)"
    fn, name = segmentation._resolve_loss(losses.masked_cross_entropy)
    assert fn is losses.masked_cross_entropy and name == "pyunlearn.losses.masked_cross_entropy"
    assert segmentation._resolve_loss(Spy())[1] == f"{__name__}.Spy"
    fn, name = segmentation._resolve_loss("ce")
    assert fn is losses.masked_cross_entropy and name == "ce"


@pytest.mark.parametrize("name", ["finetune", "neggrad_seg", "gradient_clipping", "output_perturbation"])
def test_default_is_the_fused_cross_entropy(name, monkeypatch):
    data = make_data()
    default, record = run(name, make_model(), data)
    assert record["hyperparameters"]["loss"] == "ce"
    fused = []
    real = losses.ops.masked_cross_entropy
    monkeypatch.setattr(losses.ops, "masked_cross_entropy", lambda *a: fused.append(1) or real(*a))
    explicit, _ = run(name, make_model(), data, loss="ce")
    assert fused, "loss='ce' goes through the fused op"
    assert same(state(default), state(explicit))
    dice, _ = run(name, make_model(), data, loss="dice")
    assert not same(state(default), state(dice)), "another loss trains differently"


@pytest.mark.parametrize("name", ["finetune", "gradient_clipping"])
def test_checkpoint_identity_binds_the_loss(name, tmp_path):
    data = make_data()
    ckpt = tmp_path / "run.ckpt"
    run(name, make_model(), data, loss="dice", checkpoint=ckpt, checkpoint_every=1, keep_checkpoints=True)
    assert ckpt.exists()
    with pytest.raises(CheckpointError, match="different run.*hyperparameters"):
        run(name, make_model(), data, loss="focal", checkpoint=ckpt)
    run(name, make_model(), data, loss="dice", checkpoint=ckpt)  # the same run resumes (and deletes the file)
    assert not ckpt.exists()


@pytest.mark.parametrize("name", list(OPERATORS))
def test_a_loss_that_is_not_a_scalar_is_refused_before_a_step(name):
    data, model = make_data(), make_model()
    before = state(model)

    def per_sample_only(logits, target, mask, *, weight=None, reduction="mean"):
        return losses.masked_cross_entropy(logits, target, mask, reduction="none")

    prefix = f"{name}: " if name in CERTIFIED else ""  # certified: the probe, before the optimizer is built
    with pytest.raises(ValueError, match=rf"^{prefix}loss '{__name__}.*per_sample_only' must return a scalar"):
        run(name, model, data, loss=per_sample_only, inplace=True)
    assert same(state(model), before)


@pytest.mark.parametrize("loss", ["dice", "dice_ce", "focal"])
def test_binary_models_train_with_every_named_loss(loss):
    out, record = segmentation.gradient_clipping(make_model(k=1), make_data(), loss=loss, **COMMON,
                                                 **OPERATORS["gradient_clipping"][1])
    assert record["hyperparameters"]["loss"] == loss and len(record["losses"]) == 2


def test_psg_segmentation_takes_loss():
    from pyunlearn.unlearn import psg_segmentation

    data = make_data()
    kw = dict(steps=2, inner_steps=1, batch_size=3, clip_range=None)
    with pytest.raises(ValueError, match="unknown loss 'dicee'"):
        psg_segmentation(make_model(), data, loss="dicee", **kw)
    spy = Spy()
    _, record = psg_segmentation(make_model(), data, loss=spy, **kw)
    assert len([c for c in spy.calls if c[2]]) == 2 * 2, "forget and retain terms of every step"
    ce, record_ce = psg_segmentation(make_model(), data, **kw)
    dice, record_dice = psg_segmentation(make_model(), data, loss="dice", **kw)
    assert (record_ce["loss"], record_dice["loss"]) == ("ce", "dice")
    assert not same(state(ce), state(dice)), "another loss trains differently"
