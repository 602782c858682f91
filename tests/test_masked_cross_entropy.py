"""pyunlearn::masked_cross_entropy on every live backend against the PyTorch reference, plus the
torch.library registration (opcheck, autograd, torch.compile) and the backend dispatch."""
from __future__ import annotations

import importlib
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import pyunlearn.ops as ops
from backends import BACKENDS, device_of, examples, forced, to_backend, traced_graph
from pyunlearn.ops import _extension, _registry
from pyunlearn.ops import reference as ref


def _make(seed: int, b: int, k: int, n: int, *, mask: str, weighted: bool, layout: str,
          dtype: torch.dtype = torch.float32, scale: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "permuted":  # (B, N, K) memory, viewed as (B, K, N): stride 1 along K
        logits = (torch.randn(b, n, k, generator=g) * scale).to(dtype).permute(0, 2, 1)
    elif layout == "strided":  # every other pixel of a wider tensor
        logits = (torch.randn(b, k, 2 * n, generator=g) * scale).to(dtype)[:, :, ::2]
    else:
        logits = (torch.randn(b, k, n, generator=g) * scale).to(dtype)
    target = torch.randint(0, max(k, 2), (b, n), generator=g)
    if mask == "empty":
        m = torch.zeros(b, n, dtype=torch.bool)
    elif mask == "full":
        m = torch.ones(b, n, dtype=torch.bool)
    else:
        m = torch.rand(b, n, generator=g) < 0.6
        m[0] = False  # one sample with an empty mask
    weight = torch.randn(b, generator=g) * 2 if weighted else None  # negative weights included
    return logits, target, m, weight


def _call(backend: str, *args):
    """The op on ``backend``'s device; results back on the CPU."""
    with forced(backend):
        loss, grad = ops.masked_cross_entropy_fwd_bwd(*to_backend(backend, args))
    return loss.cpu(), grad.cpu()


# ------------------------------------------------------------------------------------------ float32
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_float32(backend):
    @examples(backend)
    @given(seed=st.integers(0, 2**31), b=st.integers(1, 3), k=st.sampled_from([1, 2, 3, 7]),
           n=st.integers(1, 700), mask=st.sampled_from(["random", "empty", "full"]), weighted=st.booleans(),
           layout=st.sampled_from(["contiguous", "permuted", "strided"]))
    def check(seed, b, k, n, mask, weighted, layout):
        logits, target, m, weight = _make(seed, b, k, n, mask=mask, weighted=weighted, layout=layout)
        loss, grad = _call(backend, logits, target, m, weight)
        ref_loss, ref_grad = ref.masked_cross_entropy_fwd_bwd(logits, target, m, weight)
        assert loss.dtype == torch.float32 and loss.shape == (b,)
        assert grad.dtype == torch.float32 and grad.shape == (b, k, n) and grad.is_contiguous()
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=2e-6, atol=1e-7)
        # Pixels outside the mask (and samples with an empty mask) get an exact zero gradient.
        assert (grad.masked_select(~m[:, None, :].expand(b, k, n)) == 0).all()
        assert (loss[m.sum(dim=1) == 0] == 0).all()

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_reference(backend):
    logits, target, m, weight = _make(3, 2, 4, 333, mask="random", weighted=True, layout="contiguous",
                                      dtype=torch.float64)
    loss, grad = _call(backend, logits, target, m, weight)
    ref_loss, ref_grad = ref.masked_cross_entropy_fwd_bwd(logits, target, m, weight)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_do_not_show_stale_memory(backend):
    # Fill, free and re-request buffers of the output sizes (the CPU allocator hands recently freed
    # blocks back), so elements a kernel forgot to write would show up as NaN.
    b, k, n = 2, 3, 257
    logits, target, m, weight = _make(5, b, k, n, mask="random", weighted=True, layout="contiguous")
    device = device_of(backend)
    for _ in range(3):
        torch.full((b, k, n), float("nan"), device=device), torch.full((b,), float("nan"), device=device)
        loss, grad = _call(backend, logits, target, m, weight)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref_loss, ref_grad = ref.masked_cross_entropy_fwd_bwd(logits, target, m, weight)
        torch.testing.assert_close(grad, ref_grad, rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- bf16 / fp16
def _torch_native(logits: torch.Tensor, target, m, weight):
    """What PyTorch itself computes in the logits dtype: F.cross_entropy / BCE-with-logits + autograd."""
    x = logits.detach().clone().requires_grad_(True)
    if x.shape[1] == 1:
        pixel = F.binary_cross_entropy_with_logits(x[:, 0], target.to(x.dtype), reduction="none")
    else:
        pixel = F.cross_entropy(x, target, reduction="none")
    scale = (m.to(x.dtype) / m.sum(dim=1).clamp_min(1).to(x.dtype)[:, None])
    if weight is not None:
        scale = scale * weight.to(x.dtype)[:, None]
    loss = (pixel * scale).sum(dim=1)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_error_is_at_most_twice_pytorchs(backend, dtype, k):
    logits, target, m, weight = _make(11 + k, 3, k, 401, mask="random", weighted=True, layout="contiguous",
                                      dtype=dtype, scale=3.0)
    exact_loss, exact_grad = ref.masked_cross_entropy_fwd_bwd(logits.double(), target, m, weight.double())
    loss, grad = _call(backend, logits, target, m, weight)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch_loss, torch_grad = _torch_native(logits, target, m, weight)
    ours_loss_err = (loss.double() - exact_loss).abs().max().item()
    ours_grad_err = (grad.double() - exact_grad).abs().max().item()
    torch_loss_err = (torch_loss.double() - exact_loss).abs().max().item()
    torch_grad_err = (torch_grad.double() - exact_grad).abs().max().item()
    # Tolerance: at most ~2x the error of PyTorch's own computation in this dtype (vs a float64 oracle).
    assert ours_grad_err <= 2.0 * torch_grad_err + 1e-12, (ours_grad_err, torch_grad_err)
    assert ours_loss_err <= 2.0 * torch_loss_err + 1e-6, (ours_loss_err, torch_loss_err)


# ---------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_zero_pixels(backend):
    for shape in [(0, 3, 5), (2, 3, 0)]:
        b, k, n = shape
        logits = torch.randn(shape)
        loss, grad = _call(backend, logits, torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n, dtype=torch.bool),
                           None)
        assert loss.shape == (b,) and grad.shape == shape
        assert (loss == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_dtypes(backend):
    logits, target, m, weight = _make(2, 2, 3, 129, mask="random", weighted=False, layout="contiguous")
    expected = ref.masked_cross_entropy_fwd_bwd(logits, target, m, weight)
    for dtype in (torch.int32, torch.uint8, torch.int16):
        loss, grad = _call(backend, logits, target.to(dtype), m, weight)
        torch.testing.assert_close(loss, expected[0], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(grad, expected[1], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("triton", "cuda")])
def test_gpu_kernels_give_nan_loss_for_out_of_range_targets(backend):
    logits, target, m, _ = _make(8, 3, 4, 50, mask="full", weighted=False, layout="contiguous")
    target[1, 7] = 4  # sample 1: one target == K
    target[2, 3] = -1
    m[2, 3] = False  # sample 2: a bad target on a masked-out pixel counts too
    loss, _ = _call(backend, logits, target, m, None)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and torch.isnan(loss[2])
    torch.testing.assert_close(loss[0], ref.masked_cross_entropy_fwd_bwd(logits[:1], target[:1], m[:1])[0][0],
                               rtol=2e-6, atol=2e-6)


@pytest.mark.skipif(not ops.backends()["cpp"], reason="pyunlearn._C is not built")
def test_cpp_rejects_out_of_range_targets():
    logits = torch.randn(1, 3, 9)
    target = torch.zeros(1, 9, dtype=torch.long)
    target[0, 4] = 3
    with forced("cpp"), pytest.raises(IndexError, match="outside"):
        ops.masked_cross_entropy_fwd_bwd(logits, target, torch.ones(1, 9, dtype=torch.bool))


@pytest.mark.skipif(not ops.backends()["cpp"], reason="pyunlearn._C is not built")
def test_cpp_is_bit_identical_across_thread_counts():
    logits, target, m, weight = _make(9, 3, 4, 5001, mask="random", weighted=True, layout="contiguous")
    threads = torch.get_num_threads()
    try:
        with forced("cpp"):
            torch.set_num_threads(1)
            one = ops.masked_cross_entropy_fwd_bwd(logits, target, m, weight)
            torch.set_num_threads(max(2, threads))
            many = ops.masked_cross_entropy_fwd_bwd(logits, target, m, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("bad,error", [
    (dict(logits=torch.randn(2, 3)), ValueError),
    (dict(logits=torch.randn(2, 3, 5).int()), TypeError),
    (dict(target=torch.zeros(2, 4, dtype=torch.long)), ValueError),
    (dict(target=torch.zeros(2, 5)), TypeError),
    (dict(mask=torch.ones(2, 5)), TypeError),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError),
    (dict(weight=torch.ones(3)), ValueError),
    (dict(weight=torch.ones(2, dtype=torch.long)), TypeError),
])
def test_validation_errors(bad, error):
    args = dict(logits=torch.randn(2, 3, 5), target=torch.zeros(2, 5, dtype=torch.long),
                mask=torch.ones(2, 5, dtype=torch.bool), weight=None)
    args.update(bad)
    with pytest.raises(error):
        ops.masked_cross_entropy_fwd_bwd(**args)


# ------------------------------------------------------------------- autograd, opcheck, compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_matches_autograd_through_the_reference(backend):
    logits, target, m, weight = _make(4, 2, 3, 77, mask="random", weighted=True, layout="contiguous")
    v = torch.tensor([0.7, -1.3])
    x = to_backend(backend, logits).clone().requires_grad_(True)
    with forced(backend):
        loss = ops.masked_cross_entropy(x, *to_backend(backend, (target, m, weight)))
    (got,) = torch.autograd.grad(loss, x, to_backend(backend, v))
    got = got.cpu()
    x_ref = logits.clone().double().requires_grad_(True)
    logp = torch.log_softmax(x_ref, dim=1)
    pixel = -logp.gather(1, target[:, None])[:, 0]
    scale = m.double() / m.sum(dim=1).clamp_min(1).double()[:, None] * weight.double()[:, None]
    (expected,) = torch.autograd.grad((pixel * scale).sum(dim=1), x_ref, v.double())
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-7)


def _opcheck_samples(backend: str):
    g = torch.Generator().manual_seed(0)
    samples = []
    for k, weighted, dtype in [(3, True, torch.float32), (1, False, torch.float32), (2, False, torch.float64)]:
        logits = torch.randn(2, k, 11, generator=g, dtype=dtype)
        target = torch.randint(0, max(k, 2), (2, 11), generator=g)
        mask = torch.rand(2, 11, generator=g) < 0.5
        weight = torch.randn(2, generator=g, dtype=dtype) if weighted else None
        logits, target, mask, weight = to_backend(backend, (logits, target, mask, weight))
        samples.append((logits, target, mask, weight))
        samples.append((logits.clone().requires_grad_(True), target, mask, weight))
    return samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    with forced(backend):
        for args in _opcheck_samples(backend):
            torch.library.opcheck(ops.masked_cross_entropy_op, args)


@pytest.mark.parametrize("compile_backend", ["recording", "aot_eager"])
def test_torch_compile_traces_the_op(compile_backend):
    torch._dynamo.reset()
    traced: list[str] = []

    def recording(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def fn(x, t, m):
        return (ops.masked_cross_entropy(torch.tanh(x) * 3, t, m) ** 2).sum()

    logits, target, m, _ = _make(6, 2, 4, 65, mask="random", weighted=False, layout="contiguous")
    compiled = torch.compile(fn, backend=recording if compile_backend == "recording" else compile_backend,
                             fullgraph=False)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    out_c = compiled(x1, target, m)
    out_e = fn(x2, target, m)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)
    if compile_backend == "recording":  # the op is in the captured graph (no graph break around it)
        assert any("pyunlearn.masked_cross_entropy" in target for target in traced), traced
        assert any("tanh" in target for target in traced), traced


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_compiler_sees_the_triton_kernels_when_triton_runs_the_op():
    # With Triton selected for CUDA tensors, AOTAutograd (torch.compile) replaces the op by the Triton
    # kernels themselves (torch.library.triton_op + wrap_triton); with another backend it stays one
    # opaque op.
    graph = traced_graph("masked_cross_entropy", "triton")
    assert graph.count("triton_kernel_wrapper_functional(") == 2, graph
    assert "torch.ops.pyunlearn.masked_cross_entropy.default" not in graph, graph
    graph = traced_graph("masked_cross_entropy", "reference")
    assert "torch.ops.pyunlearn.masked_cross_entropy.default" in graph, graph
    assert "triton_kernel_wrapper" not in graph, graph


# ------------------------------------------------------------------------------------ dispatch
def test_backends_report():
    live = ops.backends()
    assert set(live) == {"reference", "cpp", "cuda", "triton", "triton_interpreter"}
    assert live["reference"] is True and all(isinstance(v, bool) for v in live.values())
    assert live["cuda"] is (live["cuda"] and torch.cuda.is_available())


def test_automatic_dispatch_on_cpu():
    with forced(None):
        expected = "cpp" if ops.backends()["cpp"] else "reference"
        assert ops.select_backend("masked_cross_entropy", torch.device("cpu")) == expected


def test_automatic_dispatch_on_cuda_prefers_the_cuda_kernels_then_triton(monkeypatch):
    cuda = torch.device("cuda")
    with forced(None):
        monkeypatch.setattr(_registry, "_cuda_available", lambda: True)
        assert ops.select_backend("masked_cross_entropy", cuda) == "cuda"
        monkeypatch.setattr(_registry, "_cuda_available", lambda: False)
        monkeypatch.setattr(_registry, "_triton_available", lambda: True)
        monkeypatch.setattr(_registry, "_triton_interpreting", lambda: False)
        assert ops.select_backend("masked_cross_entropy", cuda) == "triton"
        assert ops.select_backend("add_noise_", cuda, has_triton=False) == "reference"
        monkeypatch.setattr(_registry, "_triton_available", lambda: False)
        assert ops.select_backend("masked_cross_entropy", cuda) == "reference"


def test_forced_backend_errors(monkeypatch):
    cpu = torch.device("cpu")
    with forced("cuda"), pytest.raises(RuntimeError, match="cuda"):
        ops.select_backend("masked_cross_entropy", cpu)
    with forced("nonsense"), pytest.raises(ValueError, match="PYUNLEARN_BACKEND"):
        ops.select_backend("masked_cross_entropy", cpu)
    monkeypatch.setattr(_registry, "_cpp", lambda: None)
    with forced("cpp"), pytest.raises(RuntimeError, match="cpp"):
        ops.masked_cross_entropy_fwd_bwd(torch.randn(1, 2, 3), torch.zeros(1, 3, dtype=torch.long),
                                         torch.ones(1, 3, dtype=torch.bool))
    with forced(None):  # automatic dispatch falls back to the reference
        assert ops.select_backend("masked_cross_entropy", cpu) == "reference"
        loss, _ = ops.masked_cross_entropy_fwd_bwd(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long),
                                                   torch.ones(1, 3, dtype=torch.bool))
        torch.testing.assert_close(loss, torch.tensor([0.6931472]))


def test_forced_triton_without_interpreter_or_package_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with forced("triton"), pytest.raises(RuntimeError, match="[Tt]riton"):
            ops.select_backend("masked_cross_entropy", torch.device("cpu"))
    monkeypatch.setattr(_registry, "_triton_package", lambda: None)
    with forced("triton"), pytest.raises(RuntimeError, match="[Tt]riton"):
        ops.select_backend("masked_cross_entropy", torch.device("cpu"))


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_reason", None)
    monkeypatch.setattr(_extension, "_try_import", lambda: (None, "built for torch 0.0"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.load() is None
        assert _extension.load() is None
        assert ops.backends()["cpp"] is False
    assert len([w for w in caught if "torch 0.0" in str(w.message)]) == 1
    assert _extension.unavailable_reason() == "built for torch 0.0"


def test_stale_extension_is_refused(monkeypatch):
    class Stale:
        ABI_VERSION = _extension.ABI_VERSION + 1
        TORCH_VERSION = _extension._torch_major_minor()

    monkeypatch.setattr(importlib, "import_module", lambda name: Stale)
    module, reason = _extension._try_import()
    assert module is None and "ABI version" in reason
    Stale.ABI_VERSION = _extension.ABI_VERSION
    Stale.TORCH_VERSION = "0.1"
    module, reason = _extension._try_import()
    assert module is None and "built for torch 0.1" in reason
