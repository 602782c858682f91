"""Atomic, verified checkpoints for resumable unlearning runs.

A checkpoint file is ``MAGIC``, a JSON header line (format version, SHA-256 of the payload, and an
``identity`` dict describing the run: model structure and hyper-parameters), then the payload
written by ``torch.save``. Writing goes to a temporary file in the same directory, is flushed and
fsynced, then renamed over the target, so a crash leaves either the old or the new checkpoint,
never a torn one. Loading refuses a corrupt file or one written by a different run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "model_identity"]

MAGIC = b"PYUNLEARN-CKPT\n"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is corrupt, truncated, or belongs to another run."""


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Names and shapes of every parameter and buffer, and a SHA-256 of their values: a checkpoint
    resumes only the run that started from exactly this model."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return {"shapes": {name: list(t.shape) for name, t in tensors}, "sha256": digest.hexdigest()}


def save_checkpoint(path: str | Path, payload: dict[str, Any], *, identity: dict[str, Any]) -> None:
    """Atomically write ``payload`` (anything ``torch.save`` takes) tagged with ``identity``."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = json.dumps({"version": FORMAT_VERSION, "sha256": hashlib.sha256(body).hexdigest(),
                         "identity": identity}, sort_keys=True).encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + header + body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def load_checkpoint(path: str | Path, *, identity: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError` if it is
    corrupt or its identity differs from ``identity`` (naming the differing entries)."""
    path = Path(path)
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a pyunlearn checkpoint (bad magic bytes)")
    newline = raw.find(b"\n", len(MAGIC))
    if newline < 0:
        raise CheckpointError(f"{path}: truncated checkpoint (no header)")
    try:
        header = json.loads(raw[len(MAGIC):newline])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt checkpoint header ({err})") from None
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {header.get('version')!r}, expected {FORMAT_VERSION}")
    body = raw[newline + 1:]
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (SHA-256 mismatch)")
    saved, wanted = header.get("identity", {}), _normalise(identity)
    if saved != wanted:
        keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise CheckpointError(f"{path}: checkpoint belongs to a different run; differing entries: {keys}")
    return torch.load(io.BytesIO(body), weights_only=True)
