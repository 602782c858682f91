"""A small encoder-decoder segmentation model whose decoder is the certified parameter set."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EncoderDecoder", "Encoder", "Decoder"]


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
