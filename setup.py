"""Builds the optional compiled extension ``pyunlearn._C``.

The C++ CPU kernels are always built. The CUDA kernels are added only when a CUDA toolkit and a CUDA
build of torch are both present. ``PYUNLEARN_BUILD_EXT=0`` skips the extension entirely (the pure
PyTorch reference then runs); ``PYUNLEARN_BUILD_CUDA=0|1`` skips or forces the CUDA part.
"""
import glob
import os

from setuptools import find_packages, setup

# NOTE: no fast math and no FMA contraction: the CUDA step kernels round every operation like the
# separate PyTorch ops of the reference (bit-exact at sigma = 0), and the noise keeps IEEE log/sin/cos.
# tests/test_cuda_build.py compiles the CUDA sources with these flags, also on machines without a GPU.
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false"]


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
