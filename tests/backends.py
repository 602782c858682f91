"""Shared by the op tests: which backends are live here, the device each runs on, forcing one, and the
Hypothesis budget per backend.

The tests build their inputs on the CPU; ``to_backend`` moves them to the backend's device (CUDA for
the ``cuda`` backend, and for ``triton`` outside the interpreter), so the same tests cover the GPU
kernels when a GPU is present (``make test TRITON_INTERPRET=0`` on a CUDA machine).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from hypothesis import Phase, settings

import pyunlearn.ops as ops


def _triton_ready() -> bool:
    try:
        return importlib.import_module("pyunlearn._triton").is_available()
    except ImportError:
        return False


#: The live backends: Triton on CPU tensors under TRITON_INTERPRET=1, on CUDA tensors otherwise.
BACKENDS = ["reference"] + (["cpp"] if ops.backends()["cpp"] else []) + (["triton"] if _triton_ready() else []) + (
    ["cuda"] if ops.backends()["cuda"] else [])


def device_of(backend: str | None) -> torch.device:
    """The device whose tensors ``backend`` runs on."""
    if backend == "cuda" or (backend == "triton" and not ops.backends()["triton_interpreter"]):
        return torch.device("cuda")
    return torch.device("cpu")


def to_backend(backend: str | None, value):
    """``value`` (a tensor, None, or a list/tuple of them) on the device of ``backend``."""
    if isinstance(value, (list, tuple)):
        return type(value)(to_backend(backend, v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.to(device_of(backend))
    return value


@contextmanager
def forced(backend: str | None):
    """Run the body with PYUNLEARN_BACKEND set to ``backend`` (unset for None), then restore it."""
    old = os.environ.get("PYUNLEARN_BACKEND")
    if backend is None:
        os.environ.pop("PYUNLEARN_BACKEND", None)
    else:
        os.environ["PYUNLEARN_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYUNLEARN_BACKEND", None)
        else:
            os.environ["PYUNLEARN_BACKEND"] = old


def examples(backend: str) -> settings:
    """The Triton interpreter costs ~50 ms a call: fewer examples there, and no shrinking (a failure
    is reported as generated)."""
    if backend == "triton":
        return settings(max_examples=8, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    return settings()


def traced_graph(op: str, backend: str) -> str:
    """The functionalized graph of ``op`` on (fake) CUDA tensors, traced in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYUNLEARN_BACKEND"] = backend
    script = Path(__file__).parent / "scripts" / "trace_op_graph.py"
    done = subprocess.run([sys.executable, str(script), op], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
