"""setup.py builds the CUDA kernels where no GPU is visible (a build node, a container build, a cluster
login node): with TORCH_CUDA_ARCH_LIST unset, torch's ``_get_cuda_arch_flags`` detects the architectures
of the visible GPUs and fails with an IndexError when there are none, so setup.py sets a default list.

setup.py is read, not executed as a whole (running it would call setup()): its definitions are
executed without the two module-level statements that build. Runs without CUDA: the arch flags are
plain string processing in torch, and the extension classes are replaced by recorders.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SM90 = "-gencode=arch=compute_90,code=sm_90"


def _setup_definitions() -> dict:
    """setup.py's imports, constants and functions, without ``ext_modules, cmdclass = _extensions()``
    and ``setup(...)``."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [node for node in tree.body
            if not (isinstance(node, (ast.Assign, ast.Expr)) and isinstance(node.value, ast.Call))]
    namespace: dict = {"__name__": "setup_definitions"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(ROOT / "setup.py"), "exec"), namespace)
    return namespace


SETUP = _setup_definitions()
cuda_arch_list = SETUP["cuda_arch_list"]
DEFAULT = SETUP["DEFAULT_CUDA_ARCH_LIST"]
get_cuda_arch_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
needs_arch_flags = pytest.mark.skipif(get_cuda_arch_flags is None,
                                      reason="this torch has no torch.utils.cpp_extension._get_cuda_arch_flags")


@pytest.fixture
def no_gpu_visible(monkeypatch):
    """What CUDA_VISIBLE_DEVICES="" (or a machine without a GPU) looks like to torch."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # recorded, so setup.py's own write is undone afterwards
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_default_only_when_unset_and_no_gpu():
    assert cuda_arch_list({}, 0) == DEFAULT
    assert cuda_arch_list({"TORCH_CUDA_ARCH_LIST": ""}, 0) == DEFAULT    # torch treats "" as unset too
    assert cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "  "}, 0) == DEFAULT  # (torch would reject "  ")
    assert cuda_arch_list({}, 1) is None  # torch detects the visible GPUs itself
    assert cuda_arch_list({}, 4) is None
    for user in ("8.6", "7.5;8.0;9.0+PTX", "Hopper", "native"):  # a user's choice is always respected
        assert cuda_arch_list({"TORCH_CUDA_ARCH_LIST": user}, 0) is None
        assert cuda_arch_list({"TORCH_CUDA_ARCH_LIST": user}, 2) is None


def test_default_list_includes_hopper_and_ptx():
    archs = DEFAULT.split(";")
    assert "8.0" in archs and "9.0+PTX" in archs
    assert DEFAULT in SETUP["__doc__"]  # documented in setup.py's docstring


@needs_arch_flags
def test_torch_arch_flags_without_gpu(no_gpu_visible, monkeypatch):
    try:
        get_cuda_arch_flags()
    except IndexError:
        pass  # torch's own detection with no GPU: the crash the default avoids (torch 2.13 and earlier)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", cuda_arch_list({}, torch.cuda.device_count()))
    flags = get_cuda_arch_flags()
    assert SM90 in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX for newer GPUs
    assert "-gencode=arch=compute_80,code=sm_80" in flags


@needs_arch_flags
def test_user_arch_list_respected(no_gpu_visible, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}, 0) is None
    assert get_cuda_arch_flags() == ["-gencode=arch=compute_86,code=sm_86"]


@needs_arch_flags
@pytest.mark.parametrize("user_list", [None, "8.6"])
def test_setup_extensions_set_the_arch_list_before_building(no_gpu_visible, monkeypatch, user_list):
    # setup.py's _extensions() with a CUDA build forced and the extension classes recorded: it must leave
    # TORCH_CUDA_ARCH_LIST such that BuildExtension's arch flags (computed from it) work without a GPU.
    if user_list is not None:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", user_list)
    monkeypatch.setenv("PYUNLEARN_BUILD_CUDA", "1")
    monkeypatch.delenv("PYUNLEARN_BUILD_EXT", raising=False)
    monkeypatch.chdir(ROOT)  # setup.py globs its sources relative to the project root
    built = {}
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda **kw: built.setdefault("cuda", kw))
    monkeypatch.setattr(cpp_extension, "CppExtension", lambda **kw: built.setdefault("cpp", kw))
    ext_modules, _ = SETUP["_extensions"]()
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST")
    flags = get_cuda_arch_flags(ext_modules[0]["extra_compile_args"]["nvcc"])
    assert "cuda" in built and any(src.endswith(".cu") for src in built["cuda"]["sources"])
    if user_list is None:
        assert chosen == DEFAULT and SM90 in flags
    else:
        assert chosen == user_list and flags == ["-gencode=arch=compute_86,code=sm_86"]
