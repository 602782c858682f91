"""Counter-mode ChaCha20 noise and the C++ step kernels against the reference.

* ChaCha20 (RFC 8439) known answers for the reference and the C++ (vectorised) block function, and their
  keystreams against the ``cryptography`` package's ChaCha20 where it is installed;
* C++ ``gaussian_noise`` bit-identical to ``pyunlearn.ops.rng.gaussian_noise``, independent of the split
  and of the thread count, standard normal;
* ``_C.fingerprint`` against ``reference.fingerprint``; the C++ step kernels, called directly, bit-identical
  to the reference steps, statuses included (a non-finite norm or a wrong fingerprint writes nothing).
"""
from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyunlearn.ops import reference as ref
from pyunlearn.ops import rng
from pyunlearn.ops._extension import load

_C = load()
needs_cpp = pytest.mark.skipif(_C is None, reason="pyunlearn._C is not built")

U32 = 2**32 - 1
words = st.integers(0, U32)
keys = st.one_of(st.lists(words, min_size=8, max_size=8),
                 st.sampled_from([[0] * 8, [U32] * 8, list(range(8))]))
fp_keys = st.lists(words, min_size=2, max_size=2)

# RFC 8439 section 2.3.2: key 00 01 .. 1f, nonce 00:00:00:09 00:00:00:4a 00:00:00:00, block counter 1.
RFC_KEY = rng.key_from_bytes(bytes(range(32)))
RFC_NONCE = (0x09000000, 0x4A000000, 0x00000000)
RFC_COUNTER = 1
RFC_BLOCK = [0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3, 0xC7F4D1C7, 0x0368C033, 0x9AAA2204, 0x4E6CD4C3,
             0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9, 0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2]


def _reference_block(key, counter: int, nonce) -> list[int]:
    out = rng.chacha20_block(key, torch.tensor([counter], dtype=torch.int64), nonce)
    return [int(w) for w in out]


def _key_bytes(key) -> bytes:
    return b"".join(int(w).to_bytes(4, "little") for w in key)


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------ ChaCha20
def test_reference_chacha20_rfc8439_block():
    assert _reference_block(RFC_KEY, RFC_COUNTER, RFC_NONCE) == RFC_BLOCK


@needs_cpp
def test_cpp_chacha20_rfc8439_block():
    assert list(_C.chacha20_block(RFC_KEY, RFC_COUNTER, *RFC_NONCE)) == RFC_BLOCK


@needs_cpp
@given(key=keys, counter=words, nonce=st.tuples(words, words, words))
def test_cpp_chacha20_matches_reference(key, counter, nonce):
    assert list(_C.chacha20_block(key, counter, *nonce)) == _reference_block(key, counter, nonce)


@settings(max_examples=10)
@given(key=keys, counter=st.integers(0, U32 - 40), nonce=st.tuples(words, words, words),
       nblocks=st.integers(1, 20))
def test_keystream_matches_cryptography(key, counter, nonce, nblocks):
    crypto = pytest.importorskip("cryptography.hazmat.primitives.ciphers")
    from cryptography.hazmat.primitives.ciphers import algorithms

    # cryptography's 16-byte ChaCha20 nonce: the initial block counter (LE32), then the three nonce words.
    full_nonce = counter.to_bytes(4, "little") + b"".join(n.to_bytes(4, "little") for n in nonce)
    encryptor = crypto.Cipher(algorithms.ChaCha20(_key_bytes(key), full_nonce), mode=None).encryptor()
    stream = encryptor.update(bytes(64 * nblocks))
    expected = [int.from_bytes(stream[4 * j:4 * j + 4], "little") for j in range(16 * nblocks)]
    counters = torch.arange(counter, counter + nblocks, dtype=torch.int64)
    ref_words = torch.stack(rng.chacha20_block(key, counters, nonce), dim=1).reshape(-1).tolist()
    assert ref_words == expected
    if _C is not None:
        cpp_words = [w for b in range(nblocks) for w in _C.chacha20_block(key, counter + b, *nonce)]
        assert cpp_words == expected


@needs_cpp
@pytest.mark.parametrize("bad", [dict(key=[0] * 7), dict(key=[0] * 7 + [2**32]), dict(key=[-1] + [0] * 7),
                                 dict(counter=2**32), dict(nonce0=-1)])
def test_cpp_chacha20_rejects_bad_words(bad):
    args = dict(key=[0] * 8, counter=0, nonce0=0, nonce1=0, nonce2=0)
    args.update(bad)
    with pytest.raises(RuntimeError, match="chacha20_block"):
        _C.chacha20_block(**args)


# ------------------------------------------------------------------------------------------ noise
@needs_cpp
@given(numel=st.integers(0, 1100), key=keys, step=st.one_of(words, st.sampled_from([0, U32])),
       offset=st.one_of(st.integers(0, 2**40), st.sampled_from([0, 3, 2**34 - 6, 2**34 - 1])),
       stream=st.sampled_from([rng.STREAM_UPDATE, rng.STREAM_INIT, U32]))
def test_cpp_noise_bit_identical_to_reference(numel, key, step, offset, stream):
    expected = rng.gaussian_noise(numel, key=key, step=step, offset=offset, stream=stream)
    out = _C.gaussian_noise(numel, key, step, offset, stream)
    assert out.dtype == torch.float64 and out.shape == (numel,)
    assert torch.equal(out, expected)


@needs_cpp
def test_cpp_noise_bit_identical_across_the_block_counter_carry():
    # Blocks 2^32 - 40 .. 2^32 + 40: the block counter wraps and its high half moves to nonce word 0.
    key = rng.key_from_seed(3)
    offset = 4 * (2**32 - 40)
    assert torch.equal(_C.gaussian_noise(321, key, 7, offset, 0),
                       rng.gaussian_noise(321, key=key, step=7, offset=offset))


@needs_cpp
@given(cuts=st.lists(st.integers(0, 1500), min_size=1, max_size=4), key=keys, offset=st.integers(0, 1000))
def test_cpp_noise_does_not_depend_on_the_split(cuts, key, offset):
    sizes = sorted(cuts)
    whole = _C.gaussian_noise(sizes[-1], key, 1, offset, 0)
    pieces, start = [], 0
    for end in sizes:
        pieces.append(_C.gaussian_noise(end - start, key, 1, offset + start, 0))
        start = end
    assert torch.equal(torch.cat(pieces), whole)


@needs_cpp
def test_cpp_noise_is_bit_identical_across_thread_counts():
    key = rng.key_from_seed(11)
    with _threads(1):
        one = _C.gaussian_noise(100_003, key, 2, 3, 0)
    with _threads(max(2, torch.get_num_threads())):
        many = _C.gaussian_noise(100_003, key, 2, 3, 0)
    assert torch.equal(one, many)


@pytest.mark.parametrize("generator,n", [("reference", 40_000), ("cpp", 400_000)])
def test_noise_is_standard_normal(generator, n):
    # The reference is slow (~1 us a value); the C++ generator, bit-identical to it, checks more values.
    if generator == "cpp" and _C is None:
        pytest.skip("pyunlearn._C is not built")
    key = rng.key_from_seed(2024)
    z = (rng.gaussian_noise(n, key=key, step=1) if generator == "reference"
         else _C.gaussian_noise(n, key, 1, 0, 0))
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    # Every bound is 5 standard errors of the estimate.
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1.0) < 5 * (2 / n) ** 0.5
    assert abs((z**3).mean().item()) < 5 * (15 / n) ** 0.5  # third moment 0 (variance of z^3: 15)
    assert abs((z**4).mean().item() - 3.0) < 5 * (96 / n) ** 0.5  # fourth moment 3 (variance of z^4: 96)
    for threshold, p in ((2.0, 0.0455003), (3.0, 0.0026998)):  # P(|z| > t) of a standard normal
        assert abs((z.abs() > threshold).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert z.abs().max().item() <= rng.Z_MAX
    # The four normals of a block (two Box-Muller pairs) are uncorrelated.
    corr = torch.corrcoef(z.view(-1, 4).T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 5 / (n / 4) ** 0.5


@needs_cpp
def test_cpp_noise_changes_with_key_step_stream_and_offset():
    key = rng.key_from_seed(1)
    base = _C.gaussian_noise(64, key, 1, 0, 0)
    other_key = list(key)
    other_key[7] ^= 1
    for args in ((other_key, 1, 0, 0), (key, 2, 0, 0), (key, 1, 0, 1), (key, 1, 64, 0)):
        assert not torch.equal(_C.gaussian_noise(64, *args), base), args
    assert torch.equal(_C.gaussian_noise(64, key, 1, 0, 0), base)


@needs_cpp
@pytest.mark.parametrize("args", [(4, [0] * 7, 0, 0, 0), (4, [0] * 7 + [2**32], 0, 0, 0), (4, [0] * 8, 2**32, 0, 0),
                                  (4, [0] * 8, -1, 0, 0), (4, [0] * 8, 0, 0, 2**32), (-1, [0] * 8, 0, 0, 0),
                                  (4, [0] * 8, 0, -1, 0)])
def test_cpp_noise_rejects_bad_arguments(args):
    with pytest.raises(RuntimeError, match="gaussian_noise"):
        _C.gaussian_noise(*args)


@pytest.mark.parametrize("bad", [dict(step=-1), dict(step=2**32), dict(stream=2**32), dict(key=[0] * 7),
                                 dict(key=[0] * 7 + [2**32])])
def test_reference_noise_rejects_bad_arguments(bad):
    kw = dict(key=[0] * 8, step=0)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError)):
        rng.gaussian_noise(4, **kw)


# ------------------------------------------------------------------------------------------ steps
SHAPES = st.lists(st.sampled_from([(1,), (7,), (3, 5), (129,), (2, 3, 11), (0,), (1031,), (40, 37)]),
                  min_size=1, max_size=4)


def _tensors(shapes, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def _cpp_norm(tensors):
    return _C.global_norm([t.contiguous() for t in tensors])


def _reference_step(name, params, grads, **kw):
    """The reference step with the C++ norm: the float32 sum of squares of a reduction rounds differently
    from torch's, and the clip factor (hence the parameters) depends on its last bit."""
    with mock.patch.object(ref, "global_norm", _cpp_norm):
        return getattr(ref, name)(params, grads, **kw)


def _cpp_step(name, params, grads, *, clip, lr, wd, sigma, key, step, fp_key, expected_fp=()):
    return getattr(_C, name)(params, grads, lr, clip, wd, sigma, key, step, fp_key, list(expected_fp))


def _ref_kw(name, *, clip, **kw):
    kw["max_grad_norm" if name == "gradient_clipping_step_" else "max_model_norm"] = clip
    return kw


def _assert_fp_close(got, expected):
    assert torch.allclose(got, expected, rtol=ref.FP_RTOL, atol=1e-300), (got, expected)


CLIP_STEPS = ["gradient_clipping_step_", "model_clipping_step_"]


@needs_cpp
@given(shapes=SHAPES, fp_key=fp_keys, data_seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_cpp_fingerprint_matches_reference(shapes, fp_key, data_seed, scale):
    params = _tensors(shapes, data_seed, scale)
    got = _C.fingerprint(params, fp_key)
    assert got.dtype == torch.float64 and got.shape == (2,)
    _assert_fp_close(got, ref.fingerprint(params, fp_key))


@needs_cpp
def test_cpp_fingerprint_weights_are_the_reference_weights():
    # One-hot parameters: the projection is exactly the weight of that global index, whichever tensor holds
    # it and whether it falls in the head, the 16-lane body or the tail of a block.
    fp_key = [0xDEADBEEF, 0x12345678]
    shapes = [(5,), (45,), (3,)]
    weights = ref.fingerprint_weights(53, 0, fp_key).tolist()
    index = 0
    for t, shape in enumerate(shapes):
        for j in range(shape[0]):
            params = [torch.zeros(s) for s in shapes]
            params[t][j] = 1.0
            assert _C.fingerprint(params, fp_key).tolist() == [weights[index], 1.0]
            index += 1


@needs_cpp
@pytest.mark.parametrize("name", CLIP_STEPS)
@given(shapes=SHAPES, key=keys, step=words, fp_key=fp_keys, lr=st.sampled_from([0.0, 0.05, 0.5]),
       wd=st.sampled_from([0.0, 1e-3, 0.3]), clip=st.sampled_from([1e-3, 1.0, 5.0, 1e30]),
       sigma=st.sampled_from([0.0, 0.01, 0.7]), data_seed=st.integers(0, 1000), check_fp=st.booleans())
def test_cpp_clip_steps_bit_identical_to_reference(name, shapes, key, step, fp_key, lr, wd, clip, sigma, data_seed,
                                                   check_fp):
    params, grads = _tensors(shapes, data_seed), _tensors(shapes, data_seed + 1, scale=2.0)
    expected_fp = ref.fingerprint(params, fp_key).tolist() if check_fp else []
    kw = dict(lr=lr, wd=wd, sigma=sigma, key=key, step=step, fp_key=fp_key)
    want = _clone(params)
    expected = _reference_step(name, want, grads, **_ref_kw(name, clip=clip, lr=lr, weight_decay=wd, sigma=sigma,
                                                            key=key, step=step, fp_key=fp_key,
                                                            expected_fp=expected_fp))
    got = _clone(params)
    result = _cpp_step(name, got, grads, clip=clip, expected_fp=expected_fp, **kw)
    assert result.dtype == torch.float64 and result.shape == (6,)
    assert result[0].item() == ref.STATUS_OK == expected[0].item()
    assert result[1].item() == expected[1].item()
    for p, e in zip(got, want):
        assert torch.equal(p, e)
    _assert_fp_close(result[2:4], expected[2:4])
    _assert_fp_close(result[4:6], expected[4:6])
    # The old fingerprint is exactly the standalone one of the old values, the new one of the new values.
    assert result[2:4].tolist() == _C.fingerprint(params, fp_key).tolist()
    assert result[4:6].tolist() == _C.fingerprint(got, fp_key).tolist()
    # The C++ norm is the reference's up to float32 rounding of the reduction.
    norm_of = grads if name == "gradient_clipping_step_" else [p - lr * (g + wd * p) for p, g in zip(params, grads)]
    assert math.isclose(result[1].item(), ref.global_norm(norm_of).item(), rel_tol=1e-5, abs_tol=1e-30)


@needs_cpp
@pytest.mark.parametrize("name", CLIP_STEPS)
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_cpp_clip_step_nonfinite_writes_nothing(name, poison):
    key, fp_key = rng.key_from_seed(4), [7, 9]
    params, grads = _tensors([(3, 5), (129,)], 0), _tensors([(3, 5), (129,)], 1)
    grads[1][17] = float(poison)
    got = _clone(params)
    result = _cpp_step(name, got, grads, clip=1.0, lr=0.1, wd=0.01, sigma=0.5, key=key, step=1, fp_key=fp_key)
    expected = getattr(ref, name)(_clone(params), grads, **_ref_kw(name, clip=1.0, lr=0.1, weight_decay=0.01,
                                                                   sigma=0.5, key=key, step=1, fp_key=fp_key))
    assert result[0].item() == ref.STATUS_NONFINITE == expected[0].item()
    assert not math.isfinite(result[1].item())
    for p, e in zip(got, params):
        assert torch.equal(p, e)
    assert result[2:4].tolist() == result[4:6].tolist() == _C.fingerprint(params, fp_key).tolist()


@needs_cpp
@pytest.mark.parametrize("name", CLIP_STEPS)
@pytest.mark.parametrize("tamper", ["value", "permutation", "nan_expected"])
def test_cpp_clip_step_wrong_fingerprint_writes_nothing(name, tamper):
    key, fp_key = rng.key_from_seed(5), [123, 456]
    params, grads = _tensors([(3, 5), (129,)], 2), _tensors([(3, 5), (129,)], 3)
    expected_fp = ref.fingerprint(params, fp_key).tolist()
    if tamper == "value":
        params[1][3] += 1e-3
    elif tamper == "permutation":  # same sum of squares, different projection
        params[1][[3, 4]] = params[1][[4, 3]]
    else:
        expected_fp = [float("nan"), expected_fp[1]]
    got = _clone(params)
    result = _cpp_step(name, got, grads, clip=1.0, lr=0.1, wd=0.01, sigma=0.5, key=key, step=1, fp_key=fp_key,
                       expected_fp=expected_fp)
    expected = getattr(ref, name)(_clone(params), grads, **_ref_kw(name, clip=1.0, lr=0.1, weight_decay=0.01, sigma=0.5,
                                                                   key=key, step=1, fp_key=fp_key,
                                                                   expected_fp=expected_fp))
    assert result[0].item() == ref.STATUS_TAMPERED == expected[0].item()
    for p, e in zip(got, params):
        assert torch.equal(p, e)
    assert result[2:4].tolist() == result[4:6].tolist()


@needs_cpp
@pytest.mark.parametrize("name", CLIP_STEPS)
def test_cpp_clip_step_accepts_its_own_fingerprint(name):
    # Chained steps: each step's new fingerprint is the next step's expected one, exactly.
    key, fp_key = rng.key_from_seed(6), [1, 2]
    params, grads = _tensors([(40, 37), (7,)], 4), _tensors([(40, 37), (7,)], 5)
    expected_fp = _C.fingerprint(params, fp_key).tolist()
    for step in range(3):
        result = _cpp_step(name, params, grads, clip=1.0, lr=0.1, wd=0.01, sigma=0.1, key=key, step=step,
                           fp_key=fp_key, expected_fp=expected_fp)
        assert result[0].item() == ref.STATUS_OK
        expected_fp = result[4:6].tolist()


@needs_cpp
@pytest.mark.parametrize("name", CLIP_STEPS + ["dpsgd_step_", "add_noise_"])
def test_cpp_steps_bit_identical_across_thread_counts(name):
    key, fp_key = rng.key_from_seed(7), [3, 4]
    shapes = [(300, 301), (5,), (70_001,)]  # > 64K elements: the parallel path
    params, grads = _tensors(shapes, 6), _tensors(shapes, 7)
    outs = []
    for threads in (1, 2):
        got = _clone(params)
        with _threads(threads):
            if name == "dpsgd_step_":
                result = _C.dpsgd_step_(got, grads, 0.1, 1.3, 7.0, 0.01, key, 3)
            elif name == "add_noise_":
                result = _C.add_noise_(got, 0.3, key, 3, rng.STREAM_INIT)
            else:
                result = _cpp_step(name, got, grads, clip=1.0, lr=0.1, wd=0.01, sigma=0.3, key=key, step=3,
                                   fp_key=fp_key)
            fp = _C.fingerprint(got, fp_key)
        outs.append((got, result, fp))
    (p1, r1, f1), (p2, r2, f2) = outs
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert torch.equal(f1, f2)
    if r1 is not None:
        assert torch.equal(r1, r2)


@needs_cpp
@given(shapes=SHAPES, key=keys, step=words, lr=st.sampled_from([0.0, 0.05, 0.5]),
       wd=st.sampled_from([0.0, 1e-3, 0.3]), noise_multiplier=st.sampled_from([0.0, 0.5, 1.1]),
       clip=st.sampled_from([0.1, 1.0]), ebs=st.sampled_from([1.0, 7.0, 64.0]), data_seed=st.integers(0, 1000))
def test_cpp_dpsgd_step_bit_identical_to_reference(shapes, key, step, lr, wd, noise_multiplier, clip, ebs, data_seed):
    params, grads = _tensors(shapes, data_seed), _tensors(shapes, data_seed + 1, scale=3.0)
    want = _clone(params)
    ref.dpsgd_step_(want, grads, lr=lr, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                    expected_batch_size=ebs, weight_decay=wd, key=key, step=step)
    got = _clone(params)
    assert _C.dpsgd_step_(got, grads, lr, noise_multiplier * clip, ebs, wd, key, step) is None
    for p, e in zip(got, want):
        assert torch.equal(p, e)


@needs_cpp
@given(shapes=SHAPES, key=keys, step=words, stream=st.sampled_from([rng.STREAM_UPDATE, rng.STREAM_INIT]),
       sigma=st.sampled_from([0.0, 1e-3, 0.7, 30.0]), data_seed=st.integers(0, 1000))
def test_cpp_add_noise_bit_identical_to_reference(shapes, key, step, stream, sigma, data_seed):
    params = _tensors(shapes, data_seed)
    want = _clone(params)
    ref.add_noise_(want, sigma=sigma, key=key, step=step, stream=stream)
    got = _clone(params)
    _C.add_noise_(got, sigma, key, step, stream)
    for p, e in zip(got, want):
        assert torch.equal(p, e)


@needs_cpp
@pytest.mark.parametrize("bad,match", [(dict(key=[0] * 7), "key"), (dict(key=[0] * 7 + [-1]), "key"),
                                       (dict(fp_key=[1]), "fp_key"), (dict(fp_key=[1, 2**32]), "fp_key"),
                                       (dict(expected_fp=[1.0]), "expected_fp"), (dict(step=2**32), "step")])
@pytest.mark.parametrize("name", CLIP_STEPS)
def test_cpp_clip_steps_reject_bad_arguments(name, bad, match):
    params, grads = _tensors([(4,)], 0), _tensors([(4,)], 1)
    kw = dict(key=[0] * 8, step=0, fp_key=[0, 0], expected_fp=[])
    kw.update(bad)
    before = _clone(params)
    with pytest.raises(RuntimeError, match=match):
        getattr(_C, name)(params, grads, 0.1, 1.0, 0.0, 0.1, kw["key"], kw["step"], kw["fp_key"], kw["expected_fp"])
    assert torch.equal(params[0], before[0])
