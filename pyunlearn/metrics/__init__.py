"""Evaluation: pooled image scores, subgroup AUROC, Dice, spurious information, forgetting metrics."""
from .forgetting import (
    accuracy,
    evaluate_forgetting,
    forgetting_accuracies,
    membership_inference,
    per_sample_losses,
    predict_logits,
    retrain_gap,
    split,
)
from .segmentation import auroc, dice, pooled_scores, s_global, subgroup_auroc

__all__ = [
    "accuracy", "auroc", "dice", "evaluate_forgetting", "forgetting_accuracies", "membership_inference",
    "per_sample_losses", "pooled_scores", "predict_logits", "retrain_gap", "s_global", "split", "subgroup_auroc",
]
