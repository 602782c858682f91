"""Mixed precision (bf16/fp16 autocast) and torch.compile with the certified optimizers and the masked loss.

* Autocast: the forward runs in bf16/fp16, the loss accumulates in float32, the parameters and their
  gradients stay float32, and the clip / noise / update arithmetic of ``GradientClipping`` and
  ``ModelClipping`` is float32 (checked against the DESIGN formulas in float64 at float32 tolerance,
  far below the bf16/fp16 rounding an update in low precision would show).
* torch.compile (``aot_eager``: cheap, exercises the fake kernels and the autograd formula of the
  ``pyunlearn::*`` custom ops): the loss and its backward for the reference and the fused C++ backend;
  a compiled forward + loss with an eager ``opt.step()`` (the recommended pattern); and a compiled
  function that calls ``opt.step()`` itself. ``CertifiedOptimizer.step`` is excluded from tracing
  (``torch.compiler.disable``): the call is a graph break and runs eagerly, because Dynamo (torch 2.13)
  silently drops attribute writes on ``torch.optim.Optimizer`` subclasses that precede a graph break in
  the same frame (``step_count += 1`` was lost: the next step reused the previous step's noise and the
  certificate was refused). The multi-step tests below catch that.
"""
from __future__ import annotations

import math

import pytest
import torch

from pyunlearn import ops
from pyunlearn.certify import CertificateError
from pyunlearn.losses import masked_cross_entropy
from pyunlearn.models import EncoderDecoder
from pyunlearn.ops.rng import STREAM_UPDATE, gaussian_noise, key_from_seed
from pyunlearn.optim import GradientClipping, ModelClipping

B, H, W = 3, 6, 6  # even H, W: the encoder pools by 2
STEPS = 3
#: A noise scale with a moderate epsilon for both operators (a tiny sigma gives an epsilon in the hundreds,
#: for which the sampler's share of delta passes its 10% cap and the certificate is refused).
SIGMA = 0.5
GC_KW = dict(lr=0.2, c0=0.8, c1=0.05, weight_decay=0.1, delta=1e-5, steps=STEPS, seed=5)  # c1 small: clipped
MC_KW = dict(lr=0.2, c2=0.5, c0=0.8, weight_decay=0.1, delta=1e-5, steps=STEPS, seed=5)  # c2 < c0: projected
OPTIMIZERS = {"gradient_clipping": (GradientClipping, GC_KW), "model_clipping": (ModelClipping, MC_KW)}


def tiny_model() -> EncoderDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return EncoderDecoder(width=4, num_classes=2).freeze_encoder()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    images = torch.rand(B, 3, H, W, generator=gen)
    target = torch.randint(0, 2, (B, H, W), generator=gen)
    mask = torch.rand(B, H, W, generator=gen) < 0.7
    return images, target, mask


def make(name: str, sigma: float) -> tuple[EncoderDecoder, torch.optim.Optimizer]:
    cls, kw = OPTIMIZERS[name]
    model = tiny_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, cls(named, **kw, sigma=sigma)


def params64(opt) -> list[torch.Tensor]:
    return [p.detach().double().clone() for p in opt.params]


def expected_update(name: str, x: list[torch.Tensor], g: list[torch.Tensor], sigma: float, step: int):
    """The DESIGN update in float64 from the float32 parameters and gradients, plus the step's noise (the
    operator's ChaCha20 key from the run's seed)."""
    cls, kw = OPTIMIZERS[name]
    lr, wd = kw["lr"], kw["weight_decay"]
    if name == "gradient_clipping":
        norm = math.sqrt(sum(float(t.square().sum()) for t in g))
        factor = min(1.0, kw["c1"] / norm)
        new = [xi - lr * (factor * gi + wd * xi) for xi, gi in zip(x, g)]
    else:
        y = [xi - lr * (gi + wd * xi) for xi, gi in zip(x, g)]
        norm = math.sqrt(sum(float(t.square().sum()) for t in y))
        factor = min(1.0, kw["c2"] / norm)
        new = [yi * factor for yi in y]
    noise = sigma * gaussian_noise(sum(t.numel() for t in x), key=key_from_seed(kw["seed"], cls.operator), step=step,
                                   stream=STREAM_UPDATE)
    chunks = noise.double().split([t.numel() for t in x])
    return [n + c.view_as(n) for n, c in zip(new, chunks)], factor


# ------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("sigma", [0.0, SIGMA])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_autocast_training_with_fp32_update_arithmetic(name, amp_dtype, sigma):
    model, opt = make(name, sigma)
    factors = []
    for step in range(STEPS):
        images, target, mask = batch(step)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp_dtype):
            logits = model(images)
            loss = masked_cross_entropy(logits, target, mask)
        assert logits.dtype == amp_dtype and loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in opt.params)
        x, g = params64(opt), [p.grad.double() for p in opt.params]
        expected, factor = expected_update(name, x, g, opt.hyper["sigma"], step)
        factors.append(factor)
        opt.step()
        for p, e in zip(opt.params, expected):
            assert p.dtype == torch.float32
            # float32 tolerance: a bf16/fp16 update (relative error ~4e-3 / 5e-4) would fail this
            torch.testing.assert_close(p.detach().double(), e, rtol=2e-6, atol=2e-7)
    assert min(factors) < 1.0  # the clip (GC) / the projection (MC) was active
    if sigma == 0.0:  # no noise, no guarantee: the run completed but no certificate is issued
        with pytest.raises(CertificateError, match="no finite epsilon"):
            opt.certificate()
    else:
        cert = opt.certificate()
        assert math.isfinite(cert.epsilon) and cert.epsilon > 0


@pytest.mark.parametrize("k", [1, 3])
def test_fp16_logits_give_float32_loss_close_to_fp64(k):
    gen = torch.Generator().manual_seed(k)
    logits64 = 4 * torch.randn(2, k, 5, 7, generator=gen, dtype=torch.float64)
    target = torch.randint(0, max(k, 2), (2, 5, 7), generator=gen)
    mask = torch.rand(2, 5, 7, generator=gen) < 0.6
    half = logits64.to(torch.float16).requires_grad_(True)
    loss = masked_cross_entropy(half, target, mask, reduction="none")
    assert loss.dtype == torch.float32
    (g16,) = torch.autograd.grad(loss.sum(), half)
    assert g16.dtype == torch.float16
    # Against float64 on the same (fp16-rounded) inputs: only float32 accumulation error remains.
    same_in = half.detach().double().requires_grad_(True)
    ref = masked_cross_entropy(same_in, target, mask, reduction="none")
    (g64,) = torch.autograd.grad(ref.sum(), same_in)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g16.double(), g64, rtol=1e-3, atol=1e-6)  # fp16 output rounding
    # Against float64 on the unrounded logits: within the fp16 input rounding (|dL/dz| <= 1).
    torch.testing.assert_close(loss.double(), masked_cross_entropy(logits64, target, mask, reduction="none"),
                               rtol=0, atol=float(torch.finfo(torch.float16).eps) * 4)


# --------------------------------------------------------------------------------------------- compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_compiled_loss_and_backward_equal_eager(backend, monkeypatch, fresh_dynamo):
    if not ops.backends()[backend]:
        pytest.skip(f"the {backend} backend is not available")
    monkeypatch.setenv("PYUNLEARN_BACKEND", backend)
    assert ops.select_backend("masked_cross_entropy", torch.device("cpu")) == backend

    def loss_and_grad(logits, target, mask, weight):
        loss = masked_cross_entropy(torch.tanh(logits) * 3, target, mask, weight=weight)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    gen = torch.Generator().manual_seed(3)
    compiled = torch.compile(loss_and_grad, backend="aot_eager", fullgraph=False)
    for k in (1, 3):  # binary (sigmoid) and softmax paths
        logits = torch.randn(2, k, 5, 3, generator=gen).requires_grad_(True)
        target = torch.randint(0, max(k, 2), (2, 5, 3), generator=gen)
        mask = torch.rand(2, 5, 3, generator=gen) < 0.5
        weight = torch.tensor([1.0, -0.5])
        loss_c, grad_c = compiled(logits, target, mask, weight)
        loss_e, grad_e = loss_and_grad(logits, target, mask, weight)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-7)


def run(name: str, sigma: float, mode: str) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """STEPS training steps: ``eager``; ``compiled-forward`` (compiled forward + loss, eager backward and
    ``opt.step()``); or ``compiled-step`` (one compiled function doing zero_grad, forward, loss,
    backward and ``opt.step()``)."""
    model, opt = make(name, sigma)

    def forward_loss(images, target, mask):
        return masked_cross_entropy(model(images), target, mask)

    def train_step(images, target, mask):
        opt.zero_grad(set_to_none=True)
        forward_loss(images, target, mask).backward()
        opt.step()

    if mode == "compiled-forward":
        compiled = torch.compile(forward_loss, backend="aot_eager", fullgraph=False)

        def step_fn(*args):
            opt.zero_grad(set_to_none=True)
            compiled(*args).backward()
            opt.step()  # eager: the certified step is a handful of fused kernel calls
    elif mode == "compiled-step":
        step_fn = torch.compile(train_step, backend="aot_eager", fullgraph=False)
    else:
        step_fn = train_step
    for step in range(STEPS):
        step_fn(*batch(step))
    return [p.detach().clone() for p in opt.params], opt


@pytest.mark.parametrize("sigma", [0.0, SIGMA], ids=["sigma0", f"sigma{SIGMA}"])
@pytest.mark.parametrize("mode", ["compiled-forward", "compiled-step"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_training_matches_eager(name, mode, sigma, fresh_dynamo):
    eager_params, eager_opt = run(name, sigma, "eager")
    params, opt = run(name, sigma, mode)
    assert opt.step_count == eager_opt.step_count == STEPS  # the counter that keys the noise
    for p, e in zip(params, eager_params):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    if sigma > 0:
        assert opt.certificate().to_dict() == eager_opt.certificate().to_dict()


def test_compiled_dpsgd_step_advances_its_noise_counter(fresh_dynamo):
    """DPSGD.step inside a compiled function: same parameters and step count as eager (fresh noise each step)."""
    from pyunlearn.optim import DPSGD
    from pyunlearn.per_sample import PerSampleGradients

    def train(compiled: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
        opt = DPSGD(model.parameters(), lr=0.1, max_grad_norm=0.5, expected_batch_size=4, noise_multiplier=1.0,
                    seed=5)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(4, 3, 6, 6, generator=gen), torch.rand(4, 1, 6, 6, generator=gen)
        with PerSampleGradients(model, loss_reduction="sum") as psg:
            def step():
                torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
                psg.clipped_sum_(0.5)
                opt.step()
                psg.clear()
            fn = torch.compile(step, backend="aot_eager") if compiled else step
            for _ in range(STEPS):
                fn()
        return [p.detach().clone() for p in model.parameters()], opt

    eager_params, eager_opt = train(False)
    params, opt = train(True)
    assert opt.steps_taken == eager_opt.steps_taken == STEPS
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
