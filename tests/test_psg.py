"""PSG, Boundary Shrink and pixel-level PSG (pyunlearn.unlearn.psg)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pyunlearn.models_classify import LinearClassifier
from pyunlearn.unlearn.classification import train_classifier
from pyunlearn.unlearn.psg import boundary_points, boundary_shrink, perturbed_sign_step, psg, psg_segmentation


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 8),
                                  nn.ReLU())
        self.head = nn.Linear(8, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _seeded(factory, seed: int):
    """Build a model under ``seed`` without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def _blobs(n_per: int, k: int, seed: int, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """k Gaussian blobs in [0, 1]^dim."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(k, dim, generator=g) * 0.6 + 0.2
    x = (centres.repeat_interleave(n_per, 0) + 0.05 * torch.randn(k * n_per, dim, generator=g)).clamp(0, 1)
    return x, torch.arange(k).repeat_interleave(n_per)


def _image_data(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 5, 5, generator=g), torch.randint(0, k, (n,), generator=g)


def _three_interval_model() -> LinearClassifier:
    """1-D input t (first coordinate): class 0 for t < 0, class 1 for 0 < t < 1, class 2 for t > 1."""
    m = LinearClassifier(2, 3)
    with torch.no_grad():
        m.head.weight.copy_(torch.tensor([[-10.0, 0.0], [0.0, 0.0], [10.0, 0.0]]))
        m.head.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
    return m


# --------------------------------------------------------------------------------------------------
# The inner step
# --------------------------------------------------------------------------------------------------
@given(
    b=st.integers(1, 5),
    eps=st.floats(0.01, 0.6),
    gamma=st.sampled_from([0.0, 0.3, 2.0]),
    lam=st.sampled_from([0.0, 0.5]),
    steps=st.integers(1, 4),
    kappa=st.sampled_from([0.0, 0.2]),
    grad_scale=st.sampled_from(["rms", "none"]),
    seed=st.integers(0, 2**16),
)
def test_inner_step_stays_in_ball_and_pixel_range(b, eps, gamma, lam, steps, kappa, grad_scale, seed):
    model = _seeded(lambda: TinyCNN(3), 0).eval()
    x, y = _image_data(b, 3, seed)
    gen = torch.Generator().manual_seed(seed)
    x_adv, taken = boundary_points(model, x, y, epsilon=eps, gamma=gamma, lam=lam, inner_steps=steps, kappa=kappa,
                                   grad_scale=grad_scale, clip_range=(0.0, 1.0), generator=gen)
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert taken.shape == (b,) and int(taken.min()) >= 0 and int(taken.max()) <= steps
    if kappa == 0.0:
        assert bool((taken == steps).all())


@given(
    shape=st.sampled_from([(1, 3), (2, 1, 3, 5), (3, 7)]),
    eps=st.floats(0.001, 1.0),
    step=st.floats(0.001, 2.0),
    lo=st.floats(-1.0, 0.4),
    gamma=st.floats(0.0, 3.0),
    lam=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_perturbed_sign_step_projects(shape, eps, step, lo, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    lo = float(torch.tensor(lo, dtype=torch.float32))  # the bounds as the float32 tensors see them
    hi = float(torch.tensor(lo + 1.0, dtype=torch.float32))
    x = lo + torch.rand(shape, generator=g)
    x_t = (x + (torch.rand(shape, generator=g) * 2 - 1) * eps).clamp(lo, hi)
    grad = torch.randn(shape, generator=g) * 10.0 ** float(torch.randint(-8, 3, (1,), generator=g))
    out = perturbed_sign_step(grad, x_t, x, step=step, epsilon=eps, gamma=gamma, lam=lam,
                              noise=torch.randn(shape, generator=g), clip_range=(lo, hi))
    assert float((out - x).abs().max()) <= eps * (1 + 1e-6) + 1e-6
    assert float(out.min()) >= lo and float(out.max()) <= hi


def test_sign_step_is_fgsm_without_perturbation():
    x = torch.tensor([[0.5, 0.5, 0.95, 0.02]])
    grad = torch.tensor([[1.0, -2.0, 3.0, -1e-9]])
    out = perturbed_sign_step(grad, x, x, step=0.1, epsilon=0.1, clip_range=(0.0, 1.0))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.4, 1.0, 0.0]]))


def test_noise_dominates_only_when_gamma_is_large():
    """With grad_scale='rms', gamma is relative to the gradient: a tiny gradient is not drowned at gamma << 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((4, 50), 0.5)
    grad = torch.randn(4, 50, generator=g).sign() * (0.5 + torch.rand(4, 50, generator=g)) * 1e-7
    noise = torch.randn(4, 50, generator=g)
    small = perturbed_sign_step(grad, x, x, step=0.1, epsilon=0.1, gamma=0.01, noise=noise)
    assert torch.equal(torch.sign(small - x), grad.sign())
    literal = perturbed_sign_step(grad, x, x, step=0.1, epsilon=0.1, gamma=0.01, noise=noise, grad_scale="none")
    assert torch.equal(torch.sign(literal - x), noise.sign())


# --------------------------------------------------------------------------------------------------
# Relabelling on a known boundary
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner_steps,kappa", [(1, 0.0), (5, 0.0), (7, 0.3)])
def test_relabels_cross_to_the_nearest_wrong_class(inner_steps, kappa):
    model = _three_interval_model()
    # class-1 points: near the boundary to class 0, near the one to class 2, and far from both
    t = torch.tensor([0.04, 0.07, 0.93, 0.97, 0.5, 0.45, 0.55])
    x = torch.stack([t, torch.full_like(t, 0.3)], dim=1)
    y = torch.ones(7, dtype=torch.long)
    assert bool((model(x).argmax(1) == 1).all())
    _, rec = psg(model, (x, y), None, epsilon=0.1, gamma=0.0, lam=0.0, inner_steps=inner_steps, kappa=kappa,
                 remain_weight=0.0, clip_range=None, steps=0)
    assert rec["new_labels"].tolist() == [0, 0, 2, 2, 1, 1, 1]
    assert rec["relabel_stayed_true"] == 3
    assert rec["relabel_counts"] == [2, 3, 2]
    _, rec_bs = boundary_shrink(model, (x, y), epsilon=0.1, clip_range=None, steps=0)
    assert rec_bs["new_labels"].tolist() == [0, 0, 2, 2, 1, 1, 1]


def test_runner_up_relabels_every_sample_to_a_wrong_class():
    model = _three_interval_model()
    t = torch.tensor([0.04, 0.4, 0.6, 0.97])
    x = torch.stack([t, torch.zeros_like(t)], dim=1)
    y = torch.ones(4, dtype=torch.long)
    _, rec = psg(model, (x, y), None, epsilon=0.1, gamma=0.0, inner_steps=1, kappa=0.0, remain_weight=0.0,
                 stayed_true="runner_up", clip_range=None, steps=0)
    assert rec["relabel_stayed_true"] == 0
    assert rec["new_labels"].tolist() == [0, 0, 2, 2]


def test_kappa_stops_early():
    model = _three_interval_model()
    # 0.8 + eps = 1.1 is past the boundary at 1, where p_1 = 1 / (1 + e) < 0.3: stop after one step.
    x = torch.tensor([[0.8, 0.0], [0.5, 0.0]])
    y = torch.tensor([1, 1])
    pts, taken = boundary_points(model, x, y, epsilon=0.3, inner_steps=6, kappa=0.3, clip_range=None)
    assert float(pts[0, 0]) > 1.0
    assert int(taken[0]) == 1
    assert int(taken[1]) == 6  # the point in the middle has a zero gradient and never gets there
    assert float((pts - x).abs().max()) <= 0.3 + 1e-6
    _, taken0 = boundary_points(model, x, y, epsilon=0.3, inner_steps=6, kappa=0.0, clip_range=None)
    assert taken0.tolist() == [6, 6]


# --------------------------------------------------------------------------------------------------
# Boundary Shrink equivalence, determinism, not in place
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("remain_weight,soft", [(0.0, False), (0.7, False), (1.3, True)])
def test_gamma_lambda_zero_is_boundary_shrink_exactly(remain_weight, soft):
    model = _seeded(lambda: TinyCNN(3), 3)
    x, y = _image_data(23, 3, seed=5)
    forget, remain = (x[:9], y[:9]), (x[9:], y[9:])
    kw = dict(epsilon=0.2, remain_weight=remain_weight, soft_labels=soft, steps=7, lr=1e-2, batch_size=5,
              forget_batch_size=4, seed=11)
    m_psg, r_psg = psg(model, forget, remain, gamma=0.0, lam=0.0, inner_steps=1, kappa=0.0, **kw)
    m_bs, r_bs = boundary_shrink(model, forget, remain, **kw)
    for (n1, p1), (n2, p2) in zip(m_psg.state_dict().items(), m_bs.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(r_psg["new_labels"], r_bs["new_labels"])
    assert r_psg["relabel_stayed_true"] == r_bs["relabel_stayed_true"]
    # and the parameters did move
    assert any(not torch.equal(a, b) for a, b in zip(m_psg.parameters(), model.parameters()))


def test_noise_changes_relabels_and_is_seeded():
    # class-1 points in the middle of their interval: a zero gradient, so the noise alone picks the side
    model = _three_interval_model()
    x = torch.full((30, 2), 0.5)
    y = torch.ones(30, dtype=torch.long)
    kw = dict(epsilon=0.6, gamma=1.0, inner_steps=1, kappa=0.0, remain_weight=0.0, steps=6, batch_size=8,
              clip_range=None)
    a, ra = psg(model, (x, y), None, seed=4, **kw)
    b, rb = psg(model, (x, y), None, seed=4, **kw)
    c, rc = psg(model, (x, y), None, seed=5, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(ra["new_labels"], rb["new_labels"])
    assert not torch.equal(ra["new_labels"], rc["new_labels"])
    assert ra["relabel_mode"] == "per_visit"
    assert set(ra["new_labels"].tolist()) == {0, 2} and ra["relabel_stayed_true"] == 0


def test_psg_does_not_modify_the_input_model_unless_inplace():
    model = _seeded(lambda: TinyCNN(3), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _image_data(12, 3, seed=0)
    out, _ = psg(model, (x[:4], y[:4]), (x[4:], y[4:]), steps=3, lr=1e-2, batch_size=4)
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out2, _ = psg(model, (x[:4], y[:4]), (x[4:], y[4:]), steps=3, lr=1e-2, batch_size=4, inplace=True)
    assert out2 is model
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_psg_forgets_a_class_and_keeps_the_rest():
    x, y = _blobs(30, 4, seed=0)
    model = _seeded(lambda: LinearClassifier(6, 4), 0)
    train_classifier(model, (x, y), epochs=60, lr=5e-2, batch_size=32, seed=0)
    assert float((model(x).argmax(1) == y).float().mean()) == 1.0
    f = y == 2
    out, rec = psg(model, (x[f], y[f]), (x[~f], y[~f]), epsilon=0.3, steps=60, lr=2e-2, batch_size=32, seed=0)
    pred = out(x).argmax(1)
    assert float((pred[f] == 2).float().mean()) <= 0.05
    assert float((pred[~f] == y[~f]).float().mean()) >= 0.95
    for key in ("epsilon", "gamma", "lam", "kappa", "inner_steps", "remain_weight", "wall_s", "relabel_stayed_true",
                "inner_steps_taken_mean", "relabel_stayed_true_rate"):
        assert key in rec
    assert not out.training


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_psg_bad_inputs():
    model = _three_interval_model()
    x = torch.rand(5, 2)
    y = torch.ones(5, dtype=torch.long)
    with pytest.raises(ValueError, match="forget is empty"):
        psg(model, (x[:0], y[:0]), (x, y))
    with pytest.raises(ValueError, match=r"forget: labels must be in \[0, 2\]"):
        psg(model, (x, y + 2), (x, y))
    with pytest.raises(ValueError, match="remain: labels"):
        psg(model, (x, y), (x, -y))
    with pytest.raises(ValueError, match="forget: x has 5 samples but y has 4"):
        psg(model, (x, y[:4]), (x, y))
    with pytest.raises(ValueError, match="forget is on meta but the model is on cpu"):
        psg(model, (x.to("meta"), y.to("meta")), (x, y))
    with pytest.raises(ValueError, match="remain is None"):
        psg(model, (x, y), None)
    with pytest.raises(ValueError, match="kappa"):
        psg(model, (x, y), (x, y), kappa=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        psg(model, (x, y), (x, y), epsilon=0.0)
    with pytest.raises(ValueError, match="stayed_true"):
        psg(model, (x, y), (x, y), stayed_true="drop")
    with pytest.raises(ValueError, match="clip_range"):
        psg(model, (x + 2, y), (x, y))
    with pytest.raises(TypeError, match="forget must be an"):
        psg(model, x, (x, y))
    with pytest.raises(TypeError, match="integer class indices"):
        boundary_shrink(model, (x, y.float()))


# --------------------------------------------------------------------------------------------------
# Pixel-level PSG
# --------------------------------------------------------------------------------------------------
@dataclass
class SegData:
    images: torch.Tensor
    target: torch.Tensor
    retain: torch.Tensor
    forget: torch.Tensor
    coarse: torch.Tensor


class PixelModel(nn.Module):
    """Per-pixel linear model: a frozen 1x1 'encoder' and a trainable 1x1 'decoder'."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, 1, 1)
        self.decoder = nn.Conv2d(1, k, 1)
        with torch.no_grad():
            self.encoder.weight.fill_(1.0)
            self.encoder.bias.zero_()
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def _pixel_threshold_model(k: int) -> PixelModel:
    """Foreground iff the pixel value exceeds 0.5 (K = 1: logit 20(v - 0.5); K = 2: the same as two logits)."""
    m = PixelModel(k)
    with torch.no_grad():
        if k == 1:
            m.decoder.weight.fill_(20.0)
            m.decoder.bias.fill_(-10.0)
        else:
            m.decoder.weight.copy_(torch.tensor([-10.0, 10.0]).reshape(2, 1, 1, 1))
            m.decoder.bias.copy_(torch.tensor([5.0, -5.0]))
    return m


def _seg_data(n: int = 3, h: int = 5, w: int = 7) -> SegData:
    images = torch.full((n, 1, h, w), 0.1)
    coarse = torch.zeros(n, h, w, dtype=torch.long)
    forget = torch.zeros(n, h, w, dtype=torch.bool)
    # image 0: forget pixels just above the threshold (0.55) and farther above it (0.7)
    images[0, 0, 1, 1:4] = 0.55
    images[0, 0, 3, 1:3] = 0.7
    coarse[0, 1, 1:4] = 1
    coarse[0, 3, 1:3] = 1
    forget[0, 1, 1:4] = True
    forget[0, 3, 1:3] = True
    # image 2: true foreground that is retained
    images[2, 0, 2, 2:5] = 0.95
    coarse[2, 2, 2:5] = 1
    retain = ~forget
    target = coarse.clone()
    target[forget] = 0
    return SegData(images, target, retain, forget, coarse)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("inner_steps,kappa", [(1, 0.0), (4, 0.2)])
def test_psg_segmentation_relabels_forget_pixels_on_a_known_boundary(k, inner_steps, kappa):
    model = _pixel_threshold_model(k)
    data = _seg_data()
    enc_before = [p.clone() for p in model.encoder.parameters()]
    out, rec = psg_segmentation(model, data, epsilon=0.1, gamma=0.0, inner_steps=inner_steps, kappa=kappa,
                                steps=5, lr=1e-2, batch_size=2, seed=0)
    assert rec["forget_pixels"] == 5 and rec["forget_images"] == 1
    assert rec["relabelled_pixels"] == 5
    assert rec["relabel_stayed_true"] == 2  # the two 0.7 pixels are 0.2 from the boundary
    assert rec["num_classes"] == k
    assert all(torch.equal(a, b) for a, b in zip(enc_before, out.encoder.parameters()))  # frozen stays frozen
    assert any(not torch.equal(a, b) for a, b in zip(model.decoder.parameters(), out.decoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), _pixel_threshold_model(k).parameters()))


def test_psg_segmentation_runner_up_is_relabel_and_unlearns():
    model = _pixel_threshold_model(1)
    data = _seg_data()
    out, rec = psg_segmentation(model, data, epsilon=0.1, stayed_true="runner_up", remain_weight=1.0, steps=150,
                                lr=5e-2, batch_size=3, seed=0)
    assert rec["relabel_stayed_true"] == 0
    with torch.no_grad():
        pred = out(data.images)[:, 0] > 0
    assert not bool(pred[data.forget].any())  # every forget pixel is now background
    assert bool(pred[2, 2, 2:5].all())  # a retained foreground pixel survives


def test_psg_segmentation_keeps_forget_pixels_out_of_the_retain_term():
    """A retain set covering the whole image (fine-labelled images) gives the same run."""
    model = _pixel_threshold_model(2)
    data = _seg_data()
    full = _seg_data()
    full.retain = torch.ones_like(full.retain)
    a, _ = psg_segmentation(model, data, epsilon=0.1, steps=6, lr=1e-2, batch_size=2)
    b, _ = psg_segmentation(model, full, epsilon=0.1, steps=6, lr=1e-2, batch_size=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_psg_segmentation_noise_is_per_visit_and_in_range():
    model = _pixel_threshold_model(2)
    data = _seg_data()
    _, rec = psg_segmentation(model, data, epsilon=0.2, gamma=1.0, lam=0.5, inner_steps=3, steps=4, batch_size=2)
    assert rec["relabel_mode"] == "per_visit"
    assert 0.0 <= rec["relabel_stayed_true_rate"] <= 1.0


def test_psg_segmentation_bad_inputs():
    model = _pixel_threshold_model(1)
    data = _seg_data()
    with pytest.raises(TypeError, match="lacks"):
        psg_segmentation(model, object())
    empty = _seg_data()
    empty.forget = torch.zeros_like(empty.forget)
    with pytest.raises(ValueError, match="data.forget is empty"):
        psg_segmentation(model, empty)
    bad_shape = _seg_data()
    bad_shape.coarse = bad_shape.coarse[:, :-1]
    with pytest.raises(ValueError, match="data.coarse must have shape"):
        psg_segmentation(model, bad_shape)
    meta = _seg_data()
    meta.images = meta.images.to("meta")
    with pytest.raises(ValueError, match="data.images is on meta but the model is on cpu"):
        psg_segmentation(model, meta)
    with pytest.raises(TypeError, match="bool mask"):
        psg_segmentation(model, SegData(data.images, data.target, data.retain.long(), data.forget, data.coarse))
