"""pyunlearn.models.replace_batchnorm: BatchNorm -> GroupNorm (and InstanceNorm without running statistics)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from pyunlearn.models import replace_batchnorm


def float_buffers(model: nn.Module) -> list[str]:
    return [n for n, b in model.named_buffers() if b.is_floating_point()]


class BNSegNet(nn.Module):
    """A small encoder-decoder with BatchNorm on both sides (one of them without affine parameters)."""

    def __init__(self, width: int = 8, num_classes: int = 2):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                     nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                     nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 2, stride=2),
                                     nn.BatchNorm2d(width, affine=False), nn.ReLU(),
                                     nn.Conv2d(width, num_classes, 1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_conv_net_with_batchnorm_in_encoder_and_decoder():
    torch.manual_seed(0)
    model = BNSegNet()
    with torch.no_grad():
        model.encoder[1].weight.uniform_(0.5, 2.0)
        model.encoder[1].bias.uniform_(-1.0, 1.0)
    model.train()(torch.randn(4, 1, 8, 8))  # running statistics become non-trivial
    # Opacus fixes only modules with trainable parameters, so ask it before freezing the encoder.
    opacus_fixed = pytest.importorskip("opacus").validators.ModuleValidator.fix(copy.deepcopy(model))
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.encoder.eval()
    weight, bias = model.encoder[1].weight.clone(), model.encoder[1].bias.clone()
    assert float_buffers(model)

    changes = replace_batchnorm(model)
    assert [c.split(":")[0] for c in changes] == ["encoder.1", "encoder.4", "decoder.1"]
    assert "BatchNorm2d(8" in changes[0] and "-> GroupNorm(8, 8, eps=1e-05, affine=True" in changes[0]
    assert "-> GroupNorm(16, 16" in changes[1]
    assert "affine=False" in changes[2].split("->")[1]
    assert float_buffers(model) == [] and list(model.buffers()) == []
    assert not any("running" in k for k in model.state_dict())
    enc, dec = model.encoder[1], model.decoder[1]
    assert isinstance(enc, nn.GroupNorm) and isinstance(dec, nn.GroupNorm)
    assert dec.weight is None and dec.bias is None and dec.affine is False
    torch.testing.assert_close(enc.weight, weight, rtol=0, atol=0)  # affine parameters carried over
    torch.testing.assert_close(enc.bias, bias, rtol=0, atol=0)
    assert not enc.weight.requires_grad and not enc.training  # frozen, eval encoder stays so
    assert dec.training
    # The same group counts as Opacus' ModuleValidator.fix (which leaves the parameter-free decoder.1 alone),
    # and Opacus finds nothing left to fix.
    fixed = dict(opacus_fixed.named_modules())
    for name in ("encoder.1", "encoder.4"):
        assert isinstance(fixed[name], nn.GroupNorm)
        assert fixed[name].num_groups == model.get_submodule(name).num_groups
    from opacus.validators import ModuleValidator
    assert ModuleValidator.validate(model, strict=False) == []
    out = model(torch.randn(2, 1, 9, 7)[..., :8, :6])
    assert out.shape == (2, 2, 8, 6) and torch.isfinite(out).all()
    # Per-sample independence: a sample's output no longer depends on the rest of the batch.
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))
    assert replace_batchnorm(model) == []  # nothing left


@pytest.mark.parametrize("channels", [1, 2, 3, 6, 12, 16, 24, 32, 48, 64, 96, 100, 128])
def test_default_groups_are_opacus(channels):
    batch_norm = pytest.importorskip("opacus.validators.batch_norm")
    expected = batch_norm._batchnorm_to_groupnorm(nn.BatchNorm2d(channels)).num_groups
    model = nn.Sequential(nn.BatchNorm2d(channels))
    replace_batchnorm(model)
    assert model[0].num_groups == expected == math.gcd(32, channels)


def test_groups_int_callable_and_errors_leave_the_model_unchanged():
    model = nn.Sequential(nn.Conv2d(1, 12, 1), nn.BatchNorm2d(12), nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8))
    replace_batchnorm(model, groups=4)
    assert [model[1].num_groups, model[3].num_groups] == [4, 4]
    model = nn.Sequential(nn.BatchNorm2d(12), nn.BatchNorm2d(20))
    replace_batchnorm(model, groups=lambda c: max(d for d in range(1, 33) if c % d == 0))
    assert [model[0].num_groups, model[1].num_groups] == [12, 20]
    model = nn.Sequential(nn.BatchNorm2d(12), nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"groups=3 does not divide the 8 channels of '2'"):
        replace_batchnorm(model, groups=3)
    assert isinstance(model[0], nn.BatchNorm2d) and isinstance(model[2], nn.BatchNorm2d)  # checked first
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="groups=0 does not divide"):
        replace_batchnorm(model, groups=lambda c: 0)
    with pytest.raises(TypeError, match="must be an int, got float"):
        replace_batchnorm(model, groups=lambda c: c / 2)
    with pytest.raises(TypeError, match="groups must be None, an int or a callable"):
        replace_batchnorm(model, groups=2.0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replace_batchnorm([nn.BatchNorm2d(4)])
    with pytest.raises(ValueError, match="model is itself a BatchNorm2d.*nn.Sequential"):
        replace_batchnorm(nn.BatchNorm2d(4))
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="'0' \\(LazyBatchNorm2d\\) is not initialised"):
        replace_batchnorm(lazy)
    lazy(torch.randn(2, 6, 3, 3))
    assert "-> GroupNorm(2, 6" in replace_batchnorm(lazy)[0]


def test_every_batchnorm_kind_and_instancenorm():
    model = nn.ModuleDict({
        "bn1": nn.BatchNorm1d(6),
        "bn3": nn.BatchNorm3d(4, track_running_stats=False),  # batch statistics even without buffers
        "sync": nn.SyncBatchNorm(8, eps=1e-3),
        "in_tracked": nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        "in_plain": nn.InstanceNorm3d(4),
        "gn": nn.GroupNorm(2, 4),
    })
    in_plain, gn = model["in_plain"], model["gn"]
    changes = replace_batchnorm(model)
    assert [c.split(":")[0] for c in changes] == ["bn1", "bn3", "sync", "in_tracked"]
    assert isinstance(model["bn1"], nn.GroupNorm) and model["bn1"].num_groups == 2
    assert isinstance(model["bn3"], nn.GroupNorm)
    assert isinstance(model["sync"], nn.GroupNorm) and model["sync"].eps == 1e-3
    tracked = model["in_tracked"]
    assert type(tracked) is nn.InstanceNorm2d and not tracked.track_running_stats and tracked.affine
    assert "track_running_stats=False" in changes[3].split("->")[1]
    assert model["in_plain"] is in_plain and model["gn"] is gn  # already fine: untouched
    assert list(model.buffers()) == []
    assert model["bn1"](torch.randn(3, 6, 5)).shape == (3, 6, 5)
    assert model["sync"](torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)
    assert model["bn3"](torch.randn(2, 4, 3, 3, 3)).shape == (2, 4, 3, 3, 3)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(tracked.eval()(x), nn.functional.instance_norm(x, weight=tracked.weight,
                                                                              bias=tracked.bias))


def test_shared_module_dtype_mode_and_bias_free():
    shared = nn.BatchNorm2d(4).double().eval()
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared), nn.BatchNorm2d(4, bias=False)
                          if "bias" in nn.BatchNorm2d.__init__.__code__.co_varnames else nn.Identity())
    changes = replace_batchnorm(model)
    assert changes[0].startswith("0.0, 1.0: BatchNorm2d(4")
    assert model[0][0] is model[1][0] and isinstance(model[0][0], nn.GroupNorm)
    assert model[0][0].weight.dtype == torch.float64 and not model[0][0].training
    if isinstance(model[2], nn.GroupNorm):
        assert model[2].bias is None and model[2].weight is not None
        assert model[2](torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)


# ------------------------------------------------------------------ MONAI
def _monai_unet(spatial_dims: int):
    nets = pytest.importorskip("monai.networks.nets")
    return nets.UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                     norm="batch")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_unet(spatial_dims):
    torch.manual_seed(0)
    model = _monai_unet(spatial_dims)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn >= 2 and float_buffers(model)
    changes = replace_batchnorm(model)
    assert len(changes) == n_bn and all("-> GroupNorm(" in c for c in changes)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert float_buffers(model) == []
    x = torch.randn((2, 1) + (8,) * spatial_dims)
    out = model(x)
    assert out.shape == (2, 2) + (8,) * spatial_dims and torch.isfinite(out).all()
    torch.testing.assert_close(model(x[:1]), out[:1])
