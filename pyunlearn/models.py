"""A small encoder-decoder segmentation model whose decoder is the certified parameter set."""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["EncoderDecoder", "Encoder", "Decoder", "replace_batchnorm"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Two-scale convolutional encoder: full-resolution and half-resolution feature maps."""

    def __init__(self, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stage1 = _block(in_channels, width)
        self.stage2 = _block(width, 2 * width)
        self.out_channels = (width, 2 * width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f1 = self.stage1(x)
        f2 = self.stage2(F.max_pool2d(f1, 2))
        return f1, f2


class Decoder(nn.Module):
    """Upsample the coarse features, fuse with the fine ones, predict ``num_classes`` logit maps.

    Built from Conv2d layers and GroupNorm only, so per-sample gradients are exact.
    """

    def __init__(self, in_channels: tuple[int, int] = (16, 32), width: int = 16, num_classes: int = 1):
        super().__init__()
        self.fuse = nn.Conv2d(in_channels[0] + in_channels[1], width, 1)
        self.norm = nn.GroupNorm(4, width)
        self.refine = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        f1, f2 = features
        up = F.interpolate(f2, size=f1.shape[-2:], mode="nearest")
        h = F.relu(self.norm(self.fuse(torch.cat([f1, up], dim=1))))
        h = F.relu(self.refine(h))
        return self.head(h)


class EncoderDecoder(nn.Module):
    """``logits = decoder(encoder(images))``; logits are ``(B, num_classes, H, W)`` (1 = binary/sigmoid)."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 1):
        super().__init__()
        self.encoder = Encoder(in_channels, width)
        self.decoder = Decoder(self.encoder.out_channels, width, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def freeze_encoder(self) -> "EncoderDecoder":
        """Freeze the (public) encoder: no gradients, eval mode. Returns ``self``."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        return self

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def reset_decoder(self, seed: int) -> "EncoderDecoder":
        """Re-initialise the decoder from ``seed`` (training from scratch on a frozen encoder)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.decoder.modules():
                if hasattr(m, "reset_parameters") and m is not self.decoder:
                    m.reset_parameters()
        return self

    def train(self, mode: bool = True) -> "EncoderDecoder":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


# --------------------------------------------------------------------------------------------------
# Converting a user's model: BatchNorm -> GroupNorm (as Opacus' ModuleValidator.fix does)
# --------------------------------------------------------------------------------------------------
def _opacus_groups(channels: int) -> int:
    """Opacus' default (``opacus.validators.batch_norm``): ``gcd(32, C)``, 32 groups when 32 divides C."""
    return math.gcd(32, channels)


def _num_groups(groups, channels: int, name: str) -> int:
    g = _opacus_groups(channels) if groups is None else (groups(channels) if callable(groups) else groups)
    if isinstance(g, bool) or not isinstance(g, int):
        raise TypeError(f"groups for {name!r} ({channels} channels) must be an int, got {type(g).__name__}")
    if g < 1 or channels % g:
        raise ValueError(f"groups={g} does not divide the {channels} channels of {name!r}; pass groups=None "
                         f"(gcd(32, C)), an int dividing every BatchNorm's channels, or a callable C -> groups")
    return g


def _factory(module: nn.Module) -> dict:
    tensors = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
    floats = [t for t in tensors if t.is_floating_point()]
    ref = floats[0] if floats else (tensors[0] if tensors else None)
    return {} if ref is None else {"device": ref.device, "dtype": floats[0].dtype if floats else None}


def _copy_affine(old: nn.Module, new: nn.Module) -> None:
    with torch.no_grad():
        for attr in ("weight", "bias"):
            src = getattr(old, attr, None)
            if src is None:
                if getattr(new, attr, None) is not None:  # BatchNorm(bias=False): no shift
                    new.register_parameter(attr, None)
                continue
            dst = getattr(new, attr)
            dst.copy_(src)
            dst.requires_grad_(src.requires_grad)


def _convert(module: nn.Module, name: str, groups) -> nn.Module:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"{name!r} ({type(module).__name__}) is not initialised yet: run one forward pass before "
                         f"replace_batchnorm")
    kw = _factory(module)
    if isinstance(module, _BatchNorm):
        channels = module.num_features
        new = nn.GroupNorm(_num_groups(groups, channels, name), channels, eps=module.eps, affine=module.affine, **kw)
    else:  # InstanceNorm with running statistics: the same InstanceNorm without them
        new = type(module)(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=False, **kw)
    if module.affine:
        _copy_affine(module, new)
    new.train(module.training)
    return new


def replace_batchnorm(
    model: nn.Module,
    *,
    groups: Union[None, int, Callable[[int], int]] = None,
) -> list[str]:
    """Make ``model`` free of batch statistics, in place, and say what changed.

    * ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (any ``_BatchNorm``, with or without running statistics)
      become ``GroupNorm(G, C)`` with the BatchNorm's ``eps``; ``affine=False`` gives ``GroupNorm(affine=False)``.
      The affine weight and bias are copied (and keep their ``requires_grad``); a BatchNorm without bias gives a
      GroupNorm without bias.
    * ``InstanceNorm1d/2d/3d`` with ``track_running_stats=True`` become the same InstanceNorm with
      ``track_running_stats=False`` (and no running-statistic buffers).

    This is what Opacus' ``ModuleValidator.fix`` does (same default group counts), except that every such layer
    is converted (Opacus skips layers without trainable parameters: frozen or ``affine=False`` ones), the
    running-statistic buffers are gone (Opacus keeps them on the fixed InstanceNorms), and eps and the affine
    parameters carry over. Afterwards the
    model has no floating-point buffers from normalisation layers. Its outputs change (no running
    statistics), so fine-tune or retrain it after converting, and build its optimizer afterwards (the new
    layers have new parameter tensors). Each new layer is on the old one's device and dtype and in its
    train/eval mode.

    Args:
        model: the model, changed in place. It cannot itself be a BatchNorm (wrap it in a container).
        groups: the number of groups of each GroupNorm: ``None`` is Opacus' default ``gcd(32, C)`` (32 when
            32 divides the C channels, else the largest power of two dividing C); an int must divide every
            converted BatchNorm's C; a callable maps C to the groups, e.g. the largest divisor of C up to 32
            is ``groups=lambda c: max(d for d in range(1, 33) if c % d == 0)``. ``groups=1`` normalises over
            all channels (LayerNorm-like; advisable for a ``BatchNorm1d`` on ``(N, C)`` inputs, where G
            groups each normalise only C/G values).

    Returns:
        One line per replaced module, ``"<name>: <old module> -> <new module>"`` (a module shared under
        several names lists them all: ``"a.bn, b.bn: ..."``); ``[]`` when there was nothing to replace.

    Raises:
        ValueError: ``model`` is itself such a layer, a lazy layer is not initialised yet, or ``groups`` does
            not divide some layer's channels. All checks run first: on an error ``model`` is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if groups is not None and not callable(groups) and (isinstance(groups, bool) or not isinstance(groups, int)):
        raise TypeError(f"groups must be None, an int or a callable C -> groups, got {groups!r}")

    def needs_change(m: nn.Module) -> bool:
        return isinstance(m, _BatchNorm) or (isinstance(m, _InstanceNorm) and m.track_running_stats)

    if needs_change(model):
        raise ValueError(f"model is itself a {type(model).__name__}, which cannot be replaced in place; wrap it, "
                         f"e.g. nn.Sequential(model)")
    names: dict[int, list[str]] = {}
    olds: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if needs_change(m):
            names.setdefault(id(m), []).append(name)
            olds[id(m)] = m
    new = {key: _convert(m, names[key][0], groups) for key, m in olds.items()}  # everything checked first
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child is not None and id(child) in new and olds[id(child)] is child:
                setattr(parent, child_name, new[id(child)])
    return [f"{', '.join(names[key])}: {olds[key]!r} -> {new[key]!r}" for key in olds]
