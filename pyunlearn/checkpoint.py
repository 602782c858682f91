"""Atomic, authenticated, private checkpoints for resumable runs.

What a checkpoint file holds
    ``MAGIC``; a line with the HMAC-SHA256 tag (hex) of everything after it; a JSON header line (format
    version and the run's ``identity``: method, every hyper-parameter, the noise seed or the fact that the
    noise is secret, parameter names and shapes, data shapes, and *keyed* digests of the starting model and
    of the data); then the payload written by ``torch.save``. For an operator run the payload is the
    current model, the optimizer state with its step counter, the record so far and the phase; for a
    certified run in its noise-free post-processing phase it also holds the certified model at the end of
    the noisy phase (to recompute the certificate on resume). A noisy-phase checkpoint therefore holds an
    *intermediate, uncertified* model: it is a private file.

Who controls a result
    The tag is keyed with the *checkpoint key*, which is never stored beside the checkpoints:
    ``$PYUNLEARN_CHECKPOINT_KEY`` (at least 16 characters) if set, else the key file
    ``$PYUNLEARN_CHECKPOINT_KEY_FILE`` or ``$XDG_CONFIG_HOME/pyunlearn/checkpoint.key``
    (``~/.config/pyunlearn/checkpoint.key``), created with 32 random bytes, mode 0600, on first use and
    refused if others may read it or if it lies inside the checkpoint folder. A file that fails the tag
    (any byte changed, truncated, or written under another key) is refused before it is parsed. So whoever
    can write the checkpoint folder *but not* the key can delete a run, never steer it; whoever holds the
    key controls what a resumed run returns.

Privacy
    Files and the lock are created with mode 0600 and folders with 0700. The header holds no plain hash
    of the starting model or of the data (only HMACs under the checkpoint key). The operators delete their
    checkpoint when the run succeeds (unless ``keep_checkpoints=True``).

Writing goes to a temporary file in the same directory, is flushed and fsynced, then renamed over the
target, so a crash leaves either the old or the new checkpoint, never a torn one. :class:`RunLock`
(``fcntl.flock``) keeps two runs out of one checkpoint.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError", "CheckpointLockedError", "RunLock", "checkpoint_key", "data_identity", "key_file_path",
    "load_checkpoint", "model_identity", "remove_checkpoint", "save_checkpoint",
]

MAGIC = b"PYUNLEARN-CKPT\n"
FORMAT_VERSION = 2
KEY_ENV = "PYUNLEARN_CHECKPOINT_KEY"
KEY_FILE_ENV = "PYUNLEARN_CHECKPOINT_KEY_FILE"
_MIN_KEY_BYTES = 16
_TAG_LABEL = b"pyunlearn/checkpoint/v2\0"
_TAG_HEX = 64


class CheckpointError(ValueError):
    """A checkpoint is corrupt, truncated, forged, or belongs to another run."""


class CheckpointLockedError(CheckpointError):
    """Another run holds the lock of this checkpoint (folder)."""


# --------------------------------------------------------------------------------------------------
# The checkpoint key
# --------------------------------------------------------------------------------------------------
def key_file_path() -> Path:
    """Where the checkpoint key file lives (``$PYUNLEARN_CHECKPOINT_KEY_FILE``, else the user's config dir)."""
    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "pyunlearn" / "checkpoint.key"


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _create_key_file(path: Path) -> None:
    """32 random bytes (hex) at ``path``, mode 0600, created atomically (content complete or absent)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-key.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process created it first: then use theirs
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def checkpoint_key(*, folder: Optional[Path] = None) -> bytes:
    """The secret key that authenticates checkpoints (see the module docstring). ``folder``: the checkpoint
    folder, which must not hold the key file."""
    env = os.environ.get(KEY_ENV)
    if env is not None:
        key = env.encode()
        if len(key) < _MIN_KEY_BYTES:
            raise CheckpointError(f"${KEY_ENV} must hold at least {_MIN_KEY_BYTES} characters (e.g. the output of "
                                  "`python -c 'import secrets; print(secrets.token_hex(32))'`)")
        return key
    path = key_file_path()
    if folder is not None and _inside(path, Path(folder)):
        raise CheckpointError(f"the checkpoint key file {path} lies inside the checkpoint folder {folder}: whoever "
                              "can write that folder could forge checkpoints. Keep the key elsewhere "
                              f"(${KEY_FILE_ENV} or ${KEY_ENV})")
    if not path.exists():
        _create_key_file(path)
    st = path.stat()
    if st.st_mode & 0o077:
        raise CheckpointError(f"the checkpoint key file {path} may be read or written by other users (mode "
                              f"{st.st_mode & 0o777:o}); make it private: chmod 600 {path}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CheckpointError(f"the checkpoint key file {path} belongs to another user")
    key = path.read_bytes().strip()
    if len(key) < _MIN_KEY_BYTES:
        raise CheckpointError(f"the checkpoint key file {path} holds fewer than {_MIN_KEY_BYTES} bytes")
    return key


# --------------------------------------------------------------------------------------------------
# Identities (keyed digests, never plain hashes)
# --------------------------------------------------------------------------------------------------
def _update_with_tensor(mac, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    mac.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
    flat = t.reshape(-1)
    chunk = 1 << 24  # elements per transfer: bounded host memory for large data on a GPU
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk].cpu().contiguous()
        mac.update(part.view(torch.uint8).numpy().tobytes() if part.dtype != torch.bool
                   else part.to(torch.uint8).numpy().tobytes())


def _keyed_digest(key: bytes, label: str, tensors: list[tuple[str, torch.Tensor]]) -> str:
    mac = hmac.new(key, b"pyunlearn/identity/" + label.encode() + b"\0", hashlib.sha256)
    for name, t in tensors:
        _update_with_tensor(mac, name, t)
    return mac.hexdigest()


def model_identity(model: nn.Module, key: bytes) -> dict[str, Any]:
    """Names and shapes of every parameter and buffer, and an HMAC (under ``key``) of their values: a
    checkpoint resumes only the run that started from exactly this model, and holds no plain hash of it."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {"shapes": {name: list(t.shape) for name, t in tensors},
            "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
            "hmac": _keyed_digest(key, "model", tensors)}


def data_identity(tensors: Mapping[str, torch.Tensor], key: bytes) -> dict[str, Any]:
    """Shapes and dtypes of the data tensors and an HMAC (under ``key``) of their contents: images permuted
    or masks moved with the same pixel counts are another data set."""
    items = sorted(tensors.items())
    return {"shapes": {name: list(t.shape) for name, t in items},
            "hmac": _keyed_digest(key, "data", items)}


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _tag(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, _TAG_LABEL + signed, hashlib.sha256).hexdigest().encode()


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, payload: dict[str, Any], *, identity: dict[str, Any],
                    key: Optional[bytes] = None) -> None:
    """Atomically write ``payload`` (anything ``torch.save`` takes with ``weights_only`` loading) tagged with
    ``identity``, authenticated under ``key`` (default :func:`checkpoint_key`), mode 0600."""
    path = Path(path)
    key = checkpoint_key(folder=path.parent) if key is None else key
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    header = json.dumps({"version": FORMAT_VERSION, "identity": identity}, sort_keys=True).encode() + b"\n"
    signed = header + buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + _tag(key, signed) + b"\n" + signed)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def load_checkpoint(path: str | Path, *, identity: dict[str, Any], key: Optional[bytes] = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError` if it fails
    authentication (corrupt, truncated, edited, or written under another key) or if its identity differs from
    ``identity`` (naming the differing entries)."""
    path = Path(path)
    key = checkpoint_key(folder=path.parent) if key is None else key
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a pyunlearn checkpoint (bad magic bytes)")
    start = len(MAGIC)
    end = start + _TAG_HEX
    if len(raw) < end + 1 or raw[end:end + 1] != b"\n":
        raise CheckpointError(f"{path}: truncated checkpoint or an older format (no authentication tag); "
                              "delete it and rerun")
    signed = raw[end + 1:]
    if not hmac.compare_digest(raw[start:end], _tag(key, signed)):
        raise CheckpointError(f"{path}: checkpoint fails authentication (HMAC-SHA256 under the checkpoint key): it "
                              "was modified, truncated, or written with another key; refusing it")
    newline = signed.find(b"\n")
    header = json.loads(signed[:newline])
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {header.get('version')!r}, expected {FORMAT_VERSION}")
    saved, wanted = header.get("identity", {}), _normalise(identity)
    if saved != wanted:
        keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise CheckpointError(f"{path}: checkpoint belongs to a different run; differing entries: {keys}. Resume "
                              "with the same arguments, or give this run another checkpoint path")
    return torch.load(io.BytesIO(signed[newline + 1:]), weights_only=True)


def _temporaries(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.name.endswith(".tmp")]


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint and any temporary file a killed write left beside it."""
    path = Path(path)
    for p in [path] + _temporaries(path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive ``fcntl.flock`` on ``path`` (created 0600), held by one run at a time: a second run fails
    at once with :class:`CheckpointLockedError`. The lock file is removed on release."""

    def __init__(self, path: str | Path, what: str = "checkpoint"):
        self.path = Path(path)
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = ""
                try:
                    pid = self.path.read_text().strip()
                    holder = f" (process {pid})" if pid else ""
                except OSError:
                    pass
                raise CheckpointLockedError(
                    f"another run{holder} is using this {self.what}: its lock {self.path} is held. Wait for "
                    "that run to finish, or give this run another checkpoint path") from None
            # The previous holder may have removed the file between our open and flock: lock the file
            # that is at the path now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while holding it: a waiting process re-checks the inode
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
