"""Unlearning operators.

Segmentation operators take ``(model, data, ...)`` with ``data`` a :class:`SegmentationUnlearningData` (in
memory) or a :class:`StreamingSegmentationData` (read from a Dataset a batch at a time); classification
operators take ``(model, forget, remain, ...)``. ``finetune`` and ``retrain`` serve both and dispatch
on the type of their second argument. Every operator returns ``(model, record)`` and leaves the input
model unchanged unless ``inplace=True``.
"""
from . import classification, segmentation
from .classification import compose, neggrad_plus, scrub, train_classifier
from .data import SegmentationUnlearningData
from .streaming import StreamingSegmentationData
from .psg import boundary_points, boundary_shrink, perturbed_sign_step, psg, psg_segmentation
from .segmentation import (
    gradient_clipping,
    model_clipping,
    neggrad_seg,
    output_perturbation,
    relabel,
    train_segmenter,
)


def finetune(model, data, *args, **kwargs):
    """Fine-tune on retained data: :func:`segmentation.finetune` for a
    :class:`SegmentationUnlearningData`, else :func:`classification.finetune` ``(model, forget, remain)``."""
    if isinstance(data, (SegmentationUnlearningData, StreamingSegmentationData)):
        return segmentation.finetune(model, data, *args, **kwargs)
    return classification.finetune(model, data, *args, **kwargs)


def retrain(model, data, *args, **kwargs):
    """Retrain from scratch on retained data (segmentation or classification, as :func:`finetune`)."""
    if isinstance(data, (SegmentationUnlearningData, StreamingSegmentationData)):
        return segmentation.retrain(model, data, *args, **kwargs)
    return classification.retrain(model, data, *args, **kwargs)


__all__ = [
    "SegmentationUnlearningData", "StreamingSegmentationData", "boundary_points", "boundary_shrink", "compose", "finetune", "gradient_clipping",
    "model_clipping", "neggrad_plus", "neggrad_seg", "output_perturbation", "perturbed_sign_step", "psg",
    "psg_segmentation", "relabel", "retrain", "scrub", "train_classifier", "train_segmenter",
]
