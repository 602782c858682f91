"""torch.library registration of the hot-path ops and their backend dispatch.

Ops (namespace ``pyunlearn``, registered once when ``pyunlearn.ops`` is imported):

* ``pyunlearn::masked_cross_entropy(logits, target, mask, weight) -> (loss, grad_logits)`` with an
  autograd formula (d logits = grad_loss[:, None, None] * grad_logits) and a fake kernel;
* ``pyunlearn::gradient_clipping_step_``, ``pyunlearn::model_clipping_step_`` (mutate ``params``,
  return the norm), ``pyunlearn::dpsgd_step_`` and ``pyunlearn::add_noise_`` (mutate ``params``).

Each op has a default implementation (the PyTorch reference, any device), a CPU kernel and a CUDA
kernel that choose a backend at call time:

* CPU: the compiled C++ kernels (``pyunlearn._C``) when loaded, else the reference;
* CUDA: the compiled CUDA kernels (the ``cuda_*`` functions of ``pyunlearn._C`` in a CUDA build), else
  Triton (``pyunlearn._triton``), else the reference.

``PYUNLEARN_BACKEND=reference|cpp|triton|cuda`` (read at every call) forces one; forcing a backend
that is unavailable, or that cannot run on the tensors' device, raises ``RuntimeError``. ``triton`` on
CPU tensors needs ``TRITON_INTERPRET=1``.

The compiled (C++ and CUDA) step kernels handle float32 parameters and gradients, the Triton ones
float32 parameters; other dtypes run the reference (also when that backend is forced). Under
``torch.compile`` the ops are opaque calls with fake kernels, except that masked cross-entropy is
and per-sample norms are decomposed into their Triton ``triton_op`` when Triton is the backend selected
(``_triton_decomposition``; the choice is then made when the graph is traced).
The step ops stay opaque on purpose: their kernels reach the parameters through an address table,
a mutation the compiler's kernel analysis cannot see. In the compiled paths non-contiguous
parameters are updated through contiguous copies that are copied back, non-contiguous gradients are
read through contiguous copies, and logits are read in place with their strides. Gradients of
``masked_cross_entropy`` are always returned contiguous.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from . import reference as _ref
from ._extension import load as _load_extension
from .rng import STREAM_UPDATE

BACKENDS = ("reference", "cpp", "triton", "cuda")
_ENV = "PYUNLEARN_BACKEND"
_CPP_TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)


# --------------------------------------------------------------------------------------------------
# Backend discovery
# --------------------------------------------------------------------------------------------------
def forced_backend() -> Optional[str]:
    """The backend named by ``PYUNLEARN_BACKEND`` (``None`` when unset, empty or ``auto``)."""
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{_ENV} must be one of {BACKENDS} (or 'auto'), got {value!r}")
    return value


def _cpp() -> Optional[ModuleType]:
    return _load_extension()


def _cuda_available() -> bool:
    module = _cpp()
    return bool(module is not None and getattr(module, "WITH_CUDA", False) and torch.cuda.is_available())


def _triton_package() -> Optional[ModuleType]:
    try:
        return importlib.import_module("pyunlearn._triton")
    except ImportError:
        return None


def _triton_available() -> bool:
    package = _triton_package()
    return bool(package is not None and package.is_available())


def _triton_interpreting() -> bool:
    package = _triton_package()
    if package is not None:
        return bool(package.interpreting())
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")


def _run_triton(name: str, device: torch.device, *args, **kwargs):
    """Eager call of the Triton launcher ``name`` with ``device`` current (Triton launches on the current
    CUDA device, which need not be the tensors')."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _triton_fn(name)(*args, **kwargs)


def _triton_fn(name: str) -> Callable:
    package = _triton_package()
    if package is None:
        raise RuntimeError("the Triton backend is unavailable: pyunlearn._triton cannot be imported")
    return getattr(package, name)


def backends() -> dict[str, bool]:
    """Which implementations are live in this process."""
    return {
        "reference": True,
        "cpp": _cpp() is not None,
        "cuda": _cuda_available(),
        "triton": _triton_available(),
        "triton_interpreter": _triton_interpreting(),
    }


def _unavailable(name: str) -> str:
    if name == "cpp":
        from ._extension import unavailable_reason

        return unavailable_reason() or "pyunlearn._C is not loaded"
    if name == "cuda":
        return "pyunlearn._C was built without CUDA kernels or no CUDA device is present"
    package = _triton_package()
    if package is None:
        return "pyunlearn._triton cannot be imported"
    return package.unavailable_reason() or "unknown reason"


def select_backend(op: str, device: torch.device, *, has_triton: bool = True) -> str:
    """The backend that runs ``op`` on ``device`` now (forced by ``PYUNLEARN_BACKEND``, else automatic).

    ``has_triton=False`` for ops without a Triton launcher (they use the reference under Triton).
    """
    forced = forced_backend()
    if forced is not None:
        if forced == "cpp":
            if _cpp() is None:
                raise RuntimeError(f"{_ENV}=cpp but the compiled kernels are unavailable: {_unavailable('cpp')}")
            if device.type != "cpu":
                raise RuntimeError(f"{_ENV}=cpp runs CPU tensors only; {op} got tensors on {device}")
        elif forced == "cuda":
            if not _cuda_available():
                raise RuntimeError(f"{_ENV}=cuda but {_unavailable('cuda')}")
            if device.type != "cuda":
                raise RuntimeError(f"{_ENV}=cuda runs CUDA tensors only; {op} got tensors on {device}")
        elif forced == "triton":
            if not _triton_available():
                raise RuntimeError(f"{_ENV}=triton but the Triton backend is unavailable: {_unavailable('triton')}")
            if device.type == "cpu" and not _triton_interpreting():
                raise RuntimeError(f"{_ENV}=triton on CPU tensors ({op}) needs TRITON_INTERPRET=1")
            if not has_triton:
                return "reference"
        return forced
    if device.type == "cpu":
        return "cpp" if _cpp() is not None else "reference"
    if device.type == "cuda":
        if _cuda_available():
            return "cuda"
        if has_triton and _triton_available() and not _triton_interpreting():
            return "triton"
    return "reference"


# --------------------------------------------------------------------------------------------------
# Op 1: masked cross-entropy
# --------------------------------------------------------------------------------------------------
def _acc_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _compiled(backend: str, name: str) -> Callable:
    """The compiled kernel ``name`` of ``backend`` (``cpp``: ``name``, ``cuda``: ``cuda_<name>``)."""
    return getattr(_cpp(), name if backend == "cpp" else f"cuda_{name}")


def _mce_compiled(backend: str, logits: Tensor, target: Tensor, mask: Tensor,
                  weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if target.dtype not in _CPP_TARGET_DTYPES:
        target = target.long()
    if weight is not None:
        weight = weight.to(_acc_dtype(logits)).contiguous()
    return _compiled(backend, "masked_cross_entropy_fwd_bwd")(logits, target.contiguous(), mask.contiguous(), weight)


def _mce_dispatch(logits: Tensor, target: Tensor, mask: Tensor, weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    backend = select_backend("masked_cross_entropy", logits.device)
    if backend == "reference":
        loss, grad = _ref.masked_cross_entropy_fwd_bwd(logits, target, mask, weight)
    elif backend == "triton":
        loss, grad = _run_triton("masked_cross_entropy_fwd_bwd", logits.device, logits, target, mask, weight)
    else:
        loss, grad = _mce_compiled(backend, logits, target, mask, weight)
    # The op's contract (and its fake kernel): fresh, contiguous outputs.
    return loss.contiguous(), grad.contiguous()


@torch.library.custom_op("pyunlearn::masked_cross_entropy", mutates_args=())
def masked_cross_entropy_op(logits: Tensor, target: Tensor, mask: Tensor,
                            weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(loss (B,), grad_logits (B, K, N)); see ``pyunlearn.ops.reference.masked_cross_entropy_fwd_bwd``."""
    loss, grad = _ref.masked_cross_entropy_fwd_bwd(logits, target, mask, weight)
    return loss.contiguous(), grad.contiguous()


masked_cross_entropy_op.register_kernel("cpu")(_mce_dispatch)
masked_cross_entropy_op.register_kernel("cuda")(_mce_dispatch)


@masked_cross_entropy_op.register_fake
def _(logits: Tensor, target: Tensor, mask: Tensor, weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    loss = logits.new_empty((logits.shape[0],), dtype=_acc_dtype(logits))
    grad = logits.new_empty(logits.shape, dtype=logits.dtype)  # contiguous
    return loss, grad


def masked_cross_entropy_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])


def masked_cross_entropy_backward(ctx, grad_loss: Tensor, grad_grad: Optional[Tensor]):
    # The gradient output is treated as a constant (no second-order terms); ``weight`` gets no gradient.
    (grad_logits,) = ctx.saved_tensors
    d_logits = None
    if ctx.needs_input_grad[0]:
        d_logits = (grad_loss[:, None, None] * grad_logits).to(grad_logits.dtype)
    return d_logits, None, None, None


masked_cross_entropy_op.register_autograd(masked_cross_entropy_backward,
                                          setup_context=masked_cross_entropy_setup_context)


def _triton_decomposition(triton_name: str, runs_triton: Callable[..., bool]) -> Callable:
    """A functionalization rule (AOTAutograd, i.e. ``torch.compile``): where ``runs_triton(*args)``, the op
    is replaced by the Triton ``triton_op`` ``triton_name``, so that the compiler sees the Triton kernels
    themselves; otherwise the op stays one opaque call. The backend is thus chosen when the graph is
    traced, and a compiled graph keeps it."""
    def rule(mode, op, types, args, kwargs):
        if runs_triton(*args):
            with mode:
                return _triton_fn(triton_name)(*args, **kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)
    return rule


masked_cross_entropy_op.register_torch_dispatch(FunctionalTensorMode, _triton_decomposition(
    "masked_cross_entropy_op",
    lambda logits, *_: logits.device.type == "cuda" and select_backend("masked_cross_entropy", logits.device) == "triton"))


# --------------------------------------------------------------------------------------------------
# Op 2: multi-tensor clip + noise + update
# --------------------------------------------------------------------------------------------------
def _fp32(tensors: Sequence[Tensor]) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def _run_inplace(params: list[Tensor], fn: Callable[[list[Tensor]], object]) -> object:
    """Run ``fn`` on contiguous stand-ins of ``params`` and copy back the non-contiguous ones."""
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    result = fn(work)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
    return result


def _contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def _step_backend(op: str, params: Sequence[Tensor], grads: Sequence[Tensor]) -> str:
    device = params[0].device if params else torch.device("cpu")
    backend = select_backend(op, device)
    if backend in ("cpp", "cuda") and not (_fp32(params) and _fp32(grads)):
        return "reference"  # the compiled step kernels are float32-only
    if backend == "triton" and not all(p.dtype == torch.float32 for p in params):
        return "reference"  # the Triton step kernels update float32 parameters only
    return backend


def _clip_step_dispatch(name: str, clip_key: str) -> Callable:
    """Dispatch of a clip + noise step op (``gradient_clipping_step_`` / ``model_clipping_step_``)."""
    reference = getattr(_ref, name)

    def dispatch(params: list[Tensor], grads: list[Tensor], lr: float, clip: float, weight_decay: float,
                 sigma: float, key: list[int], step: int, fp_key: list[int], expected_fp: list[float]) -> Tensor:
        backend = _step_backend(name, params, grads)
        if backend == "reference":
            return reference(params, grads, lr=lr, weight_decay=weight_decay, sigma=sigma, key=key, step=step,
                             fp_key=fp_key, expected_fp=expected_fp, **{clip_key: clip})
        if backend == "triton":
            return _run_triton(name, params[0].device, params, grads, lr=lr, weight_decay=weight_decay,
                               sigma=sigma, key=key, step=step, fp_key=fp_key, expected_fp=expected_fp,
                               **{clip_key: clip})
        kernel, gs = _compiled(backend, name), _contiguous(grads)
        return _run_inplace(params, lambda ps: kernel(ps, gs, lr, clip, weight_decay, sigma, key, step, fp_key,
                                                      expected_fp))
    return dispatch


def _dpsgd_dispatch(params: list[Tensor], summed_clipped_grads: list[Tensor], lr: float, noise_multiplier: float,
                    max_grad_norm: float, expected_batch_size: float, weight_decay: float, key: list[int],
                    step: int) -> None:
    kw = dict(lr=lr, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
              expected_batch_size=expected_batch_size, weight_decay=weight_decay, key=key, step=step)
    backend = _step_backend("dpsgd_step_", params, summed_clipped_grads)
    if backend == "reference":
        _ref.dpsgd_step_(params, summed_clipped_grads, **kw)
    elif backend == "triton":
        _run_triton("dpsgd_step_", params[0].device, params, summed_clipped_grads, **kw)
    else:
        kernel, gs = _compiled(backend, "dpsgd_step_"), _contiguous(summed_clipped_grads)
        std = noise_multiplier * max_grad_norm  # in double, as the reference
        _run_inplace(params, lambda ps: kernel(ps, gs, lr, std, expected_batch_size, weight_decay, key, step))


def _add_noise_dispatch(params: list[Tensor], sigma: float, key: list[int], step: int, stream: int) -> None:
    device = params[0].device if params else torch.device("cpu")
    backend = select_backend("add_noise_", device, has_triton=False)
    if backend in ("cpp", "cuda") and _fp32(params):
        kernel = _compiled(backend, "add_noise_")
        _run_inplace(params, lambda ps: kernel(ps, sigma, key, step, stream))
    else:
        _ref.add_noise_(params, sigma=sigma, key=key, step=step, stream=stream)


def _norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _register_step(name: str, reference: Callable, dispatch: Callable, fake: Callable) -> object:
    op = torch.library.custom_op(f"pyunlearn::{name}", mutates_args={"params"})(reference)
    op.register_kernel("cpu")(dispatch)
    op.register_kernel("cuda")(dispatch)
    op.register_fake(fake)
    return op


def _gradient_clipping_reference(params: list[Tensor], grads: list[Tensor], lr: float, max_grad_norm: float,
                                 weight_decay: float, sigma: float, key: list[int], step: int, fp_key: list[int],
                                 expected_fp: list[float]) -> Tensor:
    return _ref.gradient_clipping_step_(params, grads, lr=lr, max_grad_norm=max_grad_norm,
                                        weight_decay=weight_decay, sigma=sigma, key=key, step=step, fp_key=fp_key,
                                        expected_fp=expected_fp)


def _model_clipping_reference(params: list[Tensor], grads: list[Tensor], lr: float, max_model_norm: float,
                              weight_decay: float, sigma: float, key: list[int], step: int, fp_key: list[int],
                              expected_fp: list[float]) -> Tensor:
    return _ref.model_clipping_step_(params, grads, lr=lr, max_model_norm=max_model_norm,
                                     weight_decay=weight_decay, sigma=sigma, key=key, step=step, fp_key=fp_key,
                                     expected_fp=expected_fp)


def _step_result_fake(params: list[Tensor], grads: list[Tensor], lr: float, clip: float, weight_decay: float,
                      sigma: float, key: list[int], step: int, fp_key: list[int], expected_fp: list[float]) -> Tensor:
    return params[0].new_empty((6,), dtype=torch.float64)


def _dpsgd_reference(params: list[Tensor], summed_clipped_grads: list[Tensor], lr: float, noise_multiplier: float,
                     max_grad_norm: float, expected_batch_size: float, weight_decay: float, key: list[int],
                     step: int) -> None:
    _ref.dpsgd_step_(params, summed_clipped_grads, lr=lr, noise_multiplier=noise_multiplier,
                     max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                     weight_decay=weight_decay, key=key, step=step)


def _dpsgd_fake(params: list[Tensor], summed_clipped_grads: list[Tensor], lr: float, noise_multiplier: float,
                max_grad_norm: float, expected_batch_size: float, weight_decay: float, key: list[int],
                step: int) -> None:
    return None


def _add_noise_reference(params: list[Tensor], sigma: float, key: list[int], step: int, stream: int) -> None:
    _ref.add_noise_(params, sigma=sigma, key=key, step=step, stream=stream)


def _add_noise_fake(params: list[Tensor], sigma: float, key: list[int], step: int, stream: int) -> None:
    return None


gradient_clipping_op = _register_step("gradient_clipping_step_", _gradient_clipping_reference,
                                      _clip_step_dispatch("gradient_clipping_step_", "max_grad_norm"),
                                      _step_result_fake)
model_clipping_op = _register_step("model_clipping_step_", _model_clipping_reference,
                                   _clip_step_dispatch("model_clipping_step_", "max_model_norm"), _step_result_fake)
dpsgd_op = _register_step("dpsgd_step_", _dpsgd_reference, _dpsgd_dispatch, _dpsgd_fake)
add_noise_op = _register_step("add_noise_", _add_noise_reference, _add_noise_dispatch, _add_noise_fake)


# --------------------------------------------------------------------------------------------------
# Op 3: per-sample weight-gradient norms of a convolution
# --------------------------------------------------------------------------------------------------
def _psn_backend(a: Tensor, g: Tensor) -> str:
    """``cuda``, ``triton`` or ``reference`` for these inputs; raises for an impossible forced backend."""
    backend = select_backend("per_sample_sq_norms", a.device)
    # The kernels accumulate in float32 and take one input dtype.
    fusable = a.dtype == g.dtype and a.dtype != torch.float64
    return backend if backend in ("cuda", "triton") and fusable else "reference"


def per_sample_norms_backend(a: Tensor, g: Tensor) -> str:
    """Where ``PerSampleGradients`` would compute per-sample norms of ``(a, g)`` with a fused kernel:
    ``cuda`` or ``triton``, else ``reference`` (never raises: a forced backend that cannot run these
    tensors, or that has no such kernel, means the module's own path). There is no C++ CPU kernel: on the
    CPU, ``PerSampleGradients`` forms per-sample gradients with ATen's grouped convolution."""
    try:
        return _psn_backend(a, g)
    except RuntimeError:
        return "reference"


def _psn_dispatch(a: Tensor, g: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                  dilation: list[int]) -> Tensor:
    kw = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    backend = _psn_backend(a, g)
    if backend == "triton":
        return _run_triton("per_sample_sq_norms", a.device, a, g, **kw)
    if backend == "cuda":
        return _cpp().cuda_per_sample_sq_norms(a, g, **kw)
    return _ref.per_sample_sq_norms(a, g, **kw)


@torch.library.custom_op("pyunlearn::per_sample_sq_norms", mutates_args=())
def per_sample_sq_norms_op(a: Tensor, g: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                           dilation: list[int]) -> Tensor:
    """(B,) squared per-sample weight-gradient norms; see ``pyunlearn.ops.reference.per_sample_sq_norms``."""
    return _ref.per_sample_sq_norms(a, g, kernel_size, stride, padding, dilation)


per_sample_sq_norms_op.register_kernel("cpu")(_psn_dispatch)
per_sample_sq_norms_op.register_kernel("cuda")(_psn_dispatch)


@per_sample_sq_norms_op.register_fake
def _(a: Tensor, g: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
      dilation: list[int]) -> Tensor:
    dtype = torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32
    return a.new_empty((a.shape[0],), dtype=dtype)


per_sample_sq_norms_op.register_torch_dispatch(FunctionalTensorMode, _triton_decomposition(
    "per_sample_sq_norms",
    lambda a, g, *_: a.device.type == "cuda" and per_sample_norms_backend(a, g) == "triton"))


# --------------------------------------------------------------------------------------------------
# Plain helpers (not ops): noise generation and the global norm
# --------------------------------------------------------------------------------------------------
def gaussian_noise(numel: int, *, key: Sequence[int], step: int, offset: int = 0, stream: int = STREAM_UPDATE,
                   device: torch.device | str = "cpu") -> Tensor:
    """Counter-mode standard normal float64 noise (``pyunlearn.ops.rng.gaussian_noise``, bit-identical on every
    backend), compiled where the extension is live (C++ on CPU, CUDA on GPU), else the reference."""
    from .rng import _check_counter, check_key, gaussian_noise as reference_noise

    key = check_key(key)
    _check_counter(step, stream)
    device = torch.device(device)
    if numel < 0 or offset < 0:
        raise ValueError(f"gaussian_noise: numel and offset must be >= 0, got numel={numel}, offset={offset}")
    backend = select_backend("gaussian_noise", device, has_triton=False)
    if backend == "cpp":
        return _cpp().gaussian_noise(int(numel), key, int(step), int(offset), int(stream))
    if backend == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cpp().cuda_gaussian_noise(int(numel), key, int(step), int(offset), int(stream), index)
    return reference_noise(numel, key=key, step=step, offset=offset, stream=stream, device=device)


def fingerprint(tensors: Sequence[Tensor], fp_key: Sequence[int]) -> Tensor:
    """float64 ``[keyed projection, sum of squares]`` of the tensors together (see
    ``pyunlearn.ops.reference.fingerprint``); the step ops return the same values for their passes."""
    tensors = list(tensors)
    fp_key = [int(k) for k in fp_key]
    if not tensors or not _fp32(tensors) or any(t.device != tensors[0].device for t in tensors):
        return _ref.fingerprint(tensors, fp_key)
    backend = select_backend("fingerprint", tensors[0].device)
    if backend == "triton":
        return _run_triton("fingerprint", tensors[0].device, tensors, fp_key=fp_key)
    if backend in ("cpp", "cuda"):
        return _compiled(backend, "fingerprint")(_contiguous(tensors), fp_key)
    return _ref.fingerprint(tensors, fp_key)


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all tensors together (float32 accumulation, float64 if any input is float64)."""
    tensors = list(tensors)
    if not tensors or not _fp32(tensors) or any(t.device != tensors[0].device for t in tensors):
        return _ref.global_norm(tensors)
    backend = select_backend("global_norm", tensors[0].device, has_triton=False)
    if backend in ("cpp", "cuda"):
        return _compiled(backend, "global_norm")(_contiguous(tensors))
    return _ref.global_norm(tensors)
