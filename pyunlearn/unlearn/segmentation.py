"""Unlearning operators for segmentation: forget the coarse-mask artefacts D_f of a trained model.

Every operator takes a model and a :class:`SegmentationUnlearningData`, never modifies the model it
is given (it works on a copy), and returns ``(model, record)``. The record holds the hyper-parameters,
the wall time, the loss curve, an optional evaluation trajectory, and the certificate (or ``None``).
For a certified operator the record holds only what is computed from the certified model and its
post-processed descendants, plus data-independent facts (hyper-parameters, certificate, wall time); the
noisy phase's losses and evaluations are diagnostics, off by default (``diagnostics=True``).

``checkpoint=PATH`` makes a run resumable: the file (private, mode 0600, authenticated with a key kept
outside it; see :mod:`pyunlearn.checkpoint`) is locked while the run uses it and deleted when the run
succeeds, unless ``keep_checkpoints=True``.

``data`` is a :class:`SegmentationUnlearningData` (in memory) or a :class:`StreamingSegmentationData` (read
from a ``Dataset`` through a ``DataLoader`` a batch at a time; same batches, same result). The certified
parameter set is exactly the trainable parameters. When the model's encoder is frozen (a public encoder),
its features are computed once and kept within a memory budget, on disk, or not at all (``feature_cache``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import certify, ops
from .._validation import count, positive
from ..checkpoint import (CheckpointError, RunLock, checkpoint_key, load_checkpoint, model_identity,
                          remove_checkpoint, save_checkpoint)
from ..losses import LossFn, get_loss, masked_cross_entropy
from ..optim import GradientClipping, ModelClipping
from ..optim._certified import noise_delta, noise_key, project_
from ..ops.rng import STREAM_INIT
from .data import SegmentationUnlearningData

__all__ = [
    "finetune", "retrain", "relabel", "neggrad_seg", "gradient_clipping", "model_clipping",
    "output_perturbation", "train_segmenter",
]

EvalFn = Callable[[nn.Module], dict]


def _forward(fn, images: torch.Tensor):
    """``fn(images)``, with torch's channel-mismatch error turned into one that names the data."""
    try:
        return fn(images)
    except RuntimeError as exc:
        if "channels" not in str(exc):
            raise
        raise ValueError(f"the model does not take data.images with {images.shape[1]} channels (a batch has shape "
                         f"{tuple(images.shape)}): {exc}") from exc


#: Where a frozen encoder's features are kept (see :class:`~pyunlearn.unlearn.StreamingSegmentationData`).
FEATURE_CACHES = ("auto", "memory", "disk", "none")


def check_feature_cache(mode) -> str:
    if mode not in FEATURE_CACHES:
        raise ValueError(f"feature_cache must be one of {FEATURE_CACHES}, got {mode!r}")
    return mode


class _Inputs:
    """Model inputs of a batch. A model with a frozen encoder (``encoder_frozen`` and a ``decoder``) has its
    encoder features computed once and kept (``data.feature_cache``: in memory, in a private temporary folder,
    or not at all, then recomputed per batch without gradients); any other model gets the batch's images.

    NOTE: at 256^2 our EncoderDecoder(width=16) has 6 MiB of features per image (8x the image), so an
    in-memory cache of an ISIC-sized data set (2,594 images) would take 15 GiB: ``"auto"`` keeps them only
    when they fit ``data.feature_cache_bytes`` (default 1 GiB)."""

    def __init__(self, model: nn.Module, data):
        self.model = model
        self.frozen_encoder = bool(getattr(model, "encoder_frozen", False)) and hasattr(model, "decoder")
        self.features: Optional[tuple[torch.Tensor, ...]] = None
        self._folder: Optional[str] = None
        if not self.frozen_encoder:
            return
        mode = check_feature_cache(getattr(data, "feature_cache", "auto"))
        budget = getattr(data, "feature_cache_bytes", 1 << 30)
        n = len(data)
        chunk = 256 if isinstance(data, SegmentationUnlearningData) else 32
        if mode == "none":
            return
        order = data.image_indices("all")
        spans = [order[i:i + chunk] for i in range(0, n, chunk)]
        batches = data.batches(spans)
        index, first = spans[0], self._encode(next(batches).images)
        per_image = sum(f[0].numel() * f.element_size() for f in first)
        if mode == "auto":
            mode = "memory" if per_image * n <= budget else "none"
        if mode == "none":
            return
        if mode == "memory":
            store = [torch.empty((n, *f.shape[1:]), dtype=f.dtype, device=f.device) for f in first]
        else:
            import tempfile
            import weakref

            import numpy as np

            self._folder = tempfile.mkdtemp(prefix="pyunlearn-features-")  # mode 0700
            weakref.finalize(self, _remove_folder, self._folder)
            store = [torch.from_numpy(np.lib.format.open_memmap(
                f"{self._folder}/level{k}.npy", mode="w+", dtype=str(f.dtype).removeprefix("torch."),
                shape=(n, *f.shape[1:]))) for k, f in enumerate(first)]
        for level, f in zip(store, first):
            level[index.to(level.device)] = f.to(level.device)
        for index, batch in zip(spans[1:], batches):
            for level, f in zip(store, self._encode(batch.images)):
                level[index.to(level.device)] = f.to(level.device)
        self.features = tuple(store)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(_forward(self.model.encoder, images))

    def logits(self, batch: SegmentationUnlearningData, index: torch.Tensor) -> torch.Tensor:
        """Logits of ``batch``, the images ``index`` of the data."""
        if self.features is not None:
            device = batch.target.device
            return self.model.decoder(tuple(f[index.to(f.device)].to(device) for f in self.features))
        if self.frozen_encoder:
            return self.model.decoder(self._encode(batch.images))
        return _forward(self.model, batch.images)

    def close(self) -> None:
        """Delete the on-disk feature cache, if any."""
        self.features = None
        if self._folder is not None:
            _remove_folder(self._folder)
            self._folder = None


def _remove_folder(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _check_certifiable(model: nn.Module, data: SegmentationUnlearningData) -> None:
    """What a certificate needs beyond the optimizer: retain-only data, and no state the operator neither
    clips nor perturbs (see :func:`check_no_float_buffers`)."""
    data.check_retain_only()
    check_no_float_buffers(model)


def check_no_float_buffers(model: nn.Module) -> None:
    """Refuse floating-point buffers (BatchNorm running statistics, with or without affine parameters) that
    a certified run would release uncovered by its noise:

    * anywhere in the certified part: a module that holds or contains a trainable parameter, or whose
      enclosing module (below the root) does, e.g. ``BatchNorm2d(affine=False)`` inside a trainable decoder;
    * in a frozen module that ``model.train()`` (as the operators call it) puts in training mode: its
      statistics would be updated from the private data.
    """
    modules = dict(model.named_modules())
    trains = {name: any(p.requires_grad for p in m.parameters()) for name, m in modules.items()}
    modes = {name: m.training for name, m in modules.items()}
    model.train()
    training = {name for name, m in modules.items() if m.training}
    for name, m in modules.items():
        m.training = modes[name]

    def enclosing_trains(name: str) -> bool:
        parts = name.split(".")
        return any(trains.get(".".join(parts[:i]), False) for i in range(1, len(parts)))

    for name, module in modules.items():
        if not any(b.is_floating_point() for b in module.buffers(recurse=False)):
            continue
        label = f"module {name or type(module).__name__!r} ({type(module).__name__})"
        if trains[name] or (name and enclosing_trains(name)):
            raise ValueError(f"{label} has floating-point buffers (e.g. running statistics) in the certified part of "
                             "the model; the certificate cannot cover them. Replace BatchNorm by GroupNorm/LayerNorm "
                             "or freeze the whole enclosing block")
        if name in training:
            raise ValueError(f"{label} is frozen but model.train() puts it in training mode: its floating-point "
                             "buffers (running statistics) would be updated from the private data during the run. "
                             "Keep it in eval mode in your model's train() (as EncoderDecoder does for its public "
                             "encoder), or replace BatchNorm by GroupNorm")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def batch_at(indices: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Mini-batch number ``step``: epochs without replacement, each a permutation drawn from
    ``(seed, epoch)``. A pure function of its arguments, so a resumed run sees the same batches."""
    per_epoch = max(indices.numel() // batch_size, 1)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(indices.numel(), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return indices[order[slot * batch_size:(slot + 1) * batch_size]]


def _check_fine_share(fine_share) -> None:
    if fine_share is not None and (isinstance(fine_share, bool) or not isinstance(fine_share, (int, float))
                                   or not 0.0 < fine_share < 1.0):
        raise ValueError(f"fine_share must be None (batches drawn uniformly) or a number in (0, 1), got "
                         f"{fine_share!r}")


def batch_indices(data, pool: torch.Tensor, batch_size: int, seed: int, steps: range,
                  fine_share: Optional[float] = None) -> list[torch.Tensor]:
    """The mini-batches of ``steps`` drawn from the images ``pool``: :func:`batch_at` over the whole pool, or with
    ``fine_share`` that share of every batch (rounded, at least one image and one other) drawn by
    :func:`batch_at` from the pool's images that have fine masks and the rest from the others, each sub-pool with
    epochs of its own (uniform draws when the pool lacks either kind or batches are single images).

    NOTE: with few fine masks a uniform draw starves the foreground: at 2% fine masks (12 of 600 images) the
    retain pixels of a batch are ~99% background, and 2 of 3 seeds of retrain (400 steps) ended with no test
    pixel above 0.5 (Dice 0). Which images have fine masks is known in both worlds of the certificate, so
    drawing by it changes no guarantee."""
    if fine_share is None or batch_size < 2:
        return [batch_at(pool, batch_size, seed, step) for step in steps]
    has_fine = data.has_fine.to(pool.device)[pool]
    fine, rest = pool[has_fine], pool[~has_fine]
    if fine.numel() == 0 or rest.numel() == 0:
        return [batch_at(pool, batch_size, seed, step) for step in steps]
    n_fine = min(max(round(fine_share * batch_size), 1), fine.numel(), batch_size - 1)
    n_rest = min(batch_size - n_fine, rest.numel())
    return [torch.cat([batch_at(fine, n_fine, seed, step), batch_at(rest, n_rest, seed, step)]) for step in steps]


#: ``seed * 1_000_003 + epoch`` must fit torch's 64-bit generator seed.
_SEED_LIMIT = 2**43


def _check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**43), got {seed!r}")
    return seed


def _check_noise_seed(noise_seed) -> None:
    if noise_seed is not None and (isinstance(noise_seed, bool) or not isinstance(noise_seed, int)
                                   or not 0 <= noise_seed < 2**63):
        raise ValueError(f"noise_seed must be None (secret noise) or an int in [0, 2**63), got {noise_seed!r}")


def _check_loss(loss: torch.Tensor, step: int, method: str) -> None:
    if not torch.isfinite(loss):
        raise ValueError(f"{method}: the loss at step {step} is {loss.item()} (NaN/Inf); the step was not taken "
                         "and the model is unchanged from the previous step")


def _retain_indices(data, pixels: str = "retain", method: str = "") -> torch.Tensor:
    idx = data.image_indices(pixels)
    if idx.numel() == 0:
        raise ValueError(f"{method}: no image has any pixel to train on (empty retain set)")
    return idx


def _retain_loss(logits, batch):
    return masked_cross_entropy(logits, batch.target, batch.retain)


def _callable_name(fn) -> str:
    """The qualified name of a loss callable (``module.qualname``; a :func:`functools.partial` with its
    arguments), as it goes into a record's hyper-parameters and a checkpoint's identity."""
    if isinstance(fn, functools.partial):
        args = [_callable_name(fn.func), *map(repr, fn.args), *(f"{k}={v!r}" for k, v in fn.keywords.items())]
        return f"functools.partial({', '.join(args)})"
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{qual}" if module else qual


def _resolve_loss(loss) -> tuple[LossFn, str]:
    """``(function, name)`` of an operator's ``loss=``: a name known to :func:`pyunlearn.losses.get_loss` or a
    callable with its convention. Raises (ValueError for an unknown name, TypeError for a bad callable) before
    an operator does any work. ``"ce"`` is :func:`masked_cross_entropy` itself, the fused path."""
    fn = get_loss(loss)
    return fn, (loss if isinstance(loss, str) else _callable_name(loss))


def _pixel_loss(loss: LossFn, logits, target, mask):
    """``loss(logits, target, mask, reduction="mean")``, refused unless a 0-dim tensor (what backward needs)."""
    value = loss(logits, target, mask, reduction="mean")
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss {_callable_name(loss)!r} must return a scalar (0-dim) tensor for reduction='mean', "
                         f"got {got}")
    return value


def _retain_loss_of(loss: LossFn):
    """The loss on the retain pixels of a batch, ``loss(logits, target, retain)`` (per-sample means, averaged)."""
    if loss is masked_cross_entropy:
        return _retain_loss

    def fn(logits, batch):
        return _pixel_loss(loss, logits, batch.target, batch.retain)
    return fn


class _Checkpoints:
    """Periodic atomic checkpoints of one operator run (model, optimizer with its step counter, record,
    phase) and resumption from them. Batches are a pure function of (seed, step), so the data order needs no
    state of its own.

    Used as a context manager around the whole run: entering takes the run's lock (rank 0) and loads an
    existing checkpoint (authenticated, and refused unless its identity matches this run's); leaving after
    success deletes the checkpoint unless ``keep``; leaving after an error keeps it for a resume. The lock
    file goes either way."""

    def __init__(self, path, every: int, identity: dict, *, keep: bool = False, key: Optional[bytes] = None):
        self.path = None if path is None else Path(path)
        if self.path is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"checkpoint_every must be an int >= 1, got {every!r}")
        self.every = every
        self.identity = identity
        self.keep = bool(keep)
        self.key = key
        self.state: Optional[dict] = None
        self._lock: Optional[RunLock] = None

    def __enter__(self) -> "_Checkpoints":
        if self.path is None:
            return self
        if _world()[0] == 0:
            self._lock = RunLock(self.path.with_name(self.path.name + ".lock")).acquire()
        try:
            if self.path.exists():
                self.state = load_checkpoint(self.path, identity=self.identity, key=self.key)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path is not None and exc_type is None and not self.keep and _world()[0] == 0:
            remove_checkpoint(self.path)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def phase(self) -> Optional[str]:
        return None if self.state is None else self.state["phase"]

    def restore(self, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer, record: dict) -> int:
        """If the checkpoint is inside ``phase``, restore it and return the step to continue from."""
        if self.phase != phase:
            return 0
        model.load_state_dict(self.state["model"])
        optimizer.load_state_dict(self.state["optimizer"])
        record.clear()
        record.update(self.state["record"])
        return int(self.state["step"])

    def after_step(self, phase: str, done: int, total: int, model, optimizer, record, extra=None) -> None:
        if self.path is None or (done % self.every and done != total):
            return
        save_checkpoint(self.path, {"phase": phase, "step": done, "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "record": record, "extra": extra or {}},
                        identity=self.identity, key=self.key)


def _checkpoints(path, every, *, method: str, model: nn.Module, data, hyper: dict, noise=None,
                 keep: bool = False) -> _Checkpoints:
    """The checkpoints of one run. Its identity: the method, every hyper-parameter, the noise (``"secret"``,
    ``{"seed": s}``, or None for a noise-free method), and keyed digests of the starting model and of the data
    contents (HMAC under the checkpoint key; no plain hash of either is written)."""
    if path is None:
        return _Checkpoints(None, every, {}, keep=keep)
    key = checkpoint_key(folder=Path(path).parent)
    identity = {"method": method, "hyperparameters": hyper, "noise": noise, "model": model_identity(model, key),
                "data": data.identity(key)}
    return _Checkpoints(path, every, identity, keep=keep, key=key)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _average_gradients(optimizer: torch.optim.Optimizer, world: int) -> None:
    """What DDP does in backward: every rank ends with the mean gradient of the global batch."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def _run(model: nn.Module, data: SegmentationUnlearningData, optimizer: torch.optim.Optimizer, *, steps: int,
         batch_size: int, seed: int, method: str, loss_fn=_retain_loss, pixels: str = "retain",
         inputs: Optional[_Inputs] = None, eval_fn: Optional[EvalFn] = None, eval_every: int = 0,
         step_offset: int = 0, progress: bool = False, record: Optional[dict] = None,
         checkpoints: Optional[_Checkpoints] = None, phase: str = "main", extra: Optional[dict] = None,
         fine_share: Optional[float] = None) -> dict:
    """The shared training loop; appends to ``record['losses']`` and ``record['trajectory']``.
    With ``checkpoints`` it resumes from a checkpoint of this ``phase`` and saves periodically. Batches:
    :func:`batch_indices` (``fine_share``).

    Under ``torch.distributed`` (torchrun) every rank draws the same global batch, computes the loss
    on its shard and the gradients are averaged before the step, so every optimizer (certified ones
    included: same clipping of the global-batch gradient, same seeded noise) stays identical on all
    ranks. Only rank 0 writes checkpoints."""
    count(steps, f"{method}: steps", minimum=0)
    count(batch_size, f"{method}: batch_size")
    _check_seed(seed)
    _check_fine_share(fine_share)
    record = record if record is not None else {"losses": [], "trajectory": []}
    if steps == 0:
        return record
    start = checkpoints.restore(phase, model, optimizer, record) if checkpoints else 0
    pool = _retain_indices(data, pixels, method)
    batch_size = min(batch_size, pool.numel())
    rank, world = _world()
    if world > batch_size:
        raise ValueError(f"{method}: batch_size {batch_size} is smaller than the {world} ranks")
    indices = batch_indices(data, pool, batch_size, seed, range(start, steps), fine_share)
    if world > 1:
        indices = [index.tensor_split(world)[rank] for index in indices]
    own_inputs = inputs is None
    inputs = inputs or _Inputs(model, data)
    try:
        model.train()
        steps_and_batches = zip(range(start, steps), indices, data.batches(indices))
        for step, index, batch in tqdm(steps_and_batches, desc=method, disable=not progress, leave=False,
                                       initial=start, total=steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(inputs.logits(batch, index), batch)
            _check_loss(loss.detach(), step_offset + step, method)
            loss.backward()
            if world > 1:
                _average_gradients(optimizer, world)
            optimizer.step()
            record["losses"].append(float(loss.detach()))
            if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                record["trajectory"].append({"step": step_offset + step + 1, **_evaluate(eval_fn, model)})
            if checkpoints and rank == 0:
                checkpoints.after_step(phase, step + 1, steps, model, optimizer, record, extra)
    finally:
        if own_inputs:
            inputs.close()
    model.eval()
    return record


def _evaluate(eval_fn: EvalFn, model: nn.Module) -> dict:
    model.eval()
    try:
        return eval_fn(model)
    finally:
        model.train()


def _start(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def _finish(record: dict, method: str, t0: float, **hyper) -> dict:
    record.update(method=method, wall_s=time.perf_counter() - t0, hyperparameters=hyper)
    record.setdefault("certificate", None)
    return record


def _adam(model: nn.Module, lr: float, name: str = "lr") -> torch.optim.Optimizer:
    positive(lr, name)
    return torch.optim.Adam([p for _, p in _trainable(model)], lr=lr)


def train_segmenter(model: nn.Module, data: SegmentationUnlearningData, *, target: str = "retain",
                    steps: int = 400, lr: float = 1e-2, batch_size: int = 32, seed: int = 0,
                    inplace: bool = True, progress: bool = False, method: str = "train", checkpoint=None,
                    checkpoint_every: int = 50, keep_checkpoints: bool = False,
                    loss="ce") -> tuple[nn.Module, dict]:
    """Supervised training of the trainable parameters on all pixels with labels ``data.target``
    (``target="all"``) or on the retain pixels only (``target="retain"``). Resumable like the operators.

    ``loss``: a name (``"ce"``, the default and the fused cross-entropy; ``"dice"``, ``"dice_ce"``,
    ``"focal"``) or a callable with the convention of :func:`pyunlearn.losses.masked_cross_entropy`
    (see :func:`pyunlearn.losses.get_loss`); checked before any work, recorded in the hyper-parameters (a
    callable by its qualified name) and in the checkpoint's identity. Same for every operator."""
    t0 = time.perf_counter()
    loss_f, loss_name = _resolve_loss(loss)
    if target == "all":
        def loss_fn(logits, batch):
            return _pixel_loss(loss_f, logits, batch.target, torch.ones_like(batch.retain))
    elif target == "retain":
        loss_fn = _retain_loss_of(loss_f)
    else:
        raise ValueError(f"target must be 'all' or 'retain', got {target!r}")
    model = _start(model, inplace)
    ck = _checkpoints(checkpoint, checkpoint_every, method=method, model=model, data=data,
                      hyper=dict(target=target, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                 loss=loss_name),
                      keep=keep_checkpoints)
    with ck:
        record = _run(model, data, _adam(model, lr), steps=steps, batch_size=batch_size, seed=seed, method=method,
                      loss_fn=loss_fn, pixels="all" if target == "all" else "retain",
                      progress=progress, checkpoints=ck)
    return model, _finish(record, method, t0, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                          loss=loss_name)


def finetune(model: nn.Module, data: SegmentationUnlearningData, *, steps: int = 300, lr: float = 5e-3,
             batch_size: int = 32, seed: int = 0, eval_fn: Optional[EvalFn] = None, eval_every: int = 0,
             inplace: bool = False, progress: bool = False, checkpoint=None,
             checkpoint_every: int = 50, keep_checkpoints: bool = False, loss="ce",
             fine_share: Optional[float] = None) -> tuple[nn.Module, dict]:
    """Plain fine-tuning (Adam) on the retain pixels. Not certified. ``loss``: see :func:`train_segmenter`.

    ``fine_share``: None draws each batch uniformly from the images with retain pixels; a number in (0, 1)
    draws that share of every batch from the images with fine masks (the only ones whose retain pixels include
    foreground) and the rest from the others (see :func:`batch_indices`). Same for every operator.

    ``checkpoint``: a file path; the run saves there every ``checkpoint_every`` steps and, when the
    file exists, resumes from it (refusing one written by a different run, or one that fails
    authentication). Two runs cannot use one file at a time (a lock). The file is deleted when the run
    succeeds unless ``keep_checkpoints=True``. Same for every operator."""
    t0 = time.perf_counter()
    loss_f, loss_name = _resolve_loss(loss)
    _check_fine_share(fine_share)
    model = _start(model, inplace)
    hyper = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed, loss=loss_name, fine_share=fine_share)
    ck = _checkpoints(checkpoint, checkpoint_every, method="finetune", model=model, data=data, hyper=hyper,
                      keep=keep_checkpoints)
    with ck:
        record = _run(model, data, _adam(model, lr), steps=steps, batch_size=batch_size, seed=seed, method="finetune",
                      loss_fn=_retain_loss_of(loss_f), eval_fn=eval_fn, eval_every=eval_every, progress=progress,
                      checkpoints=ck, fine_share=fine_share)
    return model, _finish(record, "finetune", t0, **hyper)


def retrain(model: nn.Module, data: SegmentationUnlearningData, *, steps: int = 600, lr: float = 1e-2,
            batch_size: int = 32, seed: int = 0, eval_fn: Optional[EvalFn] = None, eval_every: int = 0,
            inplace: bool = False, progress: bool = False, checkpoint=None,
            checkpoint_every: int = 50, keep_checkpoints: bool = False, loss="ce",
            fine_share: Optional[float] = None) -> tuple[nn.Module, dict]:
    """Exact-unlearning reference: re-initialise the trainable parameters and train on retain pixels only.
    ``loss``: see :func:`train_segmenter`; ``fine_share``: see :func:`finetune`."""
    t0 = time.perf_counter()
    loss_f, loss_name = _resolve_loss(loss)
    _check_fine_share(fine_share)
    model = _start(model, inplace)
    hyper = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed, loss=loss_name, fine_share=fine_share)
    ck = _checkpoints(checkpoint, checkpoint_every, method="retrain", model=model, data=data, hyper=hyper,
                      keep=keep_checkpoints)
    if hasattr(model, "reset_decoder") and getattr(model, "encoder_frozen", False):
        model.reset_decoder(seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in model.modules():
                if hasattr(m, "reset_parameters") and any(p.requires_grad for p in m.parameters(recurse=False)):
                    m.reset_parameters()
    with ck:
        record = _run(model, data, _adam(model, lr), steps=steps, batch_size=batch_size, seed=seed, method="retrain",
                      loss_fn=_retain_loss_of(loss_f), eval_fn=eval_fn, eval_every=eval_every, progress=progress,
                      checkpoints=ck, fine_share=fine_share)
    return model, _finish(record, "retrain", t0, **hyper)


def relabel(model: nn.Module, data: SegmentationUnlearningData, *, steps: int = 300, lr: float = 5e-3,
            batch_size: int = 32, seed: int = 0, eval_fn: Optional[EvalFn] = None, eval_every: int = 0,
            inplace: bool = False, progress: bool = False, checkpoint=None,
            checkpoint_every: int = 50, keep_checkpoints: bool = False, loss="ce") -> tuple[nn.Module, dict]:
    """The isomorphism used directly: fine-tune on all pixels with the known forget pixels relabelled to
    background (coarse labels elsewhere). Not certified: the coarse insides of coarse-only images stay.
    ``loss``: see :func:`train_segmenter`."""
    t0 = time.perf_counter()
    loss_f, loss_name = _resolve_loss(loss)
    model = _start(model, inplace)
    def loss_fn(logits, batch):
        return _pixel_loss(loss_f, logits, batch.relabelled_target, torch.ones_like(batch.retain))

    hyper = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed, loss=loss_name)
    ck = _checkpoints(checkpoint, checkpoint_every, method="relabel", model=model, data=data, hyper=hyper,
                      keep=keep_checkpoints)
    with ck:
        record = _run(model, data, _adam(model, lr), steps=steps, batch_size=batch_size, seed=seed, method="relabel",
                      loss_fn=loss_fn, pixels="all", eval_fn=eval_fn, eval_every=eval_every,
                      progress=progress, checkpoints=ck)
    return model, _finish(record, "relabel", t0, **hyper)


def neggrad_seg(model: nn.Module, data: SegmentationUnlearningData, *, beta: float = 0.9, steps: int = 300,
                lr: float = 5e-3, batch_size: int = 32, seed: int = 0, eval_fn: Optional[EvalFn] = None,
                eval_every: int = 0, inplace: bool = False, progress: bool = False, checkpoint=None,
                checkpoint_every: int = 50, keep_checkpoints: bool = False, loss="ce",
                fine_share: Optional[float] = None) -> tuple[nn.Module, dict]:
    """Per-pixel NegGrad+: ``beta * L(D_r) - (1 - beta) * L(D_f, coarse labels)``, both terms with ``loss``
    (see :func:`train_segmenter`); ``fine_share``: see :func:`finetune`. Not certified."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    t0 = time.perf_counter()
    loss_f, loss_name = _resolve_loss(loss)
    _check_fine_share(fine_share)
    model = _start(model, inplace)

    def loss_fn(logits, batch):
        keep = _pixel_loss(loss_f, logits, batch.target, batch.retain)
        forget = _pixel_loss(loss_f, logits, batch.coarse, batch.forget)
        return beta * keep - (1.0 - beta) * forget

    hyper = dict(beta=beta, steps=steps, lr=lr, batch_size=batch_size, seed=seed, loss=loss_name,
                 fine_share=fine_share)
    ck = _checkpoints(checkpoint, checkpoint_every, method="neggrad_seg", model=model, data=data, hyper=hyper,
                      keep=keep_checkpoints)
    with ck:
        record = _run(model, data, _adam(model, lr), steps=steps, batch_size=batch_size, seed=seed,
                      method="neggrad_seg", loss_fn=loss_fn, eval_fn=eval_fn, eval_every=eval_every, progress=progress,
                      checkpoints=ck, fine_share=fine_share)
    return model, _finish(record, "neggrad_seg", t0, **hyper)


def _certified_identity_noise(noise_seed: Optional[int]):
    return "secret" if noise_seed is None else {"seed": noise_seed}


def _precheck(model: nn.Module, data: SegmentationUnlearningData, *, method: str, batch_size, seed, noise_seed,
              finetune_steps, finetune_lr, eval_fn, eval_every, steps=None,
              loss: LossFn = masked_cross_entropy, fine_share: Optional[float] = None) -> _Inputs:
    """Everything a certified run can check before it touches the model: argument types and ranges, retain-only
    data with a non-empty retain set, no floating-point buffers, and one forward pass showing the model takes
    the data. The optimizer's constructor, which projects (and for model clipping perturbs) the parameters,
    runs only after this, so a bad call leaves the model unchanged, ``inplace=True`` included."""
    if steps is not None:
        count(steps, f"{method}: steps")
    count(batch_size, f"{method}: batch_size")
    _check_seed(seed)
    _check_noise_seed(noise_seed)
    _check_fine_share(fine_share)
    count(finetune_steps, "finetune_steps", minimum=0)
    positive(finetune_lr, "finetune_lr")
    count(eval_every, "eval_every", minimum=0)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable or None, got {type(eval_fn).__name__}")
    _check_certifiable(model, data)
    _trainable(model)
    pool = _retain_indices(data, "retain", method)
    _, world = _world()
    if world > min(batch_size, pool.numel()):
        raise ValueError(f"{method}: batch_size {min(batch_size, pool.numel())} is smaller than the {world} ranks")
    inputs = _Inputs(model, data)
    try:
        _probe(model, inputs, data, pool[:1], method, loss)
    except BaseException:
        inputs.close()
        raise
    return inputs


def _probe(model: nn.Module, inputs: _Inputs, data, index: torch.Tensor, method: str,
           loss: LossFn = masked_cross_entropy) -> None:
    """One forward pass on one image, without gradients and in eval mode (so no running statistics move;
    the modes are restored): a model that does not take the data, or a loss that does not take its logits
    (or does not give a scalar), fails here."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    batch = data.batch(index)
    try:
        with torch.no_grad():
            logits = inputs.logits(batch, index)
    finally:
        for m, mode in modes.items():
            m.training = mode
    spatial = tuple(batch.target.shape[1:])
    if logits.dim() != 2 + len(spatial) or tuple(logits.shape[2:]) != spatial:
        expected = ", ".join(map(str, spatial))
        raise ValueError(f"{method}: the model maps data.images to logits of shape {tuple(logits.shape)}; expected "
                         f"(B, K, {expected}) to match data.target")
    try:
        with torch.no_grad():
            _pixel_loss(loss, logits, batch.target, batch.retain)
    except ValueError as exc:
        raise ValueError(f"{method}: {exc}") from exc


@contextlib.contextmanager
def _unchanged_on_failure(model: nn.Module):
    """Puts the trainable parameters (and the training modes) back as they were if the block raises: a
    failed certified call (with ``inplace=True`` too) leaves no half-projected or half-noised model behind."""
    saved = [(p, p.detach().clone()) for _, p in _trainable(model)]
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
        for m, mode in modes.items():
            m.training = mode
        raise


def _not_covered_diagnostics(steps: int) -> str:
    return (f"record['diagnostics'] (diagnostics=True): the losses and evaluations of the noisy phase (steps 0 to "
            f"{steps - 1}). They are computed from uncertified intermediate models (the step-0 evaluation alone, of "
            "the clipped starting model, can tell the two worlds apart), so releasing them voids the guarantee")


def _certified_run(model, data, optimizer_cls, optimizer_kwargs, *, method, noise_seed, steps, batch_size, seed,
                   finetune_steps, finetune_lr, eval_fn, eval_every, progress, checkpoint, checkpoint_every,
                   diagnostics, keep_checkpoints, loss="ce", fine_share=None):
    """Noisy certified phase on retain data, then optional noise-free fine-tuning on retain data
    (post-processing: the guarantee is unchanged). Resumable in either phase.

    Only what is computed from the certified model (the end of the noisy phase) and its post-processed
    descendants goes into the record: the evaluation at the end of the noisy phase, the post-processing
    losses and evaluations. The noisy phase's own losses and evaluations are recorded only with
    ``diagnostics=True``, under ``record['diagnostics']``, and the certificate then says it does not cover
    them. On resume the certificate is recomputed by the optimizer from its restored state, never read."""
    t0 = time.perf_counter()
    loss_f, loss_name = _resolve_loss(loss)
    inputs = _precheck(model, data, method=method, steps=steps, batch_size=batch_size, seed=seed,
                       noise_seed=noise_seed, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                       eval_fn=eval_fn, eval_every=eval_every, loss=loss_f, fine_share=fine_share)
    retain_loss = _retain_loss_of(loss_f)
    diagnostics = bool(diagnostics)
    named = _trainable(model)
    hyper = dict(optimizer_kwargs, steps=steps, batch_size=batch_size, seed=seed, finetune_steps=finetune_steps,
                 finetune_lr=finetune_lr, eval_every=eval_every, diagnostics=diagnostics, loss=loss_name,
                 fine_share=fine_share)
    ck = _checkpoints(checkpoint, checkpoint_every, method=method, model=model, data=data, hyper=hyper,
                      noise=_certified_identity_noise(noise_seed), keep=keep_checkpoints)
    evaluating = eval_fn is not None and eval_every > 0
    with ck, _unchanged_on_failure(model), contextlib.closing(inputs):
        # NOTE: the optimizer is built before any checkpoint is restored: its constructor projects (and for
        # model clipping perturbs) the parameters, which the restored state then overwrites.
        optimizer = optimizer_cls(named, steps=steps, seed=noise_seed, **optimizer_kwargs)
        diag = {"losses": [], "trajectory": []}  # the noisy phase's losses (and evaluations with diagnostics)
        record = {"losses": [], "trajectory": []}
        if ck.phase == "post":
            saved = ck.state["extra"]["certified"]
            with torch.no_grad():
                for name, p in named:
                    p.copy_(saved["params"][name])
            optimizer.load_state_dict(saved["optimizer"])
        else:
            if diagnostics and evaluating and ck.phase is None:
                diag["trajectory"].append({"step": 0, **_evaluate(eval_fn, model)})
            _run(model, data, optimizer, steps=steps, batch_size=batch_size, seed=seed, method=method,
                 loss_fn=retain_loss, inputs=inputs, eval_fn=eval_fn if diagnostics else None, eval_every=eval_every, progress=progress,
                 record=diag, checkpoints=ck, phase="noisy", fine_share=fine_share)
        certificate = optimizer.certificate()  # the run's own analysis, after a restore too
        if optimizer.seeded != (noise_seed is not None):  # pragma: no cover - the identity already binds it
            raise CheckpointError(f"{checkpoint}: restored a {'seeded' if optimizer.seeded else 'secret'} run")
        if ck.phase != "post":
            # The end of the noisy phase is the certified model: its evaluation is covered.
            if diag["trajectory"] and diag["trajectory"][-1]["step"] == steps:
                record["trajectory"].append(diag["trajectory"].pop())
            elif evaluating:
                record["trajectory"].append({"step": steps, **_evaluate(eval_fn, model)})
            record["noisy_steps"] = steps
            if diagnostics:
                record["diagnostics"] = diag
        certified = {"params": {name: p.detach().clone() for name, p in named},
                     "optimizer": optimizer.state_dict()} if ck.path is not None else None
        _run(model, data, _adam(model, finetune_lr, "finetune_lr"), steps=finetune_steps, batch_size=batch_size,
             seed=seed + 1, method=f"{method} (post-processing)", loss_fn=retain_loss, inputs=inputs, eval_fn=eval_fn,
             eval_every=eval_every, step_offset=steps, progress=progress, record=record, checkpoints=ck,
             phase="post", extra={"certified": certified}, fine_share=fine_share)
        model.eval()
    if diagnostics:
        certificate.not_covered.append(_not_covered_diagnostics(steps))
    record["certificate"] = certificate.to_dict()
    hyper = {k: v for k, v in optimizer.hyper.items() if k not in ("params", "param_names")}
    return model, _finish(record, method, t0, **hyper, steps=steps, batch_size=batch_size, seed=seed,
                          noise_seed=noise_seed, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                          diagnostics=diagnostics, loss=loss_name, fine_share=fine_share)


def gradient_clipping(model: nn.Module, data: SegmentationUnlearningData, *, epsilon: float = 1.0,
                      delta: float = 1e-5, steps: int = 100, lr: float = 0.05, c0: float = 1.0, c1: float = 1.0,
                      weight_decay: float = 0.0, sigma: Optional[float] = None, finetune_steps: int = 300,
                      finetune_lr: float = 5e-3, batch_size: int = 32, seed: int = 0,
                      noise_seed: Optional[int] = None, eval_fn: Optional[EvalFn] = None, eval_every: int = 0,
                      diagnostics: bool = False, inplace: bool = False, progress: bool = False, checkpoint=None,
                      checkpoint_every: int = 50, keep_checkpoints: bool = False,
                      loss="ce", fine_share: Optional[float] = None) -> tuple[nn.Module, dict]:
    """Certified (epsilon, delta) unlearning by noisy clipped-gradient fine-tuning
    (:class:`~pyunlearn.optim.GradientClipping`), then noise-free fine-tuning on retain data.

    ``noise_seed=None`` draws a secret noise key from the operating system; a seed makes the noise
    reproducible and NOT secret (the certificate says so). ``eval_fn`` is called every ``eval_every`` steps
    of the post-processing phase and at the end of the noisy phase (the certified model); with
    ``diagnostics=True`` also at step 0 and inside the noisy phase, recorded under ``record['diagnostics']``
    with the noisy losses, which the certificate then lists as not covered. ``checkpoint``: see
    :func:`finetune`; the file is deleted when the run succeeds unless ``keep_checkpoints``. ``loss`` (see
    :func:`train_segmenter`) is the loss of both phases: the clipping bounds each step's gradient whatever
    the loss, so the certificate does not depend on it. ``fine_share`` (see :func:`finetune`) draws the batches of
    both phases; which images have fine masks is the same in both worlds the certificate compares."""
    model = _start(model, inplace)
    kwargs = dict(lr=lr, c0=c0, c1=c1, delta=delta, weight_decay=weight_decay)
    kwargs.update(sigma=sigma) if sigma is not None else kwargs.update(epsilon=epsilon)
    return _certified_run(model, data, GradientClipping, kwargs, method="gradient_clipping", noise_seed=noise_seed,
                          steps=steps, batch_size=batch_size, seed=seed, finetune_steps=finetune_steps,
                          finetune_lr=finetune_lr, eval_fn=eval_fn, eval_every=eval_every, progress=progress,
                          checkpoint=checkpoint, checkpoint_every=checkpoint_every, diagnostics=diagnostics,
                          keep_checkpoints=keep_checkpoints, loss=loss, fine_share=fine_share)


def model_clipping(model: nn.Module, data: SegmentationUnlearningData, *, epsilon: float = 1.0,
                   delta: float = 1e-5, steps: int = 5, lr: float = 0.05, c2: float = 5.0,
                   c0: Optional[float] = None, sigma0: float = 0.0, weight_decay: float = 0.0,
                   sigma: Optional[float] = None, finetune_steps: int = 300, finetune_lr: float = 5e-3,
                   batch_size: int = 32, seed: int = 0, noise_seed: Optional[int] = None,
                   eval_fn: Optional[EvalFn] = None, eval_every: int = 0, diagnostics: bool = False,
                   inplace: bool = False, progress: bool = False, checkpoint=None, checkpoint_every: int = 50,
                   keep_checkpoints: bool = False, loss="ce",
                   fine_share: Optional[float] = None) -> tuple[nn.Module, dict]:
    """Certified (epsilon, delta) unlearning by projected noisy gradient descent
    (:class:`~pyunlearn.optim.ModelClipping`), then noise-free fine-tuning on retain data. Records,
    diagnostics, checkpoints, ``loss`` and ``fine_share`` as :func:`gradient_clipping`."""
    model = _start(model, inplace)
    kwargs = dict(lr=lr, c2=c2, c0=c0, sigma0=sigma0, delta=delta, weight_decay=weight_decay)
    kwargs.update(sigma=sigma) if sigma is not None else kwargs.update(epsilon=epsilon)
    return _certified_run(model, data, ModelClipping, kwargs, method="model_clipping", noise_seed=noise_seed,
                          steps=steps, batch_size=batch_size, seed=seed, finetune_steps=finetune_steps,
                          finetune_lr=finetune_lr, eval_fn=eval_fn, eval_every=eval_every, progress=progress,
                          checkpoint=checkpoint, checkpoint_every=checkpoint_every, diagnostics=diagnostics,
                          keep_checkpoints=keep_checkpoints, loss=loss, fine_share=fine_share)


def output_perturbation(model: nn.Module, data: SegmentationUnlearningData, *, epsilon: float = 1.0,
                        delta: float = 1e-5, c0: float = 1.0, finetune_steps: int = 300, finetune_lr: float = 5e-3,
                        batch_size: int = 32, seed: int = 0, noise_seed: Optional[int] = None,
                        eval_fn: Optional[EvalFn] = None, eval_every: int = 0, inplace: bool = False,
                        progress: bool = False, loss="ce", fine_share: Optional[float] = None) -> tuple[nn.Module, dict]:
    """Baseline: ``clip(x, c0) + N(0, sigma0^2 I)`` with sigma0 from
    :func:`~pyunlearn.certify.sigma_output_perturbation`, then noise-free fine-tuning on retain data.

    There is no uncertified phase: the step-0 evaluation is of the released noisy model, and every later
    loss and evaluation of its post-processed descendants, so the whole record is covered. ``loss`` (see
    :func:`train_segmenter`) is the post-processing loss; ``fine_share`` (see :func:`finetune`) draws its batches."""
    t0 = time.perf_counter()
    loss_f, loss_name = _resolve_loss(loss)
    model = _start(model, inplace)
    inputs = _precheck(model, data, method="output_perturbation", batch_size=batch_size, seed=seed,
                       noise_seed=noise_seed, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                       eval_fn=eval_fn, eval_every=eval_every, loss=loss_f, fine_share=fine_share)
    named = _trainable(model)
    params = [p for _, p in named]
    # The sampler's share of delta (one draw over every certified coordinate) is taken off before calibrating
    # (refused past 10% of delta). sigma0 is already float32 (what the noise kernel adds exactly) and has the
    # clip slack in its sensitivity; extreme epsilon/delta/c0 are ValueErrors naming them, raised before the
    # model is touched.
    share = noise_delta(coordinates=sum(p.numel() for p in params), draws=1, epsilon=float(epsilon),
                        delta=float(delta), where="output_perturbation")
    sigma0 = certify.sigma_output_perturbation(epsilon=epsilon, delta=delta - share, c0=c0)
    seeded = noise_seed is not None
    key = noise_key(noise_seed if seeded else None, "output_perturbation")
    record = {"losses": [], "trajectory": []}
    with _unchanged_on_failure(model), contextlib.closing(inputs):
        with torch.no_grad():
            project_(params, c0)
            ops.add_noise_(params, sigma=sigma0, key=key, step=0, stream=STREAM_INIT)
        if eval_fn is not None and eval_every:
            record["trajectory"].append({"step": 0, **_evaluate(eval_fn, model)})
        _run(model, data, _adam(model, finetune_lr, "finetune_lr"), steps=finetune_steps, batch_size=batch_size,
             seed=seed, method="output_perturbation (post-processing)", loss_fn=_retain_loss_of(loss_f), inputs=inputs,
             eval_fn=eval_fn, eval_every=eval_every, progress=progress, record=record, fine_share=fine_share)
        model.eval()
    certificate = certify.Certificate(
        epsilon=float(epsilon), delta=float(delta), operator="output_perturbation",
        hyperparameters={"c0": c0, "sigma0": sigma0, "seed": noise_seed if seeded else None},
        parameters=[n for n, _ in named],
        assumptions=["the certified parameters are exactly the listed ones; every other parameter never saw the "
                     "private training data",
                     "later fine-tuning used retain data only (post-processing)",
                     "noise key derived from a user seed: reproducible, NOT secret" if seeded
                     else "256-bit noise key drawn from the operating system's entropy, never stored",
                     "noise: ChaCha20 counter mode, float64 Box-Muller from 128-bit uniforms, centre + noise rounded "
                     "once; delta includes the sampler's total-variation distance to the Gaussian (noise_delta)"],
        seeded=seeded, noise_delta=share)
    record["certificate"] = certificate.to_dict()
    return model, _finish(record, "output_perturbation", t0, epsilon=epsilon, delta=delta, c0=c0, sigma0=sigma0,
                          finetune_steps=finetune_steps, finetune_lr=finetune_lr, seed=seed, noise_seed=noise_seed,
                          loss=loss_name, fine_share=fine_share)
