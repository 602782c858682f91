"""Per-sample gradients of a batch in one backward pass ("book-keeping", Bu et al. 2023).

:class:`PerSampleGradients` hooks every layer of a module that has trainable parameters. During the
forward pass it keeps each layer's input ``a`` (an alias of what autograd saves anyway); during the
backward pass a hook on the layer's output keeps the output gradient ``g``. From ``(a, g)``:

* :meth:`~PerSampleGradients.per_sample_norms` gives the global L2 norm of every sample's gradient over
  all trainable parameters. For a layer whose per-sample gradient is ``g_iᵀ a_i`` with ``T`` positions
  (tokens, pixels), ``p`` outputs and ``d`` inputs, the *ghost norm*
  ``‖g_iᵀ a_i‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` is used when ``2T² ≤ p·d`` (no per-sample weight);
  otherwise, on a GPU and when the batch's per-sample gradients exceed ``chunk_bytes``, the fused kernel
  :func:`pyunlearn.ops.per_sample_sq_norms` (CUDA or Triton) reduces each sample's weight gradient to
  its norm in registers (Linear, Conv1d and Conv2d with one group; no per-sample gradient is written), and
  elsewhere that layer's per-sample gradients are formed a few samples at a time (``chunk_bytes``) and
  reduced to norms. A convolution whose whole batch fit in one chunk keeps them until
  :meth:`~PerSampleGradients.clipped_sum_`, which then sums them instead of redoing the weight gradient. For convolutions the per-sample
  gradients come from one grouped weight-gradient convolution (the batch folded into the groups, the
  channels of a group zero-padded to a multiple of 8 for mkldnn's fast kernels); a 1x1 convolution
  without stride or padding is a batched matrix product over pixels.
* :meth:`~PerSampleGradients.clipped_sum_` writes ``Σ_i clip(g_i, C)`` into ``p.grad`` with Opacus'
  factor ``min(1, C / (‖g_i‖ + 1e-6))``, as one weight-gradient product per layer on per-sample scaled
  output gradients (``Σ_i c_i g_iᵀ a_i``), or as ``Σ_i c_i G_i`` over the per-sample gradients the norm
  pass already formed (see above); it forms no new ``(B, *weight.shape)`` tensor.
* :meth:`~PerSampleGradients.grad_samples` materialises the per-sample gradients (tests, debugging).

While a wrapped layer runs forward with gradients enabled, its trainable parameters are detached
from the graph (``requires_grad`` is switched off for the duration of its ``forward``), so
``loss.backward()`` does **not** compute or touch ``p.grad`` of wrapped parameters: that would be the
wasted non-private gradient. ``p.grad`` is written by :meth:`clipped_sum_` only.

**Loss reduction.** The per-sample gradient of sample ``i`` is that of its own loss ``ℓ_i``. With
``loss_reduction="sum"`` (default) call ``backward`` on ``Σ_i ℓ_i``; with ``loss_reduction="mean"``
on ``(1/B) Σ_i ℓ_i`` (the output gradients are then multiplied by the batch size ``B``, as Opacus does).

Supported layers (exact types): ``Linear`` (any leading dims after the batch), ``Conv1d/2d/3d`` (any
stride, padding incl. strings and padding modes, dilation, groups), ``ConvTranspose1d/2d/3d``,
``GroupNorm``, ``LayerNorm``, ``RMSNorm``, ``InstanceNorm1d/2d/3d`` (affine), ``PReLU`` (one or per-channel
weights; MONAI's default activation). Any other module with a
trainable parameter raises ``TypeError`` naming it; batch normalisation with batch statistics (in
training mode or without running statistics, frozen or not) raises ``ValueError`` at forward time,
because it mixes the samples of a batch. Frozen parameters (``requires_grad=False``) are skipped.
The batch dimension is the first. A layer called several times in one forward pass (weight sharing)
is supported: the per-sample gradient is the sum over its calls; one parameter shared by two layers
(tied weights) is refused. Not supported: activation checkpointing (recomputed forwards).

**One pass, one clipped sum.** A forward pass of the wrapped module with gradients enabled, its backward
pass, then :meth:`~PerSampleGradients.clipped_sum_`. Refused with an error, because the per-sample
gradients would be wrong or samples would silently count twice or not at all: a second forward pass
before the backward of the first (its rows would merge with the first's), a forward pass after a backward
whose gradients were not summed (they would be dropped; :meth:`~PerSampleGradients.clear` discards them
explicitly), a second ``clipped_sum_`` or a second backward on a pass already summed. Micro-batches of one
logical batch: one pass each, ``clipped_sum_(C, accumulate=True)`` from the second on. The written
gradients are one :class:`ClippedSum` record, fingerprinted, that :class:`pyunlearn.optim.DPSGD` checks
and uses once. An empty (Poisson) batch: :meth:`~PerSampleGradients.empty_batch_` writes zero sums without
a forward pass (a pass over zero rows also gives zero sums).

Example::

    with PerSampleGradients(decoder) as psg:
        loss = per_sample_loss(decoder(features), target).sum()
        loss.backward()
        psg.clipped_sum_(max_grad_norm=1.0)   # p.grad = sum of clipped per-sample gradients
        optimizer.step()                      # e.g. pyunlearn.optim.DPSGD
        optimizer.zero_grad()

**Layout** (as Opacus' ``grad_sample/``): one file per layer type holds its rule and registers it with
:func:`register_rule` (``linear``, ``conv``, ``norm``, ``prelu``); ``_base`` holds the rule interface and the
shared helpers, ``core`` the wrapper. A new layer type is one new file defining a ``_Rule`` subclass
(``sq_norms``, ``clipped``, ``samples``; optionally ``on_forward``) under ``@register_rule({LayerType: input
ranks or None})``, plus its import below. Every name of the former single module stays importable from here
(monkeypatching a helper must target the file that uses it, e.g. ``pyunlearn.per_sample.conv``).
"""
from __future__ import annotations

from torch import nn

# The rule files register their layer types on import, in this order (the order of SUPPORTED_LAYERS).
from . import linear  # noqa: F401,I001
from . import conv  # noqa: F401
from . import norm  # noqa: F401
from . import prelu  # noqa: F401
from ._base import (  # noqa: F401
    _INPUT_DIMS,
    _RULES,
    _Call,
    _Rule,
    _acc,
    _bcast,
    _chunks,
    _fused_norms,
    _pair,
    _sq,
    register_rule,
    supported_layers,
)
from .conv import (  # noqa: F401
    _CHANNEL_BLOCK,
    _CONV,
    _CONV_T,
    _conv_args,
    _conv_per_sample,
    _conv_weight_grad,
    _ConvRule,
    _pad_channels,
    _pointwise,
    _round_up,
)
from .core import (  # noqa: F401
    _FP_KEY,
    _SERIAL,
    _TAG,
    CLIP_EPS,
    ClippedSum,
    LossReduction,
    NormMethod,
    PerSampleGradients,
    _Anchor,
    _display,
    _fingerprint,
    _Layer,
    _mark,
    clip_factor,
    clipped_sum_info,
    inspect_clipped_sum,
    wrap,
)
from .linear import _LinearRule  # noqa: F401
from .norm import _INSTANCE, _TRAILING_NORM, _NormRule  # noqa: F401
from .prelu import _PReLURule  # noqa: F401

__all__ = ["ClippedSum", "PerSampleGradients", "wrap", "SUPPORTED_LAYERS", "clip_factor", "clipped_sum_info",
           "inspect_clipped_sum", "register_rule", "supported_layers"]

#: The layer types with a per-sample rule (exact types), in registration order.
SUPPORTED_LAYERS: tuple[type, ...] = supported_layers()
_LINEAR, _CONVS, _NORMS, _PRELU = _RULES[nn.Linear], _RULES[nn.Conv2d], _RULES[nn.GroupNorm], _RULES[nn.PReLU]
