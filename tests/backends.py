"""Shared by the op tests: which backends are live here, forcing one, Hypothesis budget per backend."""
from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

from hypothesis import Phase, settings

import pyunlearn.ops as ops


def _triton_ready() -> bool:
    try:
        return importlib.import_module("pyunlearn._triton").is_available()
    except ImportError:
        return False


#: The backends that run on CPU tensors here (Triton only under TRITON_INTERPRET=1).
BACKENDS = ["reference"] + (["cpp"] if ops.backends()["cpp"] else []) + (
    ["triton"] if _triton_ready() and ops.backends()["triton_interpreter"] else [])


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
