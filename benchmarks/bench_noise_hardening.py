#!/usr/bin/env python
"""What the hardened noise costs: the old sampler's fused step beside the new one, side by side in one run.

Old: the session-2 build of ``pyunlearn._C`` (Philox4x32-10, float32 Box-Muller from 32-bit uniforms).
New: the current build (ChaCha20, float64 Box-Muller from 128-bit uniforms, centre + noise rounded once,
keyed fingerprint in the norm and update passes). Both run ``gradient_clipping_step_`` on the same
parameter list (about 4.5M float32 elements in 46 tensors) and generate noise alone; the unfused PyTorch
sequence (``torch._foreach_*`` + ``torch.randn``) is timed in the same rounds as a fixed yardstick.

The old build is not part of the tree: build it once from the commit before the noise change and pass the
``.so`` (``git worktree add /tmp/old 12a42a3 && cd /tmp/old && python setup.py build_ext --inplace``):

    python benchmarks/bench_noise_hardening.py --old-extension /tmp/old/pyunlearn/_C.cpython-311-x86_64-linux-gnu.so [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from bench_clip_noise_step import CLIP, LR, SIGMA, WD, make_shapes, torch_providers  # noqa: E402

from pyunlearn.ops import _extension, rng  # noqa: E402


def load_old(path: str):
    loader = importlib.machinery.ExtensionFileLoader("_C", path)
    spec = importlib.util.spec_from_file_location("_C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    if getattr(module, "ABI_VERSION", None) != 1:
        raise SystemExit(f"{path} is not the old (ABI 1, Philox) build")
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-extension", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old, new = load_old(args.old_extension), _extension.load()
    if new is None:
        raise SystemExit("the current pyunlearn._C is not built")
    device = torch.device("cpu")
    shapes = make_shapes(4_194_304)
    numel = sum(torch.Size(s).numel() for s in shapes)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) * 0.01 for s in shapes]
    base = [torch.randn(s, generator=g) * 0.05 for s in shapes]
    old_ps, new_ps, torch_ps = ([p.clone() for p in base] for _ in range(3))
    key = rng.key_from_seed(1234, "bench")
    providers = {
        "old_step": lambda: old.gradient_clipping_step_(old_ps, grads, LR, CLIP, WD, SIGMA, 1234, 0),
        "new_step": lambda: new.gradient_clipping_step_(new_ps, grads, LR, CLIP, WD, SIGMA, key, 0, [1, 2], []),
        "old_noise": lambda: old.gaussian_noise(numel, 1234, 0, 0, 0),
        "new_noise": lambda: new.gaussian_noise(numel, key, 0, 0, 0),
        "torch_foreach": torch_providers("gradient_clipping_step_", torch_ps, grads)["torch_foreach"],
    }
    times = _common.time_interleaved(providers, device=device, repeats=args.repeats)
    rows = []
    medians = {name: _common.summarize(t)["median_ms"] for name, t in times.items()}
    for name, seconds in times.items():
        s = _common.summarize(seconds)
        row = {"provider": name, "params": numel, **s, "vs_foreach": medians["torch_foreach"] / s["median_ms"]}
        if name.endswith("noise"):
            bytes_out = (4 if name.startswith("old") else 8) * numel
            row.update(normals_per_s=numel / (s["median_ms"] * 1e-3), gb_per_s=bytes_out / (s["median_ms"] * 1e-3) / 1e9)
        rows.append(row)
    rows.append({"provider": "hardening_cost_step", "ratio": medians["new_step"] / medians["old_step"]})
    rows.append({"provider": "hardening_cost_noise", "ratio": medians["new_noise"] / medians["old_noise"]})
    _common.print_table(rows, ["provider", "params", "median_ms", "iqr_ms", "vs_foreach", "normals_per_s",
                               "gb_per_s", "ratio"])
    if not args.no_save:
        meta = {"environment": _common.environment(device), "repeats": args.repeats,
                "old_extension": "ABI 1 build of commit 12a42a3 (Philox, float32 Box-Muller)"}
        print("wrote", *_common.write_results("bench_noise_hardening", device, rows, meta, threads=args.threads))


if __name__ == "__main__":
    main()
