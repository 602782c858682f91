"""Certified and differentially private optimizers: drop-in ``torch.optim.Optimizer`` subclasses."""
from .dpsgd import DPSGD, group_privacy
from .gradient_clipping import GradientClipping
from .model_clipping import ModelClipping, epsilon_model_clipping

__all__ = ["DPSGD", "GradientClipping", "ModelClipping", "epsilon_model_clipping", "group_privacy"]
