"""Tests of pyunlearn.data.sampling: Poisson batches as the DP-SGD accountant assumes them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import Dataset, TensorDataset

from pyunlearn.data import PoissonBatchSampler, poisson_loader


def sizes_and_matrix(n: int, q: float, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    sampler = PoissonBatchSampler(n, q, steps, seed=seed)
    matrix = np.zeros((steps, n), dtype=bool)
    for t, batch in enumerate(sampler):
        matrix[t, batch] = True
    return matrix.sum(axis=1), matrix


def test_batch_sizes_are_binomial():
    n, q, steps = 200, 0.1, 3000
    sizes, _ = sizes_and_matrix(n, q, steps, seed=3)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    # variance of the sample variance ~ 2 var^2 / steps (near-normal counts)
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / steps)
    # chi-square goodness of fit against Binomial(n, q), tails merged so every bin expects >= 5
    lo, hi = int(stats.binom.ppf(0.005, n, q)), int(stats.binom.ppf(0.995, n, q))
    observed = [np.sum(sizes <= lo)] + [np.sum(sizes == k) for k in range(lo + 1, hi)] + [np.sum(sizes >= hi)]
    expected = [stats.binom.cdf(lo, n, q)] + [stats.binom.pmf(k, n, q) for k in range(lo + 1, hi)] \
        + [stats.binom.sf(hi - 1, n, q)]
    expected = np.asarray(expected) * steps
    assert expected.min() >= 5
    assert stats.chisquare(observed, expected * (sum(observed) / expected.sum())).pvalue > 1e-3


def test_samples_are_included_independently_with_rate_q():
    n, q, steps = 64, 0.3, 2000
    _, m = sizes_and_matrix(n, q, steps, seed=11)
    per_sample = m.mean(axis=0)  # each ~ Bin(steps, q) / steps
    assert np.abs(per_sample - q).max() < 5 * math.sqrt(q * (1 - q) / steps)
    # neighbours in one ChaCha block, across blocks, and across consecutive steps are uncorrelated
    centred = m - q
    for a, b in [(0, 1), (6, 7), (7, 8), (3, 40)]:
        assert abs(float((centred[:, a] * centred[:, b]).mean())) < 5 * q * (1 - q) / math.sqrt(steps)
    lag = float((centred[1:] * centred[:-1]).mean())
    assert abs(lag) < 5 * q * (1 - q) / math.sqrt(steps * n)


def test_empty_batches_occur_and_are_yielded():
    sampler = PoissonBatchSampler(5, 0.05, 200, seed=0)
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 200 == len(sampler)
    empty = sizes.count(0)
    expected = 200 * 0.95**5
    assert abs(empty - expected) < 5 * math.sqrt(expected)


def test_reproducible_from_a_seed_secret_otherwise():
    a = list(PoissonBatchSampler(50, 0.2, 30, seed=5))
    assert a == list(PoissonBatchSampler(50, 0.2, 30, seed=5))
    assert a != list(PoissonBatchSampler(50, 0.2, 30, seed=6))
    s1, s2 = PoissonBatchSampler(50, 0.2, 30), PoissonBatchSampler(50, 0.2, 30)
    assert not s1.seeded and s1.seed is None
    assert list(s1) != list(s2)  # fresh OS keys (equal with probability ~2^-1000)
    assert list(s1) == list(s1)  # but a fixed key: iterating again gives the same batches


def test_batch_of_a_step_resume_and_shards():
    sampler = PoissonBatchSampler(300, 0.1, 150, seed=2)
    batches = list(sampler)
    assert all(sampler.batch(t).tolist() == batches[t] for t in (0, 1, 63, 64, 65, 149))
    assert list(PoissonBatchSampler(300, 0.1, 150, seed=2, start_step=70)) == batches[70:]
    shards = [list(PoissonBatchSampler(300, 0.1, 150, seed=2, num_replicas=3, rank=r)) for r in range(3)]
    for t in (0, 99):
        merged = sorted(i for shard in shards for i in shard[t])
        assert merged == batches[t]
        assert all(i % 3 == r for r in range(3) for i in shards[r][t])


def test_rate_never_exceeds_q_and_q_one_takes_everyone():
    for q in (0.1, 1 / 3, 0.5, 1e-9, 1.0 - 2**-53):
        s = PoissonBatchSampler(10, q, 1, seed=0)
        assert s.inclusion_probability <= q and q - s.inclusion_probability <= 2**-64
    assert list(PoissonBatchSampler(7, 1.0, 3, seed=0)) == [list(range(7))] * 3
    assert PoissonBatchSampler(600, 32 / 600, 10, seed=0).expected_batch_size == pytest.approx(32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), "num_samples"), (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"), (dict(sample_rate=math.nan), "sample_rate"),
    (dict(steps=0), "steps"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(start_step=11), "start_step"), (dict(rank=2, num_replicas=2), "rank"),
])
def test_bad_arguments(kwargs, match):
    base = dict(num_samples=10, sample_rate=0.1, steps=10, seed=0)
    base.update(kwargs)
    n, q, t = base.pop("num_samples"), base.pop("sample_rate"), base.pop("steps")
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(n, q, t, **base)


def test_loader_gives_empty_batches_with_zero_rows():
    ds = TensorDataset(torch.randn(6, 3, 4, 4), torch.arange(6))
    loader = poisson_loader(ds, 0.05, 40, seed=1)
    assert len(loader) == 40
    seen_empty = seen_full = False
    for x, y in loader:
        assert x.shape[1:] == (3, 4, 4) and x.shape[0] == y.shape[0] and y.dtype == torch.int64
        seen_empty |= x.shape[0] == 0
        seen_full |= x.shape[0] > 0
    assert seen_empty and seen_full
    batches = list(loader.batch_sampler)
    for (x, y), idx in zip(poisson_loader(ds, 0.05, 40, seed=1), batches):
        assert y.tolist() == idx and torch.equal(x, ds.tensors[0][idx])


class DictData(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": torch.full((2, 2), float(i)), "label": i}


def test_loader_empty_batch_keeps_the_structure():
    loader = poisson_loader(DictData(), 1e-6, 2, seed=0)
    for batch in loader:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (0, 2, 2) and batch["label"].shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        poisson_loader(DictData(), 0.5, 2, batch_size=2)
