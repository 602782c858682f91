"""Unlearning operators. Segmentation operators take a :class:`SegmentationUnlearningData`."""
from .data import SegmentationUnlearningData
from .segmentation import (
    finetune,
    gradient_clipping,
    model_clipping,
    neggrad_seg,
    output_perturbation,
    relabel,
    retrain,
    train_segmenter,
)

__all__ = [
    "SegmentationUnlearningData", "finetune", "gradient_clipping", "model_clipping", "neggrad_seg",
    "output_perturbation", "relabel", "retrain", "train_segmenter",
]
