"""Per-sample weight-gradient norms of a convolution (op 3, ``pyunlearn.ops.per_sample_sq_norms``) on
every live backend against a float64 oracle, and the fused path inside ``PerSampleGradients``."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pyunlearn.ops as ops
from backends import BACKENDS, device_of, examples, forced, to_backend, traced_graph
from pyunlearn.ops import reference as ref
from pyunlearn.per_sample import PerSampleGradients


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _norms(backend: str, a, g, **conv) -> torch.Tensor:
    with forced(backend):
        return ops.per_sample_sq_norms(*to_backend(backend, (a, g)), **conv).cpu()


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 9))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 9))
    return dict(b=draw(st.integers(1, 3)), c=draw(st.integers(1, 5)), p=draw(st.integers(1, 6)), h=h, w=w,
                conv=dict(kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw)),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
                seed=draw(st.integers(0, 2**31)))


def _inputs(case: dict, dtype=torch.float32):
    g = torch.Generator().manual_seed(case["seed"])
    conv = case["conv"]
    oh = _out(case["h"], conv["kernel_size"][0], conv["stride"][0], conv["padding"][0], conv["dilation"][0])
    ow = _out(case["w"], conv["kernel_size"][1], conv["stride"][1], conv["padding"][1], conv["dilation"][1])
    b, c, p = case["b"], case["c"], case["p"]
    if case["layout"] == "sliced":  # every other channel and column of a larger tensor
        a = torch.randn(b, 2 * c, case["h"], 2 * case["w"], generator=g)[:, ::2, :, ::2]
    else:
        a = torch.randn(b, c, case["h"], case["w"], generator=g)
        if case["layout"] == "channels_last":
            a = a.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(b, p, oh, ow, generator=g).transpose(2, 3).contiguous().transpose(2, 3)
    return a.to(dtype), grad.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_oracle(backend):
    @examples(backend)
    @given(case=conv_cases())
    def check(case):
        a, g = _inputs(case)
        got = _norms(backend, a, g, **case["conv"])
        expected = ref.per_sample_sq_norms(a.double(), g.double(), **case["conv"])
        assert got.dtype == torch.float32 and got.shape == (case["b"],)
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-6 * float(expected.max()))

    check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs_accumulate_in_float32(backend, dtype):
    case = dict(b=2, c=4, p=5, h=7, w=6, layout="contiguous", seed=3,
                conv=dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)))
    a, g = _inputs(case, dtype)
    got = _norms(backend, a, g, **case["conv"])
    expected = ref.per_sample_sq_norms(a.double(), g.double(), **case["conv"])  # the same low-precision values
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_do_not_show_stale_memory(backend):
    case = dict(b=3, c=40, p=35, h=5, w=4, layout="contiguous", seed=4,  # several tiles along P and D
                conv=dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1)))
    a, g = _inputs(case)
    for _ in range(2):
        del_me = torch.full((3, 64), float("nan"), device=device_of(backend))
        del del_me
        got = _norms(backend, a, g, **case["conv"])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref.per_sample_sq_norms(a, g, **case["conv"]), rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_use_the_reference(backend):
    a, g = to_backend(backend, (torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)))
    conv = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    with forced(backend):
        got = ops.per_sample_sq_norms(a, g, **conv)
    assert got.dtype == torch.float64 and torch.equal(got, ref.per_sample_sq_norms(a, g, **conv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(5)
    a, grad = to_backend(backend, (torch.randn(2, 3, 6, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)))
    with forced(backend):
        torch.library.opcheck(ops.per_sample_sq_norms_op, (a, grad, [3, 1], [2, 1], [1, 0], [1, 1]))


@pytest.mark.parametrize("change,error,match", [
    (dict(a=torch.zeros(2, 3, 5)), ValueError, "a must be a 4-d floating-point tensor"),
    (dict(g=torch.zeros(2, 4, 5, 5, dtype=torch.long)), ValueError, "g must be a 4-d floating-point tensor"),
    (dict(g=torch.zeros(3, 4, 5, 5)), ValueError, "a has 2 samples but g has 3"),
    (dict(g=torch.zeros(2, 4, 7, 7)), ValueError, r"maps a's \(5, 5\) positions to \(5, 5\), but g has \(7, 7\)"),
    (dict(kernel_size=(3,)), ValueError, "kernel_size must be two ints >= 1"),
    (dict(stride=(0, 1)), ValueError, "stride must be two ints >= 1"),
    (dict(padding=3), TypeError, "padding must be a pair of ints"),
    (dict(a="x"), TypeError, "a must be a torch.Tensor"),
])
def test_validation_errors(change, error, match):
    args = dict(a=torch.zeros(2, 3, 5, 5), g=torch.zeros(2, 4, 5, 5), kernel_size=(3, 3), stride=(1, 1),
                padding=(1, 1), dilation=(1, 1))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.per_sample_sq_norms(args.pop("a"), args.pop("g"), **args)


# ------------------------------------------------------------------------- inside PerSampleGradients
class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(6, 5, 3, padding=2, dilation=2)
        self.linear = nn.Linear(5, 4)

    def forward(self, x):
        y = torch.tanh(self.conv(x))  # (B, 6, 5, 5)
        y = torch.tanh(self.conv1d(y.flatten(2)))  # (B, 5, 25)
        return self.linear(y.transpose(1, 2))  # (B, 25, 4): 25 tokens


def _per_sample_run(backend: str, model: nn.Module, x: torch.Tensor, chunk_bytes: int = 1):
    # chunk_bytes=1: per-sample gradients never fit one chunk, so GPU backends take the fused kernels.
    model = model.to(device_of(backend))
    with forced(backend), torch.backends.cudnn.flags(enabled=True, allow_tf32=False), \
            PerSampleGradients(model, norm_method="per_sample", chunk_bytes=chunk_bytes) as psg:
        model(to_backend(backend, x)).square().sum(dim=(1, 2)).sum().backward()
        norms = psg.per_sample_norms()
        psg.clipped_sum_(max_grad_norm=0.5)
    return norms.cpu(), {name: p.grad.cpu() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_per_sample_gradients_use_the_fused_norms_on_gpu_backends(backend, monkeypatch):
    torch.manual_seed(0)
    model, x = _Decoder(), torch.randn(3, 3, 9, 9)
    calls = []
    fused = ops.per_sample_sq_norms
    monkeypatch.setattr(ops, "per_sample_sq_norms", lambda *a, **k: calls.append(1) or fused(*a, **k))
    expected_norms, expected_grads = _per_sample_run("reference", _copy_of(model), x)
    assert not calls  # the reference path forms per-sample gradients instead
    norms, grads = _per_sample_run(backend, _copy_of(model), x)
    assert len(calls) == (3 if backend in ("triton", "cuda") else 0)  # conv, conv1d and linear weights
    torch.testing.assert_close(norms, expected_norms, rtol=2e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=2e-5, atol=1e-6)
    calls.clear()
    _per_sample_run(backend, _copy_of(model), x, chunk_bytes=2**26)  # small layers: per-sample gradients kept
    assert not calls


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpp"])
def test_forced_backends_never_break_per_sample_gradients(backend):
    # On CPU tensors a forced GPU backend (or one without this kernel) means the module's own path, not an error.
    torch.manual_seed(1)
    model, x = _Decoder(), torch.randn(2, 3, 9, 9)
    with forced(backend), PerSampleGradients(model, norm_method="per_sample", chunk_bytes=1) as psg:
        model(x).square().sum(dim=(1, 2)).sum().backward()
        norms = psg.per_sample_norms()
    expected, _ = _per_sample_run("reference", _copy_of(model), x)
    torch.testing.assert_close(norms, expected, rtol=2e-5, atol=0)


def _copy_of(model: nn.Module) -> nn.Module:
    clone = _Decoder()
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_compiler_sees_the_triton_kernel():
    graph = traced_graph("per_sample_sq_norms", "triton")
    assert graph.count("triton_kernel_wrapper_functional(") == 1, graph
    assert "unfold" not in graph and "bmm" not in graph, graph
    graph = traced_graph("per_sample_sq_norms", "reference")
    assert "torch.ops.pyunlearn.per_sample_sq_norms.default" in graph and "triton_kernel" not in graph, graph
