"""What every per-sample rule shares: the recorded call of a layer, the rule interface, helpers, and the
registry mapping layer types to rules (:func:`register_rule`).

A rule turns the recorded calls of one layer (input ``a``, output gradient ``g``) into squared per-sample norms
``(B,)``, book-kept clipped sums ``{local name: tensor}``, or per-sample gradients ``(B, *param.shape)``. Every
layer type has one file in this package that defines its rule and registers it; :mod:`pyunlearn.per_sample`
imports them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from .. import ops

__all__ = ["register_rule", "supported_layers"]


@dataclass
class _Call:
    """One forward call of a wrapped layer."""

    a: torch.Tensor
    names: tuple[str, ...]  # trainable parameters at forward time
    out_shape: torch.Size
    extra: dict = field(default_factory=dict)
    g: Optional[torch.Tensor] = None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row block: (b, ...) -> (b,)."""
    flat = t.reshape(t.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=_acc(t.dtype)).square()


def _pair(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, g.dtype)
    return a.to(dtype), g.to(dtype)


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _fused_norms(a: torch.Tensor, g: torch.Tensor, bytes_per_sample: int, budget: int) -> bool:
    """Whether the per-sample weight-gradient norms of a layer with input ``a`` and output gradient ``g``
    come from a fused kernel (``pyunlearn.ops.per_sample_sq_norms`` on CUDA or Triton: no per-sample
    gradient is written) rather than from per-sample gradients formed a chunk of samples at a time.

    NOTE: only when the batch's per-sample gradients exceed one chunk (``chunk_bytes``). Below that,
    forming them is one grouped convolution whose result ``clipped_sum_`` reuses, and the fused kernels
    (one program per sample and weight tile, positions walked serially) have little parallelism.
    Not tuned on a GPU (none was available)."""
    return a.shape[0] * bytes_per_sample > budget and ops.per_sample_norms_backend(a, g) != "reference"


def _chunks(batch: int, bytes_per_sample: int, budget: int) -> Iterator[slice]:
    step = max(1, budget // max(1, bytes_per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


class _Rule:
    """Interface of a layer rule; ``calls`` all have output gradients and one batch size."""

    def sq_norms(self, layer: nn.Module, calls: list[_Call], method: str, budget: int) -> torch.Tensor:
        raise NotImplementedError

    def clipped(self, layer: nn.Module, calls: list[_Call], c: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def samples(self, layer: nn.Module, calls: list[_Call]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_forward(self, layer: nn.Module, call: _Call) -> None:
        """Called when a forward call of ``layer`` is recorded: store in ``call.extra`` what the rule needs
        from forward time (e.g. the layer's mode). Default: nothing."""


#: Layer type -> its rule (exact types: a subclass may change the forward and is refused).
_RULES: dict[type, _Rule] = {}
#: Layer type -> the input ranks it accepts (batch dim included), for a clear error on an unbatched input.
_INPUT_DIMS: dict[type, tuple[int, ...]] = {}


def register_rule(layers: Mapping[type, Optional[tuple[int, ...]]]) -> Callable[[type], type]:
    """Class decorator registering a :class:`_Rule` subclass (one instance) for the exact layer types ``layers``,
    each mapped to the input ranks it accepts with the batch dimension (``None``: any rank >= 2)::

        @register_rule({nn.PReLU: None})
        class _PReLURule(_Rule):
            ...

    A type registered twice is refused."""
    def decorate(cls: type) -> type:
        rule = cls()
        for kind, dims in layers.items():
            if kind in _RULES:
                raise ValueError(f"a per-sample rule for {kind.__qualname__} is already registered "
                                 f"({type(_RULES[kind]).__name__})")
            _RULES[kind] = rule
            if dims is not None:
                _INPUT_DIMS[kind] = tuple(dims)
        return cls
    return decorate


def supported_layers() -> tuple[type, ...]:
    """The layer types with a registered rule, in registration order."""
    return tuple(_RULES)
