"""Compiles the Triton clip/noise kernels of pyunlearn._triton.clip_noise_step for Hopper (sm_90) without a
GPU and checks their PTX for the bit-exactness contract: no fused multiply-add, float64 square roots and
divisions correctly rounded (``sqrt.rn.f64``, ``div.rn.f64``), no approximate float32 division or square
root. Prints one line per kernel and exits non-zero on a violation.

TRITON_INTERPRET must be unset (interpreted kernels are not compilable). ``python triton_noise_ptx.py``.
"""
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyunlearn._triton import clip_noise_step as cns

U32 = {f"k{i}": "u32" for i in range(8)} | {"step": "u32", "stream": "u32"}
FK = {"fk0": "u32", "fk1": "u32"}
SNAP = {"snap_h": "fp64", "snap_inv_h": "fp64", "snap_region": "fp64"}  # the release grid near 0 (rng.snap)
QB = 256  # the default BLOCK of 1024 elements

KERNELS = [
    ("pass1_model", cns._pass1_kernel,
     {"table_ptr": "*i64", "sq_ptr": "*fp32", "fp_ptr": "*fp64", "n_blocks": "i32", "lr": "fp32",
      "weight_decay": "fp32", **FK, "KIND": "constexpr", "G_DTYPE": "constexpr", "QB": "constexpr"},
     {"KIND": 2, "G_DTYPE": tl.float32, "QB": QB}),
    ("finalize", cns._finalize_kernel,
     {"sq_ptr": "*fp32", "fp_ptr": "*fp64", "n_blocks": "i32", "res_ptr": "*fp64", "e0": "fp64", "e1": "fp64",
      "HAS_NORM": "constexpr", "HAS_EXPECTED": "constexpr", "RBLOCK": "constexpr"},
     {"HAS_NORM": True, "HAS_EXPECTED": True, "RBLOCK": 1024}),
    ("finalize_new", cns._finalize_new_kernel,
     {"fp_ptr": "*fp64", "n_blocks": "i32", "res_ptr": "*fp64", "RBLOCK": "constexpr"}, {"RBLOCK": 1024}),
    *[(f"pass2_{'model' if model else 'gradient'}", cns._pass2_kernel,
       {"table_ptr": "*i64", "res_ptr": "*fp64", "fp_ptr": "*fp64", "n_blocks": "i32", "lr": "fp32",
        "max_norm": "fp32", "weight_decay": "fp32", "sigma": "fp64", **SNAP, **U32, **FK, "MODEL": "constexpr",
        "HAS_NOISE": "constexpr", "G_DTYPE": "constexpr", "QB": "constexpr"},
       {"MODEL": model, "HAS_NOISE": True, "G_DTYPE": tl.bfloat16 if model else tl.float32, "QB": QB})
      for model in (False, True)],
    ("dpsgd", cns._dpsgd_kernel,
     {"table_ptr": "*i64", "lr": "fp64", "std": "fp64", "expected_batch_size": "fp64", "weight_decay": "fp64",
      **SNAP, **U32, "G_DTYPE": "constexpr", "HAS_NOISE": "constexpr", "QB": "constexpr"},
     {"G_DTYPE": tl.float16, "HAS_NOISE": True, "QB": QB}),
    ("add_noise", cns._add_noise_kernel, {"table_ptr": "*i64", "sigma": "fp64", **SNAP, **U32, "QB": "constexpr"},
     {"QB": QB}),
    ("gaussian_noise", cns._gaussian_noise_kernel,
     {"out_ptr": "*fp64", "numel": "i64", "offset": "i64", "first": "i64", **U32, "QB": "constexpr"}, {"QB": QB}),
]

# Float64 ops the noise needs, per kernel drawing noise (the others need none of them).
NOISY = {"pass2_gradient", "pass2_model", "dpsgd", "add_noise", "gaussian_noise"}
FORBIDDEN = re.compile(r"\b(fma\.rn\.f(32|64)|mad\.rn?\.?f(32|64)|div\.(approx|full)\.f32|sqrt\.approx\.f(32|64)|"
                       r"(ex2|lg2|sin|cos)\.approx)")


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for name, fn, signature, constexprs in KERNELS:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                options={"num_warps": 4, "enable_fp_fusion": False})
        ptx = kernel.asm["ptx"]
        bad = sorted({m.group(0) for m in FORBIDDEN.finditer(ptx)})
        missing = [op for op in ("sqrt.rn.f64", "div.rn.f64") if name in NOISY and op not in ptx]
        status = "ok" if not bad and not missing else f"FORBIDDEN {bad} MISSING {missing}"
        failures += status != "ok"
        print(f"{name}: {status}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
