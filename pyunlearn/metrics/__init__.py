"""Evaluation: pooled image scores, subgroup AUROC, Dice, spurious information, forgetting metrics."""
from .segmentation import auroc, dice, pooled_scores, s_global, subgroup_auroc

__all__ = ["auroc", "dice", "pooled_scores", "s_global", "subgroup_auroc"]
