"""Tests of pyunlearn.unlearn: the retain/forget pixel sets and the segmentation unlearning operators."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyunlearn import unlearn
from pyunlearn.data import SyntheticShortcuts
from pyunlearn.masks import coarsen
from pyunlearn.models import EncoderDecoder
from pyunlearn.unlearn import SegmentationUnlearningData

# ------------------------------------------------------------------ SegmentationUnlearningData.from_masks


@st.composite
def mask_sets(draw):
    n = draw(st.integers(1, 4))
    h = draw(st.sampled_from([3, 5, 7]))
    w = draw(st.sampled_from([3, 5, 9]))
    fine = torch.from_numpy(draw(arrays(np.bool_, (n, h, w))))
    coarse = coarsen(fine, radius=draw(st.integers(0, 2)))
    has_fine = torch.from_numpy(draw(arrays(np.bool_, (n,))))
    images = torch.randn(n, 2, h, w, generator=torch.Generator().manual_seed(n * h * w))
    return images, coarse, fine, has_fine


@given(mask_sets(), st.booleans())
def test_from_masks_identities(sets, coarse_background):
    images, coarse, fine, has_fine = sets
    data = SegmentationUnlearningData.from_masks(images, coarse, fine, has_fine,
                                                 coarse_background=coarse_background)
    n = images.shape[0]
    assert len(data) == n
    assert data.images is images
    for name in ("retain", "forget"):
        t = getattr(data, name)
        assert t.dtype == torch.bool and t.shape == coarse.shape, name
    assert data.target.dtype == torch.int64 and data.coarse.dtype == torch.int64
    assert torch.equal(data.has_fine, has_fine)
    assert torch.equal(data.coarse, coarse.long())
    for i in range(n):
        if has_fine[i]:
            assert bool(data.retain[i].all()), "every pixel of a fine-labelled image is retained"
            assert torch.equal(data.forget[i], coarse[i] & ~fine[i])
            assert torch.equal(data.target[i], fine[i].long())
        else:
            assert not bool(data.forget[i].any()), "no known forget pixels without a fine mask"
            expected = ~coarse[i] if coarse_background else torch.zeros_like(coarse[i])
            assert torch.equal(data.retain[i], expected)
            assert not bool((data.retain[i] & coarse[i]).any()), "inside of a coarse-only mask is never retained"
            assert torch.equal(data.target[i], coarse[i].long())
    # Retained pixels carry correct labels: fine on fine images, background outside coarse elsewhere.
    truth = torch.where(has_fine[:, None, None], fine, torch.zeros_like(fine)).long()
    assert torch.equal(data.target[data.retain], truth[data.retain])
    relabelled = data.relabelled_target
    assert torch.equal(relabelled[~has_fine], coarse[~has_fine].long())
    assert not bool(relabelled[data.forget].any()), "known forget pixels are relabelled to background"


def test_from_masks_reads_fine_only_on_fine_images():
    fine = torch.zeros(2, 5, 5, dtype=torch.bool)
    fine[0, 2, 2] = True
    coarse = coarsen(fine, radius=1)
    fine[1, 0, 0] = True  # garbage outside the coarse mask of the coarse-only image 1
    has_fine = torch.tensor([True, False])
    data = SegmentationUnlearningData.from_masks(torch.zeros(2, 1, 5, 5), coarse, fine, has_fine)
    assert not bool(data.forget[1].any())
    assert int(data.forget[0].sum()) == 4
    with pytest.raises(ValueError, match="not inside the coarse mask"):
        SegmentationUnlearningData.from_masks(torch.zeros(2, 1, 5, 5), coarse, fine, torch.tensor([True, True]))


def test_from_masks_accepts_numeric_masks():
    fine = torch.zeros(3, 5, 7, dtype=torch.bool)
    fine[:, 2, 3] = True
    coarse = coarsen(fine, radius=1)
    has_fine = torch.tensor([True, False, True])
    ref = SegmentationUnlearningData.from_masks(torch.zeros(3, 1, 5, 7), coarse, fine, has_fine)
    num = SegmentationUnlearningData.from_masks(torch.zeros(3, 1, 5, 7), coarse.float(), fine.long(),
                                                has_fine.long())
    for name in ("target", "retain", "forget", "coarse", "has_fine"):
        assert torch.equal(getattr(ref, name), getattr(num, name)), name


def test_from_masks_errors():
    images = torch.zeros(2, 1, 5, 5)
    m = torch.zeros(2, 5, 5, dtype=torch.bool)
    has = torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\)"):
        SegmentationUnlearningData.from_masks(images[0], m, m, has)
    with pytest.raises(ValueError, match=r"coarse must be.*\(2, 5, 5\).*\(2, 5, 3\)"):
        SegmentationUnlearningData.from_masks(images, m[..., :3], m[..., :3], has)
    with pytest.raises(ValueError, match="coarse and fine must have the same shape"):
        SegmentationUnlearningData.from_masks(images, m, m[:, :3], has)
    with pytest.raises(ValueError, match=r"has_fine must be \(2,\)"):
        SegmentationUnlearningData.from_masks(images, m, m, torch.tensor([True]))
    with pytest.raises(ValueError, match="has_fine must be binary"):
        SegmentationUnlearningData.from_masks(images, m, m, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="coarse must be binary"):
        SegmentationUnlearningData.from_masks(images, m.float() + 0.5, m, has)
    with pytest.raises(TypeError, match="fine must be a torch.Tensor"):
        SegmentationUnlearningData.from_masks(images, m, m.numpy(), has)


# ------------------------------------------------------------------ operators
@functools.lru_cache(maxsize=None)
def _synthetic() -> SyntheticShortcuts:
    return SyntheticShortcuts(24, image_size=16, fine_fraction=0.25, seed=0)


def make_data(*, nan: bool = False) -> SegmentationUnlearningData:
    ds = _synthetic()
    images = ds.images.clone()
    if nan:
        images[:, :, 3, 3] = float("nan")
    return SegmentationUnlearningData.from_masks(images, ds.coarse, ds.fine, ds.has_fine)


def make_model() -> EncoderDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return EncoderDecoder(width=4).freeze_encoder()


def clone_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def eval_fn(model: torch.nn.Module) -> dict:
    return {"decoder_norm": math.sqrt(sum(float(p.detach().square().sum()) for p in model.decoder.parameters()))}


COMMON = dict(batch_size=4, seed=0)
CERT_POST = dict(finetune_steps=2, finetune_lr=1e-3, noise_seed=5)
OPERATORS = {
    "finetune": (unlearn.finetune, dict(steps=3, lr=1e-3)),
    "retrain": (unlearn.retrain, dict(steps=3, lr=1e-3)),
    "relabel": (unlearn.relabel, dict(steps=3, lr=1e-3)),
    "neggrad_seg": (unlearn.neggrad_seg, dict(steps=3, lr=1e-3, beta=0.8)),
    "gradient_clipping": (unlearn.gradient_clipping, dict(steps=3, lr=0.05, epsilon=2.0, **CERT_POST)),
    "model_clipping": (unlearn.model_clipping, dict(steps=3, lr=0.05, epsilon=2.0, c2=5.0, **CERT_POST)),
    "output_perturbation": (unlearn.output_perturbation, dict(epsilon=2.0, c0=5.0, **CERT_POST)),
}
CERTIFIED = {"gradient_clipping", "model_clipping", "output_perturbation"}
BASE_KEYS = {"losses", "trajectory", "method", "wall_s", "hyperparameters", "certificate"}


def expected_steps(name: str, kw: dict) -> int:
    """Recorded losses: every step of a plain operator; only the post-processing steps of a certified one
    (the noisy phase's losses are diagnostics, off by default)."""
    return kw["finetune_steps"] if name in CERTIFIED else kw["steps"]


@pytest.mark.parametrize("name", list(OPERATORS))
def test_operator_contract(name):
    fn, kw = OPERATORS[name]
    data = make_data()
    model = make_model()
    before = clone_state(model)
    out, record = fn(model, data, **COMMON, **kw)

    assert out is not model
    assert states_equal(clone_state(model), before), "the input model must not be modified"
    assert model.encoder_frozen and out.encoder_frozen
    after = clone_state(out)
    for key in before:
        if key.startswith("encoder."):
            assert torch.equal(after[key], before[key]), f"encoder parameter {key} changed"
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder.")), \
        "the operator did not change the decoder"
    assert not out.training

    assert BASE_KEYS <= set(record)
    assert record["method"] == name
    assert record["wall_s"] >= 0.0
    assert isinstance(record["hyperparameters"], dict) and record["hyperparameters"]
    assert len(record["losses"]) == expected_steps(name, kw)
    assert all(math.isfinite(v) for v in record["losses"])
    assert record["trajectory"] == []

    decoder_names = [n for n, _ in model.named_parameters() if n.startswith("decoder.")]
    if name in CERTIFIED:
        cert = record["certificate"]
        assert isinstance(cert, dict)
        assert cert["parameters"] == decoder_names
        assert cert["operator"] == name
        assert 0 < cert["epsilon"] <= 2.0 and cert["delta"] == 1e-5
        assert cert["seeded"] is True
        if name != "output_perturbation":
            assert record["noisy_steps"] == kw["steps"]
    else:
        assert record["certificate"] is None


@pytest.mark.parametrize("name", ["finetune", "gradient_clipping", "output_perturbation"])
def test_eval_trajectory_recorded(name):
    fn, kw = OPERATORS[name]
    _, record = fn(make_model(), make_data(), **COMMON, **kw, eval_fn=eval_fn, eval_every=2)
    steps = [entry["step"] for entry in record["trajectory"]]
    assert all("decoder_norm" in entry for entry in record["trajectory"])
    if name == "finetune":
        assert steps == [2, 3]
    elif name == "gradient_clipping":
        # From the end of the noisy phase (the certified model, step 3) on: every 2 steps and at the end.
        assert steps == [3, 5]
        assert "diagnostics" not in record and not record["certificate"]["not_covered"]
    else:
        assert steps == [0, 2]  # step 0 is the released noisy model


@pytest.mark.parametrize("name", ["gradient_clipping", "model_clipping"])
def test_diagnostics_record_the_noisy_phase_and_say_it_is_not_covered(name):
    fn, kw = OPERATORS[name]
    calls = []

    def spy(model):
        calls.append(1)
        return eval_fn(model)

    _, quiet = fn(make_model(), make_data(), **COMMON, **kw, eval_fn=spy, eval_every=2)
    assert len(calls) == 2  # the certified model (step 3) and the end of post-processing (step 5) only
    _, loud = fn(make_model(), make_data(), **COMMON, **kw, eval_fn=eval_fn, eval_every=2, diagnostics=True)
    diag = loud["diagnostics"]
    assert [e["step"] for e in diag["trajectory"]] == [0, 2]
    assert len(diag["losses"]) == kw["steps"]
    assert [e["step"] for e in loud["trajectory"]] == [e["step"] for e in quiet["trajectory"]] == [3, 5]
    assert len(loud["losses"]) == len(quiet["losses"]) == kw["finetune_steps"]
    assert quiet["certificate"]["not_covered"] == []
    (sentence,) = loud["certificate"]["not_covered"]
    assert "diagnostics" in sentence and "noisy phase" in sentence
    assert loud["hyperparameters"]["diagnostics"] is True and quiet["hyperparameters"]["diagnostics"] is False


@pytest.mark.parametrize("name", [
    "finetune",
    "gradient_clipping",
    "output_perturbation",
])
def test_eval_fn_sees_eval_mode(name):
    fn, kw = OPERATORS[name]
    modes = []

    def spy(model):
        modes.append(model.training)
        return {}

    model = make_model()
    assert model.training  # a module as constructed is in train mode
    fn(model, make_data(), **COMMON, **kw, eval_fn=spy, eval_every=2)
    assert modes and not any(modes), f"eval_fn saw train mode at calls {[i for i, m in enumerate(modes) if m]}"


@pytest.mark.parametrize("name", ["gradient_clipping", "model_clipping", "output_perturbation"])
def test_certified_operators_reproducible_with_noise_seed(name):
    fn, kw = OPERATORS[name]
    data = make_data()
    a, rec_a = fn(make_model(), data, **COMMON, **kw)
    b, rec_b = fn(make_model(), data, **COMMON, **kw)
    assert states_equal(clone_state(a), clone_state(b))
    assert rec_a["certificate"] == rec_b["certificate"]
    c, rec_c = fn(make_model(), data, **COMMON, **{**kw, "noise_seed": None})
    assert not states_equal(clone_state(a), clone_state(c))
    assert rec_c["certificate"]["seeded"] is False


@pytest.mark.parametrize("name", list(OPERATORS))
def test_nan_loss_raises_and_input_untouched(name):
    fn, kw = OPERATORS[name]
    model = make_model()
    before = clone_state(model)
    with pytest.raises(ValueError, match=rf"{name}.*step 0.*NaN"):
        fn(model, make_data(nan=True), **COMMON, **kw)
    assert states_equal(clone_state(model), before)


def test_inplace_modifies_given_model():
    model = make_model()
    before = clone_state(model)
    out, _ = unlearn.finetune(model, make_data(), **COMMON, steps=2, lr=1e-3, inplace=True)
    assert out is model
    assert not states_equal(clone_state(model), before)


def test_operator_argument_errors():
    data = make_data()
    with pytest.raises(ValueError, match="beta"):
        unlearn.neggrad_seg(make_model(), data, beta=1.5, steps=1)
    with pytest.raises(ValueError, match="noise_seed"):
        unlearn.output_perturbation(make_model(), data, noise_seed=-1, finetune_steps=0)
    frozen = make_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        unlearn.finetune(frozen, data, steps=1)
    empty = SegmentationUnlearningData.from_masks(
        data.images, data.coarse, data.coarse, torch.zeros(len(data), dtype=torch.bool), coarse_background=False)
    with pytest.raises(ValueError, match="empty retain set"):
        unlearn.finetune(make_model(), empty, steps=1)


def test_certified_operators_refuse_training_on_forget_or_unknown_pixels():
    from pyunlearn.data import SyntheticShortcuts
    from pyunlearn.models import EncoderDecoder
    from pyunlearn.unlearn import SegmentationUnlearningData, gradient_clipping, output_perturbation

    ds = SyntheticShortcuts(8, image_size=16, fine_fraction=0.5, seed=0)
    good = SegmentationUnlearningData.from_masks(ds.images, ds.coarse, ds.fine, ds.has_fine)
    model = EncoderDecoder(width=4).freeze_encoder()
    leaky = SegmentationUnlearningData(images=good.images, target=good.coarse.clone(), retain=good.retain,
                                       forget=good.forget, coarse=good.coarse, has_fine=good.has_fine)
    with pytest.raises(ValueError, match="forget pixel"):
        gradient_clipping(model, leaky, steps=1, finetune_steps=0, noise_seed=0)
    boxes = SegmentationUnlearningData(images=good.images, target=good.target, retain=torch.ones_like(good.retain),
                                       forget=good.forget, coarse=good.coarse, has_fine=good.has_fine)
    with pytest.raises(ValueError, match="inside the coarse mask"):
        output_perturbation(model, boxes, finetune_steps=0, noise_seed=0)


def test_certified_operators_refuse_modules_with_running_statistics():
    from pyunlearn.data import SyntheticShortcuts
    from pyunlearn.unlearn import SegmentationUnlearningData, model_clipping

    ds = SyntheticShortcuts(8, image_size=16, fine_fraction=0.5, seed=0)
    data = SegmentationUnlearningData.from_masks(ds.images, ds.coarse, ds.fine, ds.has_fine)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1))
    with pytest.raises(ValueError, match="BatchNorm2d.*buffers"):
        model_clipping(model, data, steps=1, finetune_steps=0, noise_seed=0)


# ------------------------------------------------------------------ fine_share: batches that see the fine masks


@given(st.integers(2, 40), st.integers(1, 39), st.integers(1, 16), st.floats(0.01, 0.99), st.integers(0, 2**20))
def test_batch_indices_fine_share(n, n_fine, batch_size, share, seed):
    from pyunlearn.unlearn.segmentation import batch_at, batch_indices

    n_fine = min(n_fine, n - 1)
    has_fine = torch.zeros(n, dtype=torch.bool)
    has_fine[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_fine]] = True
    data = type("Flags", (), {"has_fine": has_fine})()
    pool = torch.arange(n)
    batch_size = min(batch_size, n)
    steps = range(3, 9)
    uniform = batch_indices(data, pool, batch_size, seed, steps)
    assert all(torch.equal(b, batch_at(pool, batch_size, seed, s)) for b, s in zip(uniform, steps))
    batches = batch_indices(data, pool, batch_size, seed, steps, share)
    assert batches == [] or all(torch.equal(a, b) for a, b in zip(batches, batch_indices(data, pool, batch_size,
                                                                                         seed, steps, share)))
    want = min(max(round(share * batch_size), 1), n_fine, batch_size - 1) if batch_size > 1 else None
    for b in batches:
        assert b.unique().numel() == b.numel(), "an image twice in one batch"
        if want is not None:
            assert int(has_fine[b].sum()) == want
            assert b.numel() == want + min(batch_size - want, n - n_fine)


def test_fine_share_trains_on_the_fine_images_more_often_and_is_recorded(monkeypatch):
    from pyunlearn.unlearn import segmentation

    data = make_data()
    fine_images = set(data.has_fine.nonzero().flatten().tolist())
    assert 0 < len(fine_images) < len(data)
    seen: list[list[int]] = []
    real = segmentation.batch_indices

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.extend(b.tolist() for b in out)
        return out

    monkeypatch.setattr(segmentation, "batch_indices", spy)
    for name in ("retrain", "finetune", "neggrad_seg", "gradient_clipping", "model_clipping", "output_perturbation"):
        fn, kw = OPERATORS[name]
        seen.clear()
        _, record = fn(make_model(), data, **COMMON, **kw, fine_share=0.5)
        assert record["hyperparameters"]["fine_share"] == 0.5, name
        assert seen and all(sum(i in fine_images for i in b) == 2 for b in seen), (name, seen)


@pytest.mark.parametrize("bad", [0, 0.0, 1.0, 1.5, -0.1, True, "0.5", float("nan")])
def test_fine_share_errors(bad):
    for name in ("retrain", "gradient_clipping"):
        fn, kw = OPERATORS[name]
        model = make_model()
        before = clone_state(model)
        with pytest.raises(ValueError, match="fine_share"):
            fn(model, make_data(), **COMMON, **kw, fine_share=bad)
        assert states_equal(clone_state(model), before)
