"""Floating-point buffers escape a certificate's noise: certified operators refuse them in the certified
part of the model and in frozen modules the run would put in training mode (DESIGN.md, threat model)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pyunlearn import unlearn
from pyunlearn.models import EncoderDecoder
from pyunlearn.unlearn import SegmentationUnlearningData
from pyunlearn.unlearn.segmentation import check_no_float_buffers


class _Net(nn.Module):
    def __init__(self, encoder_norm: nn.Module, decoder_norm: nn.Module):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), encoder_norm)
        self.decoder = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), decoder_norm, nn.Conv2d(4, 2, 1))
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def _data() -> SegmentationUnlearningData:
    g = torch.Generator().manual_seed(0)
    fine = torch.zeros(4, 8, 8, dtype=torch.long)
    fine[:, 2:5, 2:5] = 1
    coarse = fine.clone()
    coarse[:, 1:6, 1:6] = 1
    return SegmentationUnlearningData.from_masks(torch.rand(4, 1, 8, 8, generator=g), coarse, fine,
                                                 torch.tensor([True, True, False, False]))


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4)])
def test_batchnorm_in_the_certified_decoder_is_refused_and_the_model_is_unchanged(norm):
    model = _Net(nn.Identity(), norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="decoder.1.*floating-point buffers"):
        unlearn.gradient_clipping(model, _data(), steps=2, finetune_steps=0, inplace=True, noise_seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_batchnorm_that_would_train_is_refused():
    model = _Net(nn.BatchNorm2d(4), nn.Identity())
    with pytest.raises(ValueError, match="encoder.1.*training mode"):
        check_no_float_buffers(model)


def test_frozen_batchnorm_kept_in_eval_and_groupnorm_are_accepted():
    class EvalEncoder(_Net):
        def train(self, mode: bool = True):
            super().train(mode)
            self.encoder.eval()
            return self

    model = EvalEncoder(nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    model.train()
    check_no_float_buffers(model)
    assert model.training and not model.encoder[1].training  # the check left the modes as they were
    check_no_float_buffers(EncoderDecoder().freeze_encoder())
