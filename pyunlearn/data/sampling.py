"""Poisson sampling for DP-SGD: the batches the subsampled-Gaussian accountant assumes.

The RDP and PLD accountants of :class:`pyunlearn.optim.DPSGD` analyse *Poisson* subsampling: at every
step each sample is included independently with probability ``q`` (``sample_rate``), for a fixed number
of steps. Shuffled fixed-size batches are a different mechanism, and the accountant's epsilon does not
apply to them. :class:`PoissonBatchSampler` draws exactly the assumed batches:

* the batch size of a step is Binomial(n, q), so some batches are **empty**: an empty batch is a
  noise-only step (``PerSampleGradients.empty_batch_`` then ``DPSGD.step()``), counted by the accountant
  like any other step;
* the number of steps is fixed in advance (``steps``), not "until an epoch is over".

Randomness. Sample ``i`` is in the batch of step ``t`` iff ``U < floor(q * 2^64)``, with ``U`` the 64-bit
integer formed by the ChaCha20 (RFC 8439) output words ``2j, 2j+1`` (high word first) of block ``b`` for
``i = 8b + j``, keyed with a 256-bit key, block counter ``b``, nonce ``(b div 2^32, t, SAMPLER_STREAM)``. So
the inclusion probability is ``floor(q * 2^64) / 2^64 <= q`` (never above what the accountant assumes; at
most ``2^-64`` below it), every step and sample independent, and a batch is a pure function of
``(key, t)``: reproducible for a given key, identical on every rank, and computable for any step
(resume at ``start_step``). The key comes from the operating system's entropy (``seed=None``, the default:
secret, as the analysis needs: batch membership is part of what amplification by subsampling hides) or
from ``seed`` (reproducible, NOT secret; tests and reproducibility only). A statistical generator
(``torch.Generator``, Mersenne Twister, Philox) is deliberately not offered: its seed is its whole secret.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..ops import rng

__all__ = ["PoissonBatchSampler", "poisson_loader", "SAMPLER_STREAM"]

#: The nonce's stream word of the sampler's ChaCha20 blocks (its key is its own anyway).
SAMPLER_STREAM = 0x504F4953  # "POIS"
#: Samples per ChaCha20 block (16 words, 2 per sample).
_PER_BLOCK = 8
#: Steps drawn together when iterating (one vectorised ChaCha20 evaluation).
_CHUNK_STEPS = 64


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _threshold(sample_rate: float) -> int:
    """floor(q * 2^64) exactly (q as the binary fraction a float is)."""
    return int(Fraction(sample_rate) * 2**64)


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of Poisson sampling: at each of ``steps`` steps, every index in ``range(num_samples)`` is in
    the batch independently with probability ``sample_rate`` (see the module docstring for the generator).

    Args:
        num_samples: data set size n (>= 1).
        sample_rate: q in (0, 1].
        steps: number of batches (the number of DP-SGD steps the accountant counts).
        seed: ``None`` (default) for a secret key from the operating system (the same on every rank of a
            ``torch.distributed`` job), or an int >= 0 for a reproducible key (NOT secret).
        start_step: first step to yield (resume a run: the batches of steps ``start_step..steps-1``; with a
            secret key a resumed run draws fresh batches, which the analysis allows).
        num_replicas, rank: under ``torch.distributed`` each rank gets the indices ``i`` of the global batch
            with ``i % num_replicas == rank`` (default: one replica), so the ranks together process the
            global Poisson batch; DPSGD's ``sample_rate`` and ``expected_batch_size`` describe that batch.

    Iterating yields lists of indices (possibly empty), ``len()`` is the number of batches left; the
    indices of one step are :meth:`batch`.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, *, seed: Optional[int] = None,
                 start_step: int = 0, num_replicas: int = 1, rank: int = 0):
        self.num_samples = _count(num_samples, "num_samples", 1)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
                or not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        self.steps = _count(steps, "steps", 1)
        if self.steps > 2**32:
            raise ValueError(f"steps must be <= 2**32 (the step is a 32-bit nonce word), got {steps}")
        self.start_step = _count(start_step, "start_step", 0)
        if self.start_step > self.steps:
            raise ValueError(f"start_step must be <= steps = {self.steps}, got {start_step}")
        self.num_replicas = _count(num_replicas, "num_replicas", 1)
        self.rank = _count(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be < num_replicas = {self.num_replicas}, got {rank}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        self.seed = seed
        self.seeded = seed is not None
        self._key = rng.key_from_seed(seed, "poisson-sampler") if self.seeded else rng.secret_key()
        self._threshold = _threshold(self.sample_rate)

    @property
    def inclusion_probability(self) -> float:
        """The exact inclusion probability ``floor(q * 2^64) / 2^64`` (<= ``sample_rate``)."""
        return float(Fraction(self._threshold, 2**64))

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * num_samples``: the divisor DPSGD's ``expected_batch_size`` should get."""
        return self.sample_rate * self.num_samples

    def _included(self, steps: torch.Tensor) -> torch.Tensor:
        """(len(steps), num_samples) bool inclusion matrix of the given steps (int64 tensor)."""
        n = self.num_samples
        if self._threshold >= 2**64:  # q = 1: everyone, every step
            return torch.ones(len(steps), n, dtype=torch.bool)
        n_blocks = -(-n // _PER_BLOCK)
        blocks = torch.arange(n_blocks, dtype=torch.int64).expand(len(steps), n_blocks)
        step_words = steps.reshape(-1, 1).expand_as(blocks)
        words = torch.stack(rng.chacha20_block(self._key, blocks & rng.MASK32,
                                               (blocks >> 32, step_words, SAMPLER_STREAM)), dim=-1)
        hi = words[..., 0::2].reshape(len(steps), -1)[:, :n]
        lo = words[..., 1::2].reshape(len(steps), -1)[:, :n]
        t_hi, t_lo = self._threshold >> 32, self._threshold & rng.MASK32
        return (hi < t_hi) | ((hi == t_hi) & (lo < t_lo))

    def _shard(self, indices: torch.Tensor) -> torch.Tensor:
        if self.num_replicas == 1:
            return indices
        return indices[indices % self.num_replicas == self.rank]

    def batch(self, step: int) -> torch.Tensor:
        """The (sorted, int64) indices of step ``step`` for this rank; may be empty."""
        step = _count(step, "step", 0)
        if step >= self.steps:
            raise ValueError(f"step must be < steps = {self.steps}, got {step}")
        included = self._included(torch.tensor([step], dtype=torch.int64))[0]
        return self._shard(included.nonzero().reshape(-1))

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(self.start_step, self.steps, _CHUNK_STEPS):
            last = min(self.steps, first + _CHUNK_STEPS)
            included = self._included(torch.arange(first, last, dtype=torch.int64))
            for row in included:
                yield self._shard(row.nonzero().reshape(-1)).tolist()

    def __len__(self) -> int:
        return self.steps - self.start_step


def _empty_like(batch: Any) -> Any:
    """A collated one-sample batch with every tensor cut to zero rows (the structure kept)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return type(batch)({k: _empty_like(v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(v) for v in batch)
    return batch


class _EmptySafeCollate:
    """``collate_fn`` for a batch, and for an empty batch the collated structure of one sample with zero
    rows (``default_collate([])`` raises), so an empty Poisson batch reaches the training loop as tensors
    with batch dimension 0."""

    def __init__(self, dataset: Dataset, collate_fn: Callable):
        self.dataset, self.collate_fn = dataset, collate_fn
        self._empty = None

    def __call__(self, samples: list) -> Any:
        if samples:
            return self.collate_fn(samples)
        if self._empty is None:
            self._empty = _empty_like(self.collate_fn([self.dataset[0]]))
        return self._empty


def poisson_loader(dataset: Dataset, sample_rate: float, steps: int, *, seed: Optional[int] = None,
                   start_step: int = 0, num_replicas: int = 1, rank: int = 0,
                   collate_fn: Optional[Callable] = None, **loader_kwargs) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with Poisson-sampled batches (:class:`PoissonBatchSampler`): exactly
    ``steps - start_step`` batches, each sample in each batch independently with probability ``sample_rate``.
    Empty batches come out as the usual structure with zero rows (tensors of shape ``(0, ...)``): take a
    noise-only step for them. Other keyword arguments (``num_workers``, ``pin_memory``, ...) go to
    ``DataLoader``; ``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler`` and ``drop_last`` are refused
    (they would change the sampling the accountant assumes). The sampler is ``loader.batch_sampler``."""
    clash = sorted({"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"} & set(loader_kwargs))
    if clash:
        raise ValueError(f"poisson_loader: {', '.join(clash)} cannot be set: Poisson sampling decides the batches")
    sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, seed=seed, start_step=start_step,
                                  num_replicas=num_replicas, rank=rank)
    collate = _EmptySafeCollate(dataset, collate_fn if collate_fn is not None else default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_kwargs)
