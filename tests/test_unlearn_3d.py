"""Volumes (B, C, D, H, W) end to end, and MONAI's UNet / BasicUNet through the operators.

Masks (dilation by a ball, 3-D boxes, forget/retain), SegmentationUnlearningData.from_masks on volumes,
metrics on volumes, per-sample gradients of a 3-D MONAI UNet (Conv3d, ConvTranspose3d, PReLU, InstanceNorm3d)
against torch.func, certified and plain operators and a DP-SGD loop on it; 2-D MONAI UNet and BasicUNet
through every segmentation operator."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from pyunlearn import losses
from pyunlearn.masks import coarsen, dilate, forget_retain
from pyunlearn.metrics import dice, pooled_scores, s_global, subgroup_auroc
from pyunlearn.models import replace_batchnorm
from pyunlearn.optim import DPSGD
from pyunlearn.per_sample import PerSampleGradients
from pyunlearn.unlearn import SegmentationUnlearningData, segmentation

monai_nets = pytest.importorskip("monai.networks.nets")
UNet, BasicUNet = monai_nets.UNet, monai_nets.BasicUNet

SEED = dict(batch_size=2, seed=0)
POST = dict(finetune_steps=1, finetune_lr=1e-3, noise_seed=7)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models run ~50x slower with 2 intra-op threads on a loaded 2-core machine (the threads
    wait for each other); one thread for this module, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ masks
def test_ball_dilation_and_boxes_of_volumes():
    fine = torch.zeros(2, 7, 8, 9, dtype=torch.bool)
    fine[0, 3, 4, 4] = True
    for radius in (1, 2):
        got = coarsen(fine, radius=radius, spatial_dims=3)
        d, h, w = torch.meshgrid(torch.arange(7), torch.arange(8), torch.arange(9), indexing="ij")
        ball = (d - 3) ** 2 + (h - 4) ** 2 + (w - 4) ** 2 <= radius ** 2
        assert torch.equal(got[0], ball) and not got[1].any()
        assert int(got[0].sum()) == {1: 7, 2: 33}[radius]
        assert torch.equal(dilate(fine, radius, spatial_dims=3), got)
    # The 2-D default dilates each slice by a disk instead: a different (thinner) mask.
    assert int(coarsen(fine, radius=1).sum()) == 5
    fine[1, 1:3, 2, 5:7] = True
    box = coarsen(fine, mode="bbox", radius=1, spatial_dims=3)
    want = torch.zeros_like(fine)
    want[0, 2:5, 3:6, 3:6] = True
    want[1, 0:4, 1:4, 4:8] = True
    assert torch.equal(box, want)
    per_volume = torch.stack([coarsen(v, mode="bbox", radius=1, spatial_dims=3) for v in fine])
    assert torch.equal(per_volume, box), "leading dims are batch dims"
    forget, retain = forget_retain(box, fine, spatial_dims=3)
    assert torch.equal(forget, box & ~fine) and torch.equal(retain, ~forget)
    fine[1, 6, 7, 8] = True
    with pytest.raises(ValueError, match=r"1 pixels in 1 volume\(s\), first at flat volume index 1"):
        forget_retain(box, fine, spatial_dims=3)
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        coarsen(fine, spatial_dims=4)
    with pytest.raises(ValueError, match=r"at least 3 dims \(\.\.\., D, H, W\)"):
        dilate(torch.zeros(4, 4, dtype=torch.bool), 1, spatial_dims=3)


# ------------------------------------------------------------------------------------------- data
def volumes(n: int = 2, size: int = 8, channels: int = 1, fine_every: int = 2):
    """``n`` volumes (channels x size^3): a cube lesion, a ball-dilated coarse mask, every other one fine."""
    g = torch.Generator().manual_seed(n * size)
    fine = torch.zeros(n, size, size, size, dtype=torch.bool)
    for i in range(n):
        o = 2 + i % 2
        fine[i, o:o + 3, o:o + 2, 2:5] = True
    coarse = coarsen(fine, radius=1, spatial_dims=3)
    images = torch.randn(n, channels, size, size, size, generator=g) + 2.0 * fine[:, None].float()
    has_fine = torch.arange(n) % fine_every == 0
    return images, coarse, fine, has_fine


def test_from_masks_takes_volumes():
    images, coarse, fine, has_fine = volumes(3)
    data = SegmentationUnlearningData.from_masks(images, coarse, fine, has_fine)
    assert data.retain.shape == data.forget.shape == data.target.shape == (3, 8, 8, 8)
    for i in range(3):
        if has_fine[i]:
            assert bool(data.retain[i].all()) and torch.equal(data.forget[i], coarse[i] & ~fine[i])
            assert torch.equal(data.target[i], fine[i].long())
        else:
            assert torch.equal(data.retain[i], ~coarse[i]) and not data.forget[i].any()
            assert torch.equal(data.relabelled_target[i], coarse[i].long())
    assert not data.relabelled_target[data.forget].any()
    data.check_retain_only()
    leaky = SegmentationUnlearningData(images=images, target=data.coarse, retain=torch.ones_like(data.retain),
                                       forget=data.forget, coarse=data.coarse, has_fine=data.has_fine)
    with pytest.raises(ValueError, match="forget pixel"):
        leaky.check_retain_only()
    with pytest.raises(ValueError, match=r"coarse must be \(N, D, H, W\) = \(3, 8, 8, 8\)"):
        SegmentationUnlearningData.from_masks(images, coarse[..., :4], fine[..., :4], has_fine)
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\) or \(N, C, D, H, W\)"):
        SegmentationUnlearningData.from_masks(images[:, None], coarse, fine, has_fine)


# ---------------------------------------------------------------------------------------- metrics
def test_metrics_on_volumes():
    g = torch.Generator().manual_seed(3)
    b = 8
    logits = torch.randn(b, 2, 3, 4, 5, generator=g)
    probs = logits.softmax(dim=1)
    fg = 1.0 - probs[:, 0]
    scores = pooled_scores(probs)  # 5-D: a volume of class probabilities
    torch.testing.assert_close(scores, fg.flatten(1).mean(1))
    torch.testing.assert_close(pooled_scores(fg, spatial_dims=3), scores)
    torch.testing.assert_close(pooled_scores(fg[:, None]), scores)
    mask = torch.zeros(b, 3, 4, 5, dtype=torch.bool)
    mask[:, 1:, :2] = True
    torch.testing.assert_close(pooled_scores(probs, mask=mask), fg[:, 1:, :2].flatten(1).mean(1))
    torch.testing.assert_close(pooled_scores(probs, mask=mask[:, None]), pooled_scores(probs, mask=mask))
    with pytest.raises(ValueError, match="spatial_dims=3"):
        pooled_scores(fg[:, None, None])
    with pytest.raises(ValueError, match="does not match"):
        pooled_scores(probs, mask=mask[..., :4])
    labels = torch.tensor([1, 0] * 4)
    spurious = torch.tensor([1, 1, 0, 0] * 2)
    got = subgroup_auroc(scores, labels, spurious)
    assert got == subgroup_auroc(fg.flatten(1).mean(1).numpy(), labels.numpy(), spurious.numpy())

    pred = probs.argmax(1)
    truth = torch.rand(b, 3, 4, 5, generator=g) > 0.5
    assert dice(pred, truth) == pytest.approx(dice(pred.flatten(1), truth.flatten(1)))
    torch.testing.assert_close(dice(pred, truth, per_sample=True), dice(pred.flatten(1), truth.flatten(1),
                                                                        per_sample=True))
    art = torch.rand(b, 3, 4, 5, generator=g) > 0.7
    flat = s_global(pred.flatten(1), art.flatten(1), truth.flatten(1).long(), n_boot=20)
    vol = s_global(pred, art, truth.long(), n_boot=20)
    assert vol[0] == pytest.approx(flat[0]) and np.allclose(vol[1], flat[1])


# ------------------------------------------------------------------------------- MONAI 3-D UNet
def unet3d(norm=None, seed: int = 0, dtype=torch.float32) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                    num_res_units=0, norm=norm).to(dtype)


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_per_sample_gradients_of_a_3d_monai_unet_match_torch_func():
    from torch.func import functional_call, grad, vmap

    model = unet3d(norm=("instance", {"affine": True}), dtype=torch.float64)
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv3d, nn.ConvTranspose3d, nn.PReLU, nn.InstanceNorm3d} <= kinds
    images, coarse, fine, has_fine = volumes(3)
    data = SegmentationUnlearningData.from_masks(images.double(), coarse, fine, has_fine)
    x, target, mask = data.images, data.target, data.retain
    params = {n: p.detach() for n, p in model.named_parameters()}

    def ce(logits, t, m):  # masked per-sample mean cross-entropy, summed (plain torch: vmap-able)
        per_pixel = nn.functional.cross_entropy(logits, t, reduction="none") * m
        return (per_pixel.flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)).sum()

    def one(params, xi, ti, mi):
        return ce(functional_call(model, params, (xi[None],)), ti[None], mi[None])

    expected = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x, target, mask)
    reference = losses.masked_cross_entropy(model(x), target, mask, reduction="sum")
    torch.testing.assert_close(ce(model(x), target, mask), reference)  # the library's loss, as the oracle's
    with PerSampleGradients(model) as psg:
        losses.masked_cross_entropy(model(x), target, mask, reduction="sum").backward()
        got = psg.grad_samples()
        assert set(got) == set(expected)
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-8, atol=1e-10, msg=n)
        norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in expected.values()))
        torch.testing.assert_close(psg.per_sample_norms(), norms, rtol=1e-8, atol=1e-10)
        c = float(norms.median())
        psg.clipped_sum_(c)
        factor = (c / (norms + 1e-6)).clamp(max=1.0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", factor, expected[n]), msg=n)


def volume_data(n: int = 2) -> SegmentationUnlearningData:
    images, coarse, fine, has_fine = volumes(n)
    return SegmentationUnlearningData.from_masks(images, coarse, fine, has_fine)


@pytest.mark.parametrize("norm", [None, "instance"])
@pytest.mark.parametrize("name, kw", [
    ("gradient_clipping", dict(steps=2, lr=0.05, epsilon=2.0, c0=5.0, **POST)),
    ("model_clipping", dict(steps=2, lr=0.05, epsilon=2.0, c2=10.0, **POST)),
    ("finetune", dict(steps=2, lr=1e-3)),
])
def test_operators_on_a_3d_monai_unet(norm, name, kw):
    data, model = volume_data(), unet3d(norm)
    before = state(model)
    out, record = getattr(segmentation, name)(model, data, **SEED, **kw, loss="dice_ce")
    assert not changed(state(model), before) and changed(state(out), before)
    assert record["hyperparameters"]["loss"] == "dice_ce"
    assert all(np.isfinite(record["losses"]))
    if name != "finetune":
        assert record["certificate"]["parameters"] == [n for n, _ in model.named_parameters()]
        assert 0 < record["certificate"]["epsilon"] <= 2.0
    with torch.no_grad():
        probs = out(data.images).softmax(1)
    assert probs.shape == (2, 2, 8, 8, 8)
    assert pooled_scores(probs).shape == (2,)


def test_batchnorm_unet_is_refused_then_converted():
    data = volume_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                     num_res_units=0, norm="batch")
    with pytest.raises(ValueError, match="BatchNorm3d.*buffers"):
        segmentation.gradient_clipping(model, data, steps=1, finetune_steps=0, noise_seed=0)
    assert replace_batchnorm(model, groups=2)
    out, record = segmentation.gradient_clipping(model, data, steps=1, finetune_steps=0, noise_seed=0, **SEED)
    assert record["certificate"]["epsilon"] > 0


def test_dpsgd_loop_on_a_3d_monai_unet():
    data, model = volume_data(3), unet3d("instance")
    before = state(model)
    steps, c, q = 3, 1.0, 2 / 3
    opt = DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=c, expected_batch_size=2,
                sample_rate=q, seed=0)
    with PerSampleGradients(model) as psg:
        for step in range(steps):
            index = torch.tensor([step % 3, (step + 1) % 3])
            opt.zero_grad()
            logits = model(data.images[index])
            losses.masked_focal(logits, data.target[index], data.retain[index], reduction="sum").backward()
            norms = psg.clipped_sum_(c)
            assert norms.shape == (2,) and bool(torch.isfinite(norms).all())
            opt.step()
    assert opt.steps_taken == steps
    after = state(model)
    assert changed(after, before) and all(bool(torch.isfinite(v).all()) for v in after.values())
    assert 0 < opt.epsilon(1e-5) < float("inf")


# ------------------------------------------------------------------------ MONAI 2-D UNet, BasicUNet
def images2d(n: int = 4, size: int = 32) -> SegmentationUnlearningData:
    g = torch.Generator().manual_seed(5)
    fine = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        o = 8 + 4 * (i % 3)
        fine[i, o:o + 6, o - 2:o + 5] = True
    coarse = coarsen(fine, radius=2)
    images = torch.randn(n, 1, size, size, generator=g) + 2.0 * fine[:, None].float()
    return SegmentationUnlearningData.from_masks(images, coarse, fine, torch.arange(n) % 2 == 0)


def monai_2d(kind: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "unet":  # MONAI's defaults: PReLU, instance norm
            return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
        # MONAI's default BasicUNet (LeakyReLU, affine instance norm, deconvolutions), narrow
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4))


EVERY_OPERATOR = {
    "train_segmenter": dict(steps=1, lr=1e-3),
    "finetune": dict(steps=1, lr=1e-3),
    "retrain": dict(steps=1, lr=1e-3),
    "relabel": dict(steps=1, lr=1e-3),
    "neggrad_seg": dict(steps=1, lr=1e-3, beta=0.7),
    "gradient_clipping": dict(steps=1, lr=0.05, epsilon=2.0, c0=5.0, **POST),
    "model_clipping": dict(steps=1, lr=0.05, epsilon=2.0, c2=20.0, **POST),
    "output_perturbation": dict(epsilon=2.0, c0=20.0, **POST),
}


@pytest.mark.parametrize("kind, name", list(itertools.product(["unet", "basicunet"], EVERY_OPERATOR)))
def test_2d_monai_models_through_every_operator(kind, name):
    data, model = images2d(), monai_2d(kind)
    before = state(model)
    loss = "ce" if name in ("gradient_clipping", "finetune") else "focal"
    out, record = getattr(segmentation, name)(model, data, **SEED, **EVERY_OPERATOR[name], inplace=False,
                                              loss=loss)
    assert out is not model and not changed(state(model), before) and changed(state(out), before)
    assert record["hyperparameters"]["loss"] == loss and all(np.isfinite(record["losses"]))
    with torch.no_grad():
        assert out(data.images).shape == (4, 2, 32, 32)


@pytest.mark.parametrize("kind", ["unet", "basicunet"])
def test_dpsgd_step_on_2d_monai_models(kind):
    data, model = images2d(), monai_2d(kind)
    opt = DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, seed=0)
    with PerSampleGradients(model, loss_reduction="mean") as psg:
        losses.masked_cross_entropy(model(data.images), data.target, data.retain).backward()
        psg.clipped_sum_(1.0)
        opt.step()
    assert opt.steps_taken == 1
