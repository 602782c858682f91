"""A user's own trained segmentation model, made ready for an unlearning operator.

:func:`load_factory` imports ``"package.module:callable"``; :func:`build_user_model` instantiates it, loads the
user's state dict (a clear error listing missing and unexpected keys), marks the certified parameters (fnmatch
patterns; everything else is frozen and assumed public), optionally converts BatchNorm, and wraps a model that
returns a tuple/list/dict in :class:`SelectOutput`. :meth:`UserModel.user_state_dict` unwraps again, so a
saved state dict has the user's own key names.
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

__all__ = ["SelectOutput", "UserModel", "build_user_model", "load_factory", "select_output"]


def load_factory(spec: str) -> Callable:
    """The callable named ``"package.module:attribute"`` (the attribute may be dotted: ``"mod:Class.create"``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"must be 'package.module:callable', got {spec!r}")
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise ValueError(f"must be 'package.module:callable', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TypeError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def select_output(out: Any, output: Union[None, int, str]) -> torch.Tensor:
    """The logits tensor among a model's outputs: ``out`` itself, ``out[output]`` of a tuple/list (int) or a
    dict (str key). An error says what the model returned and which selector to set."""
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)):
            raise TypeError(f"the model returns a {type(out).__name__} of {len(out)} outputs; set [model] output = "
                            "the index of the segmentation logits (e.g. output = 0)")
        if isinstance(out, dict):
            raise TypeError(f"the model returns a dict with keys {sorted(map(str, out))}; set [model] output = the key "
                            "of the segmentation logits")
        raise TypeError(f"the model returns a {type(out).__name__}, not a tensor of logits")
    if isinstance(output, int) and isinstance(out, (tuple, list)):
        if not -len(out) <= output < len(out):
            raise IndexError(f"[model] output = {output}, but the model returns {len(out)} outputs")
        value = out[output]
    elif isinstance(output, str) and isinstance(out, dict):
        if output not in out:
            raise KeyError(f"[model] output = {output!r}, but the model's outputs are {sorted(map(str, out))}")
        value = out[output]
    else:
        raise TypeError(f"[model] output = {output!r} does not select from a {type(out).__name__} (an int selects "
                        "from a tuple or list, a string from a dict)")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"[model] output = {output!r} selects a {type(value).__name__}, not a tensor of logits")
    return value


class SelectOutput(nn.Module):
    """``inner(x)[output]``: a model returning several outputs (deep supervision, auxiliary heads) as one that
    returns its segmentation logits. Parameter names gain the prefix ``inner.``."""

    def __init__(self, inner: nn.Module, output: Union[int, str]):
        super().__init__()
        self.inner = inner
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.inner(x), self.output)


@dataclass
class UserModel:
    """The module the operators get (``module``: the user's model, or it wrapped in :class:`SelectOutput`),
    and the parameter names, in the user's own naming, that are certified and frozen (public)."""

    module: nn.Module
    certified: list[str]
    public: list[str]
    wrapped: bool = False
    converted: list[str] = field(default_factory=list)  # modules replace_batchnorm changed

    @property
    def prefix(self) -> str:
        return "inner." if self.wrapped else ""

    def user_name(self, name: str) -> str:
        """A parameter name of ``module`` (or of an operator's copy of it) in the user's naming."""
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def user_model(self, module: Optional[nn.Module] = None) -> nn.Module:
        """The user's model inside ``module`` (default: :attr:`module`)."""
        module = self.module if module is None else module
        return module.inner if self.wrapped else module

    def user_state_dict(self, module: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
        """The state dict of the user's model inside ``module``, with the user's key names, on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.user_model(module).state_dict().items()}


def _limited(names, n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _load_state_dict(path: Path, model: nn.Module, *, where: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor objects refused by weights_only
        raise ValueError(f"{where}weights: cannot read {str(path)!r} as a state dict (torch.load(weights_only=True): "
                         f"{exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{where}weights: {str(path)!r} holds a {type(state).__name__}, not a state dict "
                         "(save it with torch.save(model.state_dict(), path))")
    if "state_dict" in state and isinstance(state["state_dict"], dict) and not isinstance(state["state_dict"],
                                                                                          torch.Tensor):
        raise ValueError(f"{where}weights: {str(path)!r} is a checkpoint holding a 'state_dict' entry; save the state "
                         "dict alone (torch.save(checkpoint['state_dict'], path))")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_limited(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_limited(unexpected)}")
        raise ValueError(f"{where}weights: {str(path)!r} does not fit the model built by the factory: "
                         f"{'; '.join(parts)}")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise ValueError(f"{where}weights: {str(path)!r} has tensors of other shapes than the model (file vs model): "
                         f"{_limited(shapes)}")
    model.load_state_dict(state, strict=True)


def build_user_model(*, factory: Callable, kwargs: Optional[dict] = None, weights: Union[str, Path],
                     certify: list[str], output: Union[None, int, str] = None, replace_batchnorm: bool = False,
                     where: str = "") -> UserModel:
    """Instantiate ``factory(**kwargs)``, load ``weights`` (a state dict), certify the parameters whose names
    match a pattern of ``certify`` (fnmatch; ``requires_grad`` True for them, False for every other) and wrap
    the model in :class:`SelectOutput` when ``output`` is given. ``replace_batchnorm`` converts BatchNorm to
    GroupNorm after the weights are loaded (:func:`pyunlearn.models.replace_batchnorm`); otherwise a BatchNorm
    the certified run cannot cover is refused by the operator. ``where`` prefixes errors (e.g. the file)."""
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:
        raise ValueError(f"{where}factory: calling it with [model.kwargs] failed: {type(exc).__name__}: {exc}") \
            from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}factory returned a {type(model).__name__}, not a torch.nn.Module")
    _load_state_dict(Path(weights), model, where=where)
    converted: list[str] = []
    if replace_batchnorm:
        from .models import replace_batchnorm as convert

        converted = list(convert(model))
    names = [n for n, _ in model.named_parameters()]
    if isinstance(certify, str) or not certify:
        raise ValueError(f"{where}certify must be a non-empty list of parameter-name patterns, got {certify!r}")
    chosen: set[str] = set()
    for pattern in certify:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(f"{where}certify: pattern {pattern!r} matches no parameter of the model; its parameters "
                             f"are: {_limited(names, 12)}")
        chosen.update(matched)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    certified = [n for n in names if n in chosen]
    public = [n for n in names if n not in chosen]
    module = SelectOutput(model, output) if output is not None else model
    return UserModel(module=module, certified=certified, public=public, wrapped=output is not None,
                     converted=converted)
