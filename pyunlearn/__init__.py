"""pyunlearn: certified unlearning of shortcut pixels in segmentation models, with fused kernels.

Submodules: ``masks``, ``losses``, ``certify``, ``optim``, ``unlearn``, ``metrics``, ``data``, ``models``,
``ops`` (kernels and backends), ``per_sample``, ``pipeline`` (the main job) and ``cli``.
"""
from . import certify, data, losses, masks, metrics, models, ops, optim, unlearn  # noqa: F401

__version__ = "0.1.0"
