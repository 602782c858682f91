"""Builds the optional compiled extension ``pyunlearn._C``.

The C++ CPU kernels are always built. The CUDA kernels are added only when a CUDA toolkit and a CUDA
build of torch are both present. ``PYUNLEARN_BUILD_EXT=0`` skips the extension entirely (the pure
PyTorch reference then runs); ``PYUNLEARN_BUILD_CUDA=0|1`` skips or forces the CUDA part.

GPU architectures: ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0+PTX"``, torch's syntax) is always respected.
When it is unset and a GPU is visible, torch builds for the visible GPUs. When it is unset and no GPU
is visible (a build node, a container build, a cluster login node, ``CUDA_VISIBLE_DEVICES=""``), torch
would fail (IndexError in ``_get_cuda_arch_flags``), so this build uses :data:`DEFAULT_CUDA_ARCH_LIST`,
``"8.0;9.0+PTX"``: sm_80 machine code runs on every Ampere and Ada GPU (A100, A10, L4, L40, RTX 30/40;
compute capability 8.x is binary compatible within its major version), sm_90 on Hopper (H100, H200),
and the compute_90 PTX is compiled by the driver on newer GPUs (Blackwell). Every CUDA toolkit from
11.8 to 13.x supports both. Turing (T4, 7.5) or older needs an explicit list, e.g.
``TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0+PTX"``.
"""
import glob
import os

from setuptools import find_packages, setup

# NOTE: no fast math and no FMA contraction: the CUDA step kernels round every operation like the
# separate PyTorch ops of the reference (bit-exact at sigma = 0), and the noise keeps IEEE log/sin/cos.
# tests/test_cuda_build.py compiles the CUDA sources with these flags, also on machines without a GPU.
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false"]

#: GPU architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (see the docstring).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cuda_arch_list(env, device_count):
    """The TORCH_CUDA_ARCH_LIST to set before building, or None to leave torch's choice alone: the default
    list when the variable is unset (or blank) and no GPU is visible, where torch's detection fails."""
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip() or device_count > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def _flag(name, default=None):
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _extensions():
    if not _flag("PYUNLEARN_BUILD_EXT", True):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/pyunlearn/*.cpp"))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/pyunlearn/cuda/*.cu"))
    want_cuda = _flag("PYUNLEARN_BUILD_CUDA", None)
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    use_cuda = bool(cuda_sources) and (have_cuda if want_cuda is None else want_cuda)
    # -fno-math-errno / -fno-trapping-math let the compiler vectorise sqrt and if-convert selects in the
    # kernel loops (errno and FP exception flags are never read there; IEEE results are unchanged).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    kwargs = dict(
        name="pyunlearn._C",
        extra_compile_args={"cxx": cxx + (["-DPYUNLEARN_WITH_CUDA"] if use_cuda else [])},
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        arch_list = cuda_arch_list(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if arch_list is not None:
            print(f"pyunlearn: no GPU visible, building the CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list!r} "
                  "(set TORCH_CUDA_ARCH_LIST to choose)")
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        kwargs["extra_compile_args"]["nvcc"] = list(NVCC_FLAGS)
        ext = CUDAExtension(sources=sources + cuda_sources, **kwargs)
    else:
        ext = CppExtension(sources=sources, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["pyunlearn", "pyunlearn.*"]) + ["pyunlearn._triton"],
    package_dir={"pyunlearn._triton": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
