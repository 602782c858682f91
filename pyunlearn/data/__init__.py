"""Data sets: the synthetic shortcut benchmark, ISIC 2018, generic image/mask folders, coarse/fine
folders and NIfTI volumes; the ``foreground`` mask rules; Poisson sampling for DP-SGD."""
from ._io import Threshold
from .folders import CoarseFineFolder, ImageMaskFolder
from .isic import ISIC2018
from .nifti import NiftiFolder
from .sampling import PoissonBatchSampler, poisson_loader
from .synthetic import ARTEFACT_KINDS, SyntheticShortcuts

__all__ = ["ARTEFACT_KINDS", "ISIC2018", "CoarseFineFolder", "ImageMaskFolder", "NiftiFolder",
           "PoissonBatchSampler", "SyntheticShortcuts", "Threshold", "poisson_loader"]
