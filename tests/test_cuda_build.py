"""The CUDA kernels compile, here too: CI and most development machines have no GPU (and a CPU build of
torch), so this is the check that keeps csrc/pyunlearn/cuda/ buildable between GPU sessions. Their
behaviour is tested on a GPU by the backend-parametrised op tests (backend "cuda").

Each .cu file is compiled to device code for Hopper (sm_90) with the nvcc flags of setup.py, and
bindings.cpp with the CUDA entry points enabled; a small kernel is compiled for every target of the
default architecture list (what setup.py builds when no GPU is visible). Skipped where nvcc is not
installed.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "pyunlearn" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed")


def _setup_constant(name: str):
    """A constant as written in setup.py (read, not executed: importing setup.py would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _setup_nvcc_flags() -> list[str]:
    return list(_setup_constant("NVCC_FLAGS"))


def _default_arch_flags(monkeypatch) -> list[str]:
    """The -gencode flags torch's BuildExtension derives from setup.py's default architecture list."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", _setup_constant("DEFAULT_CUDA_ARCH_LIST"))
    return cpp_extension._get_cuda_arch_flags()


def _includes(stub_dir: Path) -> list[str]:
    # A CPU build of torch ships the c10/cuda headers but not the one CMake generates for CUDA builds.
    stub = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    paths = cpp_extension.include_paths() + [str(stub_dir), sysconfig.get_paths()["include"]]
    return [f"-I{p}" for p in paths]


def _abi_flag() -> str:
    import torch

    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_setup_builds_cuda_without_fast_math():
    flags = _setup_nvcc_flags()
    assert "--fmad=false" in flags and not any("fast_math" in f or "fast-math" in f for f in flags)


def test_default_arch_list_compiles(tmp_path, monkeypatch):
    # What a build without a visible GPU uses (setup.py's DEFAULT_CUDA_ARCH_LIST): every target compiles with
    # this toolkit and setup.py's flags. A small cub kernel stands in for the sources (they take minutes per
    # target here; test_cuda_sources_and_bindings_compile builds them for sm_90, one of these targets).
    flags = _default_arch_flags(monkeypatch)
    assert "-gencode=arch=compute_90,code=sm_90" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    src = tmp_path / "block_sums.cu"
    src.write_text("#include <cub/block/block_reduce.cuh>\n"
                   "__global__ void block_sums(const float* x, float* out) {\n"
                   "  using Reduce = cub::BlockReduce<float, 256>;\n"
                   "  __shared__ typename Reduce::TempStorage storage;\n"
                   "  float s = Reduce(storage).Sum(x[blockIdx.x * 256 + threadIdx.x]);\n"
                   "  if (threadIdx.x == 0) out[blockIdx.x] = s;\n"
                   "}\n")
    keep = tmp_path / "keep"
    keep.mkdir()
    res = _run([NVCC, "-c", str(src), "-o", str(tmp_path / "block_sums.o"), "-keep", "-keep-dir", str(keep)]
               + cpp_extension.COMMON_NVCC_FLAGS + _setup_nvcc_flags() + flags)
    assert res.returncode == 0, res.stderr[-4000:]
    targets = {line.split()[1] for ptx in keep.glob("*.ptx") for line in ptx.read_text().splitlines()
               if line.startswith(".target")}
    archs = {f"sm_{f.rsplit('_', 1)[1]}" for f in flags if ",code=sm_" in f}
    assert archs == {"sm_80", "sm_90"} and archs <= {t.rstrip(",") for t in targets}
    assert len(list(keep.glob("*.cubin"))) == len(archs)  # one machine-code image per sm_ target


def test_cuda_sources_and_bindings_compile(tmp_path, monkeypatch):
    assert CUDA_SOURCES, "no CUDA sources under csrc/pyunlearn/cuda"
    assert "-gencode=arch=compute_90,code=sm_90" in _default_arch_flags(monkeypatch)  # the target built here
    includes = _includes(tmp_path / "stub")
    common = cpp_extension.COMMON_NVCC_FLAGS + _setup_nvcc_flags() + [_abi_flag(), "-Xcompiler", "-fPIC",
                                                                     "-gencode", "arch=compute_90,code=sm_90"]
    commands = [[NVCC, "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o")] + common + includes
                for src in CUDA_SOURCES]
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is not None:
        commands.append([cxx, "-fsyntax-only", "-std=c++20", "-DPYUNLEARN_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
                         _abi_flag(), *includes, str(ROOT / "csrc" / "pyunlearn" / "bindings.cpp")])
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run, commands))
    failures = [f"$ {' '.join(cmd[:3])} ...\n{res.stderr[-4000:]}" for cmd, res in zip(commands, results)
                if res.returncode != 0]
    assert not failures, "\n\n".join(failures)
    for src in CUDA_SOURCES:
        assert (tmp_path / f"{src.stem}.o").stat().st_size > 0


def test_registry_calls_only_bound_cuda_kernels():
    # The CUDA entry points cannot be imported without a CUDA build, so check by name: every
    # ``cuda_<name>`` the registry calls is bound in bindings.cpp, next to its CPU twin ``<name>`` if any.
    bindings = (ROOT / "csrc" / "pyunlearn" / "bindings.cpp").read_text()
    registry = (ROOT / "pyunlearn" / "ops" / "_registry.py").read_text()
    bound = set(re.findall(r'm\.def\(\s*"(\w+)"', bindings))
    cuda_bound = {name for name in bound if name.startswith("cuda_")}
    used = {f"cuda_{name}" for name in re.findall(r'_compiled\(\w+, "(\w+)"\)', registry)}
    used |= set(re.findall(r"\.(cuda_\w+)\(", registry))
    assert used and used <= cuda_bound, used - cuda_bound
    cuda_only = {"per_sample_sq_norms"}  # op 3 has no C++ CPU kernel (ATen's grouped convolution serves)
    assert {name[len("cuda_"):] for name in cuda_bound} - cuda_only <= bound - cuda_bound
