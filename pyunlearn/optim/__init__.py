"""Certified and differentially private optimizers: drop-in ``torch.optim.Optimizer`` subclasses."""
from .gradient_clipping import GradientClipping
from .model_clipping import ModelClipping, epsilon_model_clipping

__all__ = ["GradientClipping", "ModelClipping", "epsilon_model_clipping"]

try:  # DP-SGD lands with the per-sample gradient module.
    from .dpsgd import DPSGD  # noqa: F401

    __all__.append("DPSGD")
except ImportError:  # pragma: no cover
    pass
