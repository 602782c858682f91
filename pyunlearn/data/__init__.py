"""Data sets: the synthetic shortcut benchmark, ISIC 2018, and generic image/mask folders; Poisson
sampling for DP-SGD."""
from .folders import ImageMaskFolder
from .isic import ISIC2018
from .sampling import PoissonBatchSampler, poisson_loader
from .synthetic import ARTEFACT_KINDS, SyntheticShortcuts

__all__ = ["ARTEFACT_KINDS", "ISIC2018", "ImageMaskFolder", "PoissonBatchSampler", "SyntheticShortcuts",
           "poisson_loader"]
