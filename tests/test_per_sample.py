"""Tests of pyunlearn.per_sample against a one-sample-at-a-time autograd loop."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pyunlearn.per_sample as ps
from pyunlearn.per_sample import PerSampleGradients, clip_factor, clipped_sum_info, wrap

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------- helpers
class Tokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class Shared(nn.Module):
    """Weight sharing: one Linear applied to both halves of the tokens."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        t = x.shape[1] // 2
        return torch.cat([self.lin(x[:, :t]), torch.tanh(self.lin(x[:, t:]))], dim=1)


def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A non-quadratic per-sample loss, (B,)."""
    d = (out - target).flatten(1)
    return (torch.log1p(d.square()) + 0.3 * out.flatten(1)).sum(1)


def loop_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients, one sample at a time (the oracle). Run before wrapping."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = per_sample_loss(model(x[i:i + 1]), target[i:i + 1]).sum()
        rows.append(torch.autograd.grad(loss, [p for _, p in named], allow_unused=True))
    out = {}
    for k, (n, p) in enumerate(named):
        out[n] = torch.stack([r[k] if r[k] is not None else torch.zeros_like(p) for r in rows])
    return out


def loop_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))


def run_wrapped(model, x, target, **kwargs):
    psg = PerSampleGradients(model, **kwargs)
    loss = per_sample_loss(model(x), target)
    if kwargs.get("loss_reduction") == "mean":
        loss.mean().backward()
    else:
        loss.sum().backward()
    return psg


def assert_matches_loop(model, x, target, *, max_grad_norm=None, **kwargs):
    expected = loop_grads(model, x, target)
    psg = run_wrapped(model, x, target, **kwargs)
    try:
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is None, f"backward wrote p.grad of {n}"
        got = psg.grad_samples()
        assert set(got) == set(expected)
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], **TOL, msg=n)
        norms = loop_norms(expected)
        torch.testing.assert_close(psg.per_sample_norms(), norms, **TOL)
        c = max_grad_norm if max_grad_norm is not None else float(norms.median()) + 1e-3
        psg.clipped_sum_(c)
        factor = torch.clamp(c / (norms + 1e-6), max=1.0)
        for n, p in model.named_parameters():
            if p.requires_grad:
                want = torch.einsum("b,b...->...", factor, expected[n])
                torch.testing.assert_close(p.grad, want, **TOL, msg=n)
                assert clipped_sum_info(p.grad) == (c, n)
            else:
                assert p.grad is None
    finally:
        psg.remove()


# --------------------------------------------------------------------------------- random decoders
@st.composite
def decoders(draw):
    seed = draw(st.integers(0, 2**16))
    batch = draw(st.sampled_from([1, 2, 3, 5]))
    size = draw(st.integers(7, 9))  # conv output >= 2x2 (instance norm needs > 1 pixel)
    cin = draw(st.sampled_from([1, 2, 3]))
    c1 = draw(st.sampled_from([2, 4, 6]))
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([0, 1, "same"] if stride == 1 else [0, 1]))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    groups = draw(st.sampled_from([1, 2])) if cin == 2 else 1
    norm = draw(st.sampled_from(["none", "group", "instance"]))
    second = draw(st.sampled_from(["conv", "transpose"]))
    head = draw(st.sampled_from(["flatten", "tokens", "shared"]))
    frozen = draw(st.sampled_from(["none", "first", "first_bias", "first_weight", "norm"]))
    method = draw(st.sampled_from(["auto", "ghost", "per_sample"]))
    torch.manual_seed(seed)
    layers = [nn.Conv2d(cin, c1, k, stride=stride, padding=padding,
                        dilation=dilation, groups=groups, padding_mode=padding_mode),
              nn.ReLU(inplace=True)]
    if norm == "group":
        layers.append(nn.GroupNorm(2, c1))
    elif norm == "instance":
        layers.append(nn.InstanceNorm2d(c1, affine=True))
    if second == "conv":
        layers.append(nn.Conv2d(c1, 3, 2, stride=1, padding=1, bias=False))
    else:
        layers.append(nn.ConvTranspose2d(c1, 3, 3, stride=2, padding=1, output_padding=1))
    layers.append(nn.Tanh())
    if head == "flatten":
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)]
    elif head == "tokens":
        layers += [nn.AdaptiveAvgPool2d(2), Tokens(), nn.LayerNorm(3), nn.Linear(3, 2)]
    else:
        layers += [nn.AdaptiveAvgPool2d(2), Tokens(), Shared(3)]
    model = nn.Sequential(*layers).to(DT)
    if frozen == "first":
        model[0].requires_grad_(False)
    elif frozen == "first_bias":
        model[0].bias.requires_grad_(False)
    elif frozen == "first_weight":
        model[0].weight.requires_grad_(False)
    elif frozen == "norm" and norm != "none":
        model[2].requires_grad_(False)
    x = torch.randn(batch, cin, size, size, dtype=DT)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, x, target, method


@given(decoders())
def test_random_decoders_match_loop(case):
    model, x, target, method = case
    assert_matches_loop(model, x, target, norm_method=method)


@given(st.integers(0, 2**16), st.sampled_from([1, 2, 4, 7]), st.sampled_from([1, 3, 16]),
       st.sampled_from(["auto", "ghost", "per_sample"]))
def test_linear_with_token_dims(seed, batch, tokens, method):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    x = torch.randn(batch, tokens, 5, dtype=DT)
    target = torch.randn(batch, tokens, 3, dtype=DT)
    assert_matches_loop(model, x, target, norm_method=method)


@pytest.mark.parametrize("method", ["ghost", "per_sample"])
def test_extra_leading_dims_and_rmsnorm(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 2)).to(DT)
    x = torch.randn(3, 2, 5, 4, dtype=DT)
    target = torch.randn(3, 2, 5, 2, dtype=DT)
    assert_matches_loop(model, x, target, norm_method=method)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (3, 3, 11)),
    (lambda: nn.Conv1d(4, 4, 3, groups=2, padding="same", padding_mode="replicate"), (2, 4, 7)),
    (lambda: nn.Conv3d(2, 3, (2, 3, 1), stride=(1, 2, 1), padding=1), (2, 2, 4, 5, 3)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2, dilation=2, padding=2), (3, 4, 9, 7)),
    (lambda: nn.Conv2d(3, 4, 4, padding="same", dilation=1), (2, 3, 6, 5)),
    (lambda: nn.Conv2d(9, 3, 1), (3, 9, 4, 5)),  # pointwise: a Linear over pixels
    (lambda: nn.Conv2d(3, 8, 1, padding=1, stride=2), (2, 3, 5, 4)),
    (lambda: nn.Conv2d(16, 8, 3, padding=1), (2, 16, 6, 6)),  # channels already a multiple of the block
    (lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1, output_padding=2), (2, 3, 5)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2), (3, 4, 3, 4)),
    (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 3, 2)),
    (lambda: nn.GroupNorm(3, 6), (3, 6, 4, 5)),
    (lambda: nn.InstanceNorm1d(3, affine=True), (4, 3, 7)),
    (lambda: nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 2)),
    (lambda: nn.LayerNorm((3, 4)), (3, 2, 3, 4)),
])
@pytest.mark.parametrize("method", ["auto", "ghost", "per_sample"])
def test_layer_variants(layer, shape, method):
    torch.manual_seed(1)
    model = nn.Sequential(layer(), nn.Tanh()).to(DT)
    with torch.no_grad():  # non-trivial affine parameters for the norms
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(*shape, dtype=DT)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    assert_matches_loop(model, x, target, norm_method=method)


def test_conv_transpose_with_output_size():
    torch.manual_seed(2)

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=(2 * x.shape[2], 2 * x.shape[3]))

    model = Up().to(DT)
    x = torch.randn(3, 3, 4, 5, dtype=DT)
    target = torch.randn(3, 2, 8, 10, dtype=DT)
    assert_matches_loop(model, x, target)


def test_instance_norm_with_running_stats_in_eval_mode():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True, track_running_stats=True)).to(DT)
    with torch.no_grad():
        model(torch.randn(8, 2, 6, 6, dtype=DT))  # fill the running statistics
    model.eval()
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    target = torch.randn(3, 3, 4, 4, dtype=DT)
    assert_matches_loop(model, x, target)


def test_float32_chunked_and_mean_reduction():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 3, stride=2), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(5, 3, 9, 9)
    target = torch.randn(5, 3)
    expected = loop_grads(model, x, target)
    psg = run_wrapped(model, x, target, loss_reduction="mean", chunk_bytes=1, norm_method="per_sample")
    got = psg.grad_samples()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(psg.per_sample_norms(), loop_norms(expected), rtol=1e-4, atol=1e-5)
    psg.remove()


# ------------------------------------------------------------------------------- ghost vs einsum
def _spy(monkeypatch, target, attr):
    calls = []
    original = getattr(target, attr)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attr, staticmethod(spy) if isinstance(target, type) else spy)
    return calls


@pytest.mark.parametrize("size, ghost_expected", [(2, True), (9, False)])
def test_auto_uses_ghost_norm_only_when_cheaper(monkeypatch, size, ghost_expected):
    # Conv2d 8 -> 8, 3x3: p*d = 8 * 72 = 576; T = size^2: 2*16 <= 576 (ghost), 2*81^2 > 576 (per-sample).
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).to(DT)
    x = torch.randn(3, 8, size, size, dtype=DT)
    target = torch.randn(3, 8, size, size, dtype=DT)
    ghost_calls = _spy(monkeypatch, ps._ConvRule, "_ghost_sq")
    per_sample_calls = _spy(monkeypatch, ps.conv, "_conv_per_sample")
    expected = loop_norms(loop_grads(model, x, target))
    psg = run_wrapped(model, x, target)
    torch.testing.assert_close(psg.per_sample_norms(), expected, **TOL)
    assert bool(ghost_calls) == ghost_expected
    assert bool(per_sample_calls) != ghost_expected
    psg.remove()


def test_ghost_and_per_sample_norms_agree_for_linear_tokens():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 7)).to(DT)
    x = torch.randn(4, 5, 6, dtype=DT)
    target = torch.randn(4, 5, 7, dtype=DT)
    expected = loop_norms(loop_grads(model, x, target))
    results = {}
    for method in ("ghost", "per_sample", "auto"):  # 2 * 25 <= 42 is false: auto is per-sample here
        psg = run_wrapped(model, x, target, norm_method=method)
        results[method] = psg.per_sample_norms()
        psg.remove()
        torch.testing.assert_close(results[method], expected, **TOL)


def test_clipped_sum_is_book_kept_without_per_sample_weights(monkeypatch):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)).to(DT)
    x = torch.randn(3, 2, 5, 5, dtype=DT)
    target = torch.randn(3, 2, dtype=DT)
    expected = loop_grads(model, x, target)
    psg = run_wrapped(model, x, target, norm_method="per_sample")
    norms = psg.per_sample_norms()  # cached: the clipped sum must not form per-sample weights again

    def forbidden(*args, **kwargs):
        raise AssertionError("per-sample weight gradients formed inside clipped_sum_")

    monkeypatch.setattr(ps.conv, "_conv_per_sample", forbidden)
    monkeypatch.setattr(torch, "bmm", forbidden)
    psg.clipped_sum_(0.5)
    factor = clip_factor(norms, 0.5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", factor, expected[n]), **TOL)
    psg.remove()


# ----------------------------------------------------------------------------- structure and state
def test_frozen_encoder_with_batchnorm_in_eval_mode():
    torch.manual_seed(8)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).to(DT)
    encoder.requires_grad_(False).eval()
    decoder = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 1, 1)).to(DT)
    model = nn.Sequential(encoder, decoder)
    x = torch.randn(3, 3, 6, 6, dtype=DT)
    target = torch.randn(3, 1, 6, 6, dtype=DT)
    assert_matches_loop(model, x, target)
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=r"'1'.*BatchNorm2d.*mixes the samples"):
        PerSampleGradients(model)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.gain

    with pytest.raises(TypeError, match=r"'head\.scale'.*Scale.*\['gain'\].*no per-sample gradient rule"):
        PerSampleGradients(nn.ModuleDict({"head": nn.ModuleDict({"scale": Scale()})}))

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match=r"'0'.*MyConv.*subclass of Conv2d"):
        PerSampleGradients(nn.Sequential(MyConv(1, 1, 1)))
    with pytest.raises(TypeError, match=r"<root module>.*Scale"):
        PerSampleGradients(Scale())


def test_layer_unfrozen_after_wrapping_is_rejected():
    bn = nn.BatchNorm1d(3).requires_grad_(False).eval()
    model = nn.Sequential(nn.Linear(2, 3), bn)
    psg = PerSampleGradients(model)
    model(torch.randn(4, 2)).sum().backward()
    bn.requires_grad_(True)
    with pytest.raises(TypeError, match=r"'1'.*BatchNorm1d"):
        psg.per_sample_norms()
    psg.remove()


def test_batchnorm_with_batch_statistics_raises_at_forward():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3).requires_grad_(False))
    with PerSampleGradients(model):
        with pytest.raises(ValueError, match=r"'1'.*BatchNorm1d.*batch statistics"):
            model(torch.randn(4, 2))
        with torch.no_grad():
            model(torch.randn(4, 2))  # no gradients, no per-sample mixing concerns
    assert all(p.requires_grad for p in model[0].parameters())


def test_requires_grad_restored_and_hooks_removed():
    model = nn.Sequential(nn.Linear(3, 2))
    with PerSampleGradients(model) as psg:
        out = model(torch.randn(2, 3))
        assert out.requires_grad
        assert all(p.requires_grad for p in model.parameters())
        psg.clear()  # discard that pass (else the next forward pass is refused: two passes, one backward)
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 4))  # forward raises: the parameters must still be restored
        assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_hooks and not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    model(torch.randn(2, 3)).sum().backward()  # plain autograd again after remove()
    assert model[0].weight.grad is not None
    del psg


def test_new_pass_replaces_records_and_accumulate_adds():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(DT)
    x1, x2 = torch.randn(3, 2, 6, 6, dtype=DT), torch.randn(2, 2, 6, 6, dtype=DT)
    t1, t2 = torch.randn(3, 2, dtype=DT), torch.randn(2, 2, dtype=DT)
    g1, g2 = loop_grads(model, x1, t1), loop_grads(model, x2, t2)
    c = 0.7
    with PerSampleGradients(model) as psg:
        per_sample_loss(model(x1), t1).sum().backward()
        psg.clipped_sum_(c)
        per_sample_loss(model(x2), t2).sum().backward()  # a new pass: batch size 2 now
        assert psg.per_sample_norms().shape == (2,)
        with pytest.raises(ValueError, match="max_grad_norm=0.5"):
            psg.clipped_sum_(0.5, accumulate=True)
        psg.clipped_sum_(c, accumulate=True)
        with pytest.raises(RuntimeError, match="already in a clipped sum"):
            psg.clipped_sum_(c, accumulate=True)  # the same samples twice
    for n, p in model.named_parameters():
        want = sum(torch.einsum("b,b...->...", clip_factor(loop_norms(g), c), g[n]) for g in (g1, g2))
        torch.testing.assert_close(p.grad, want, **TOL)


def test_mean_reduction_equals_sum_reduction():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    x, target = torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    results = []
    for reduction in ("sum", "mean"):
        psg = run_wrapped(model, x, target, loss_reduction=reduction)
        results.append(psg.grad_samples())
        psg.remove()
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], **TOL)


def test_layer_without_gradient_gets_zeros():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            self.b(x)  # computed but unused by the loss
            return self.a(x)

    model = TwoHeads().to(DT)
    x = torch.randn(4, 3, dtype=DT)
    with PerSampleGradients(model) as psg:
        model(x).square().sum().backward()
        psg.clipped_sum_(1.0)
        assert torch.equal(psg.grad_samples()["b.weight"], torch.zeros(4, 2, 3, dtype=DT))
    assert torch.equal(model.b.weight.grad, torch.zeros(2, 3, dtype=DT))
    assert clipped_sum_info(model.b.weight.grad) == (1.0, "b.weight")


def test_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        PerSampleGradients(torch.zeros(3))
    with pytest.raises(ValueError, match="loss_reduction"):
        PerSampleGradients(model, loss_reduction="none")
    with pytest.raises(ValueError, match="norm_method"):
        PerSampleGradients(model, norm_method="fast")
    with pytest.raises(ValueError, match="chunk_bytes"):
        PerSampleGradients(model, chunk_bytes=0)
    with wrap(model) as psg:
        with pytest.raises(ValueError, match="no output gradients"):
            psg.per_sample_norms()
        with pytest.raises(ValueError, match="leading batch dimension"):
            model(torch.randn(3))
        model(torch.randn(2, 3)).sum().backward()
        for bad in (0, -1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="max_grad_norm"):
                psg.clipped_sum_(bad)
        psg.clipped_sum_(1.0)
        model[0].weight.grad.mul_(2)  # modified after clipping: no longer certified as a clipped sum
        assert clipped_sum_info(model[0].weight.grad) is None


# ------------------------------------------------------------------- passes, records and empty batches
def small_net() -> nn.Module:
    torch.manual_seed(12)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def test_two_forward_passes_before_one_backward_are_refused():
    model = small_net()
    x1, x2 = torch.randn(3, 3, dtype=DT), torch.randn(3, 3, dtype=DT)
    with PerSampleGradients(model) as psg:
        out1 = model(x1)
        with pytest.raises(RuntimeError, match="second forward pass started before the backward"):
            model(x2)
        with torch.no_grad():
            model(x2)  # an auxiliary forward without gradients is fine
        out1.sum().backward()
        psg.clipped_sum_(1.0)
        model(x2).sum().backward()  # after clipped_sum_: a new pass
        assert psg.per_sample_norms().shape == (3,)
        psg.clear()
        model(x1)
        psg.clear()  # discards the unfinished pass
        model(x2).sum().backward()


def test_a_backward_not_summed_is_not_dropped_by_the_next_forward():
    model = small_net()
    x1, x2 = torch.randn(3, 3, dtype=DT), torch.randn(2, 3, dtype=DT)
    with PerSampleGradients(model) as psg:
        model(x1).sum().backward()
        with pytest.raises(RuntimeError, match="not used by clipped_sum_"):
            model(x2)
        psg.clipped_sum_(1.0)  # the first pass is still there
        assert psg.per_sample_norms().shape == (3,)
        with pytest.raises(RuntimeError, match="already in a clipped sum"):
            psg.clipped_sum_(1.0)


def test_second_backward_on_a_summed_pass_is_refused():
    model = small_net()
    with PerSampleGradients(model) as psg:
        out = model(torch.randn(3, 3, dtype=DT)).sum()
        out.backward(retain_graph=True)
        psg.clipped_sum_(1.0)
        with pytest.raises(RuntimeError, match="already in a clipped sum"):
            out.backward()


def test_clipped_sum_is_fingerprinted_and_records_its_writer():
    model = small_net()
    with PerSampleGradients(model) as psg:
        model(torch.randn(4, 3, dtype=DT)).sum().backward()
        psg.clipped_sum_(0.5)
        record, name, problem = ps.inspect_clipped_sum(model[0].weight.grad)
        assert problem is None and name == "0.weight" and record.samples == 4 and not record.used
        assert record.max_grad_norm == 0.5 and set(record.covered.values()) == {"0.weight", "0.bias", "2.weight",
                                                                               "2.bias"}
        assert all(ps.inspect_clipped_sum(p.grad)[0] is record for p in model.parameters())
        model[2].bias.grad.data.mul_(100)  # bypasses the version counter
        assert clipped_sum_info(model[2].bias.grad) is not None  # the version alone does not see it
        assert "values changed" in ps.inspect_clipped_sum(model[2].bias.grad)[2]
        model[2].weight.grad.add_(1.0)
        assert "in place" in ps.inspect_clipped_sum(model[2].weight.grad)[2]
        assert ps.inspect_clipped_sum(model[0].weight.grad.clone()) == (None, "", None)


def test_empty_batches():
    model = small_net()
    x = torch.randn(5, 3, dtype=DT)
    with PerSampleGradients(model) as psg:
        norms = psg.empty_batch_(1.0)  # no forward pass at all
        assert norms.shape == (0,)
        record = ps.inspect_clipped_sum(model[0].weight.grad)[0]
        assert record.samples == 0 and all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
        model(x[:0]).sum().backward()  # a forward/backward on zero rows also gives zero sums
        assert psg.per_sample_norms().shape == (0,) and psg.grad_samples()["0.weight"].shape == (0, 4, 3)
        assert psg.clipped_sum_(1.0).shape == (0,)
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
        model(x).sum()  # a pass recorded, not summed: empty_batch_ would drop it
        with pytest.raises(RuntimeError, match="not summed"):
            psg.empty_batch_(1.0)


def test_accumulate_refuses_foreign_or_used_sums():
    model = small_net()
    x = torch.randn(3, 3, dtype=DT)
    with PerSampleGradients(model[0]) as first, PerSampleGradients(model[2]) as second:
        model(x).sum().backward()
        first.clipped_sum_(1.0)
        second.clipped_sum_(1.0)
        assert ps.inspect_clipped_sum(model[0].weight.grad)[0] is not ps.inspect_clipped_sum(model[2].weight.grad)[0]
    with PerSampleGradients(model) as psg:
        model(x).sum().backward()
        with pytest.raises(ValueError, match="another PerSampleGradients"):
            psg.clipped_sum_(1.0, accumulate=True)
        psg.clipped_sum_(1.0)
        ps.inspect_clipped_sum(model[0].weight.grad)[0].used = True  # as DPSGD.step() marks it
        model(x).sum().backward()
        with pytest.raises(ValueError, match="already used by an optimizer step"):
            psg.clipped_sum_(1.0, accumulate=True)


def test_tied_weights_are_refused():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # one parameter, two layers: the per-layer norms would miss the cross term
    with pytest.raises(TypeError, match="tied weights"):
        PerSampleGradients(nn.Sequential(a, b))
    a.weight.requires_grad_(False)
    PerSampleGradients(nn.Sequential(a, b)).remove()  # frozen: fine


# ---------------------------------------------------------------------------------------------- PReLU
def func_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients from torch.func (vmap of grad over the batch). Run before wrapping."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def one(params, xi, ti):
        out = functional_call(model, {**params, **frozen}, (xi.unsqueeze(0),))
        return per_sample_loss(out, ti.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, target)


class TwicePReLU(nn.Module):
    """One PReLU called twice in a forward pass (weight sharing)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.PReLU(c)

    def forward(self, x):
        return self.act(self.conv(self.act(x)))


@pytest.mark.parametrize("shape, channels", [
    ((3, 4, 5, 6), 1), ((3, 4, 5, 6), 4),   # 2-D feature maps: one weight, per-channel weights
    ((4, 3), 3), ((4, 3), 1),                 # (B, C)
    ((2, 2, 3, 4, 3), 2),                     # 3-D volumes
    ((3, 5, 7), 5),                           # (B, C, L)
])
@pytest.mark.parametrize("method", ["auto", "per_sample"])
def test_prelu_matches_torch_func(shape, channels, method):
    torch.manual_seed(13)
    c = shape[1]
    conv = {2: lambda: nn.Linear(c, c), 3: lambda: nn.Conv1d(c, c, 3, padding=1),
            4: lambda: nn.Conv2d(c, c, 3, padding=1), 5: lambda: nn.Conv3d(c, c, 3, padding=1)}[len(shape)]
    model = nn.Sequential(conv(), nn.PReLU(channels), conv(), nn.PReLU(channels, init=0.1)).to(DT)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.PReLU):
                m.weight.add_(0.2 * torch.randn_like(m.weight))  # distinct per-channel slopes
    x = torch.randn(*shape, dtype=DT)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    expected = func_grads(model, x, target)
    assert expected["1.weight"].shape == (shape[0], channels)
    assert float(expected["1.weight"].abs().max()) > 0, "the test must exercise negative inputs"
    loop = loop_grads(model, x, target)
    for n in expected:  # the two oracles agree
        torch.testing.assert_close(expected[n], loop[n], **TOL, msg=n)
    assert_matches_loop(model, x, target, norm_method=method)


def test_prelu_called_twice_and_frozen():
    torch.manual_seed(14)
    model = nn.Sequential(TwicePReLU(3), nn.Tanh()).to(DT)
    x = torch.randn(3, 3, 4, 4, dtype=DT)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    expected = func_grads(model, x, target)
    psg = run_wrapped(model, x, target)
    try:
        got = psg.grad_samples()
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], **TOL, msg=n)
        torch.testing.assert_close(psg.per_sample_norms(), loop_norms(expected), **TOL)
    finally:
        psg.remove()
    model[0].act.requires_grad_(False)  # frozen: skipped, its input still gets gradients through it
    assert_matches_loop(model, x, target)
    assert nn.PReLU in ps.SUPPORTED_LAYERS and nn.PReLU in ps.supported_layers()


def test_rule_registry_refuses_a_type_twice():
    with pytest.raises(ValueError, match="PReLU is already registered"):
        ps.register_rule({nn.PReLU: None})(type("Again", (ps._Rule,), {}))
    assert type(ps._RULES[nn.PReLU]).__name__ == "_PReLURule"
