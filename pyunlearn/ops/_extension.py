"""Loading of the optional compiled extension ``pyunlearn._C`` (the C++ CPU kernels).

``load()`` returns the module when it is built, was built for this Python layer (``ABI_VERSION``) and
for the running torch (major.minor), and ``None`` otherwise. The first failure warns once
(``RuntimeWarning``) and the ops fall back to the PyTorch reference; ``import pyunlearn`` never breaks.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from types import ModuleType
from typing import Optional

import torch

#: Must equal ``kAbiVersion`` in csrc/pyunlearn/bindings.cpp; bump both when a kernel contract changes.
ABI_VERSION = 2

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_reason: Optional[str] = None


def _torch_major_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _try_import() -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        module = importlib.import_module("pyunlearn._C")
    except ImportError as exc:  # not built, or built against another torch (undefined symbols)
        return None, f"cannot import pyunlearn._C ({exc})"
    except OSError as exc:  # broken shared object
        return None, f"cannot load pyunlearn._C ({exc})"
    abi = getattr(module, "ABI_VERSION", None)
    if abi != ABI_VERSION:
        return None, (f"pyunlearn._C has ABI version {abi}, this Python code expects {ABI_VERSION} "
                      "(stale build: rerun `pip install --no-build-isolation -e .`)")
    built_for = getattr(module, "TORCH_VERSION", None)
    if built_for != _torch_major_minor():
        return None, (f"pyunlearn._C was built for torch {built_for}, running torch {torch.__version__} "
                      "(rebuild with `pip install --no-build-isolation -e .`)")
    return module, None


def load() -> Optional[ModuleType]:
    """The compiled extension, or ``None`` (after one ``RuntimeWarning`` saying why)."""
    global _loaded, _module, _reason
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            _module, _reason = _try_import()
            _loaded = True
            if _module is None:
                warnings.warn(f"pyunlearn: compiled CPU kernels unavailable, using the PyTorch reference: {_reason}",
                              RuntimeWarning, stacklevel=3)
    return _module


def unavailable_reason() -> Optional[str]:
    """Why ``load()`` returns ``None`` (``None`` when the extension is loaded)."""
    load()
    return _reason
