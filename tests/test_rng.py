"""Counter-based noise: Philox4x32-10 known answers, the C++ generator against the reference, and the
properties the certified optimisers rely on (reproducible, split-independent, standard normal)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyunlearn.ops as ops
from pyunlearn.ops import rng
from pyunlearn.ops._extension import load

_C = load()
needs_cpp = pytest.mark.skipif(_C is None, reason="pyunlearn._C is not built")

U32 = 2**32 - 1
# Random123 known-answer vectors for philox4x32-10: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _reference_philox(counter, key):
    out = rng.philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    return tuple(int(v) for v in out)


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_philox_known_answers(counter, key, expected):
    assert _reference_philox(counter, key) == expected


@needs_cpp
@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_cpp_philox_known_answers(counter, key, expected):
    assert tuple(_C.philox(*counter, *key)) == expected


@needs_cpp
@given(counter=st.tuples(*[st.integers(0, U32)] * 4), key=st.tuples(st.integers(0, U32), st.integers(0, U32)))
def test_cpp_philox_matches_reference(counter, key):
    assert tuple(_C.philox(*counter, *key)) == _reference_philox(counter, key)


@needs_cpp
def test_cpp_philox_rejects_words_outside_uint32():
    with pytest.raises(RuntimeError, match="philox"):
        _C.philox(2**32, 0, 0, 0, 0, 0)


# ------------------------------------------------------------------------------------------------ noise
seeds = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1]))


@needs_cpp
@given(numel=st.integers(0, 2100), seed=seeds, step=st.integers(0, U32), offset=st.integers(0, 2**40),
       stream=st.sampled_from([rng.STREAM_UPDATE, rng.STREAM_INIT, U32]))
def test_cpp_noise_matches_reference(numel, seed, step, offset, stream):
    ref = rng.gaussian_noise(numel, seed=seed, step=step, offset=offset, stream=stream)
    out = _C.gaussian_noise(numel, seed, step, offset, stream)
    assert out.dtype == torch.float32 and out.shape == (numel,)
    # Same integers; float32 log/cos/sin differ from the reference's (Sleef) by last-place rounding only.
    torch.testing.assert_close(out, ref, rtol=4e-6, atol=1e-6)


def test_public_noise_dispatches_and_matches_reference():
    ref = rng.gaussian_noise(1001, seed=7, step=3, offset=5)
    torch.testing.assert_close(ops.gaussian_noise(1001, seed=7, step=3, offset=5), ref, rtol=4e-6, atol=1e-6)


@needs_cpp
@given(cuts=st.lists(st.integers(0, 700), min_size=1, max_size=4), seed=seeds, offset=st.integers(0, 1000))
def test_cpp_noise_does_not_depend_on_the_split(cuts, seed, offset):
    sizes = sorted(cuts)
    total = sizes[-1]
    whole = _C.gaussian_noise(total, seed, 1, offset, 0)
    pieces, start = [], 0
    for end in sizes:
        pieces.append(_C.gaussian_noise(end - start, seed, 1, offset + start, 0))
        start = end
    assert torch.equal(torch.cat(pieces), whole)


@needs_cpp
def test_cpp_noise_is_bit_identical_across_thread_counts():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C.gaussian_noise(100_003, 11, 2, 3, 0)
        torch.set_num_threads(max(2, threads))
        many = _C.gaussian_noise(100_003, 11, 2, 3, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("generator", ["reference", "cpp"])
def test_noise_is_standard_normal(generator):
    if generator == "cpp" and _C is None:
        pytest.skip("pyunlearn._C is not built")
    n = 200_000
    z = (rng.gaussian_noise(n, seed=2024, step=1) if generator == "reference"
         else _C.gaussian_noise(n, 2024, 1, 0, 0)).double()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1.0) < 5 * (2 / n) ** 0.5
    # Tails of a standard normal: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027.
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.003
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 0.0008
    # The four lanes of a Philox output are uncorrelated.
    lanes = z.view(-1, 4)
    corr = torch.corrcoef(lanes.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 0.02


def test_noise_changes_with_seed_step_stream_and_offset():
    base = ops.gaussian_noise(64, seed=1, step=1, offset=0, stream=0)
    for other in (dict(seed=2, step=1, offset=0, stream=0), dict(seed=1, step=2, offset=0, stream=0),
                  dict(seed=1, step=1, offset=0, stream=1), dict(seed=1 + 2**32, step=1, offset=0, stream=0),
                  dict(seed=1, step=1, offset=64, stream=0)):
        assert not torch.equal(ops.gaussian_noise(64, **other), base), other
    assert torch.equal(ops.gaussian_noise(64, seed=1, step=1, offset=0, stream=0), base)


@pytest.mark.parametrize("bad", [dict(seed=-1, step=0), dict(seed=2**63, step=0), dict(seed=0, step=-1),
                                 dict(seed=0, step=2**32)])
def test_noise_rejects_out_of_range_seed_and_step(bad):
    with pytest.raises(ValueError, match="seed|step"):
        ops.gaussian_noise(4, **bad)
    with pytest.raises(ValueError, match="seed|step"):
        rng.gaussian_noise(4, **bad)
