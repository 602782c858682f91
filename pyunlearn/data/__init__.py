"""Data sets: the synthetic shortcut benchmark, ISIC 2018, and generic image/mask folders."""
from .folders import ImageMaskFolder
from .isic import ISIC2018
from .synthetic import ARTEFACT_KINDS, SyntheticShortcuts

__all__ = ["ARTEFACT_KINDS", "ISIC2018", "ImageMaskFolder", "SyntheticShortcuts"]
