#!/usr/bin/env python
"""Certified unlearning at ISIC 2018 scale, read from disk: memory flat in the number of images, step cost.

Writes a folder data set like a user's (``images/``, ``coarse/`` for every image, ``fine/`` for 10%,
``labels.csv``; default 2,594 images at 256^2, the size of ISIC 2018 task 1) to ``--data`` (reused when it
already holds that many images of that size), then measures, on a MONAI ``BasicUNet`` (1.98M parameters,
every one certified) read through :class:`pyunlearn.data.CoarseFineFolder` and
:class:`pyunlearn.unlearn.StreamingSegmentationData`:

* ``memory``: for a tenth of the images and for all of them, a fresh process runs
  ``pyunlearn.unlearn.gradient_clipping`` (a few noisy steps) and reports its peak resident set
  (``ru_maxrss``), beside the bytes the image tensor alone takes in memory (what
  ``SegmentationUnlearningData`` needs before any feature or mask);
* ``step``: one training step on the same batch (forward, Dice + CE loss, backward, optimizer step) with
  ``GradientClipping.step()`` against ``torch.optim.Adam.step()``, interleaved rounds; and per operator step
  through the DataLoader, ``gradient_clipping`` against ``finetune`` (Adam), from two step counts.

Results: ``benchmarks/results/bench_unlearn_scale-*``.

    python benchmarks/bench_unlearn_scale.py [--quick] [--threads N] [--data DIR] [--images N] [--size S]
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

BATCH, NOISY_STEPS, EPSILON, DELTA = 4, 3, 1.0, 1e-5


def write_dataset(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """Skin-coloured images with an elliptic lesion, a ruler on a third of them; coarse = the lesion and a
    touching ruler dilated; fine masks for every tenth image. PNG files, as users have them."""
    from PIL import Image

    from pyunlearn.masks import coarsen

    marker = root / f"done-{n}-{size}"
    if marker.exists():
        return root
    for sub in ("images", "coarse", "fine"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    rows = []
    for i in range(n):
        skin = rng.uniform(0.5, 0.95, 3)
        cy, cx, ry, rx = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.08, 0.2), rng.uniform(0.08, 0.2)
        lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image = np.broadcast_to(skin, (size, size, 3)).copy()
        image[lesion] *= rng.uniform(0.3, 0.6)
        artefact = np.zeros((size, size), dtype=bool)
        if rng.random() < 1 / 3:
            row = int((cy + ry) * size) + 1
            artefact[row:row + max(2, size // 40), int(0.1 * size):int(0.9 * size)] = True
            image[artefact] = 0.15
        image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
        coarse = coarsen(torch.from_numpy(lesion | artefact), radius=max(1, size // 32)).numpy()
        name = f"img{i:05d}"
        Image.fromarray((image * 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(coarse.astype(np.uint8) * 255).save(root / "coarse" / f"{name}.png")
        if i % 10 == 0:
            Image.fromarray(lesion.astype(np.uint8) * 255).save(root / "fine" / f"{name}.png")
        rows.append((name, int(artefact.any())))
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    marker.touch()
    return root


def make_model(quick: bool) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    features = (8, 8, 16, 32, 64, 8) if quick else (32, 32, 64, 128, 256, 32)
    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=features)


def streaming_data(root: Path, n: int, workers: int):
    from pyunlearn.data import CoarseFineFolder
    from pyunlearn.unlearn import StreamingSegmentationData

    folder = CoarseFineFolder(root / "images", root / "coarse", root / "fine", labels_csv=root / "labels.csv")
    return StreamingSegmentationData(torch.utils.data.Subset(folder, range(n)), num_workers=workers)


def memory_child(args) -> None:
    """One certified run in this (fresh) process; prints its peak resident set as JSON."""
    from pyunlearn import unlearn

    torch.set_num_threads(args.threads or 2)
    t0 = time.perf_counter()
    data = streaming_data(args.data, args.images, args.workers)
    t_scan = time.perf_counter() - t0
    unlearn.gradient_clipping(make_model(args.quick), data, epsilon=EPSILON, delta=DELTA, steps=NOISY_STEPS,
                              finetune_steps=0, batch_size=BATCH, loss="dice_ce", noise_seed=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"images": args.images, "peak_rss_bytes": peak, "scan_s": t_scan,
                      "total_s": time.perf_counter() - t0}))


def memory_rows(args) -> list[dict]:
    rows = []
    for n in sorted({max(BATCH, args.images // 10), args.images}):
        cmd = [sys.executable, __file__, "--child", "--data", str(args.data), "--images", str(n), "--size",
               str(args.size), "--workers", str(args.workers)] + (["--quick"] if args.quick else []) + (
               ["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        child = json.loads(out)
        rows.append({"measure": "memory", "images": n, "peak_rss_gb": child["peak_rss_bytes"] / 1e9,
                     "image_tensor_gb": n * 3 * args.size ** 2 * 4 / 1e9, "scan_s": child["scan_s"],
                     "run_s": child["total_s"]})
    return rows


def step_rows(args, repeats: int) -> list[dict]:
    from pyunlearn import unlearn
    from pyunlearn.losses import get_loss
    from pyunlearn.optim import GradientClipping

    loss_fn = get_loss("dice_ce")
    data = streaming_data(args.data, max(4 * BATCH, min(args.images, 64)), 0)
    batch = data.batch(data.image_indices("retain")[:BATCH])
    rows = []
    models = {name: make_model(args.quick) for name in ("gradient_clipping", "adam")}
    optimizers = {
        "gradient_clipping": GradientClipping(list(models["gradient_clipping"].named_parameters()), lr=0.05, c0=1.0,
                                              c1=1.0, epsilon=EPSILON, delta=DELTA, steps=repeats + 4, seed=0),
        "adam": torch.optim.Adam(models["adam"].parameters(), lr=1e-3),
    }

    def step(name):
        def run():
            model, opt = models[name], optimizers[name]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(batch.images), batch.target, batch.retain).backward()
            opt.step()
        return run

    times = _common.time_interleaved({n: step(n) for n in models}, device=torch.device("cpu"), repeats=repeats,
                                     warmup=1)
    summary = {n: _common.summarize(t) for n, t in times.items()}
    for name, s in summary.items():
        rows.append({"measure": "training_step", "provider": name, "median_ms": s["median_ms"], "iqr_ms": s["iqr_ms"],
                     "vs_adam": s["median_ms"] / summary["adam"]["median_ms"]})

    # What users call: the operators, through the DataLoader; per step from two step counts.
    def operator(name, steps):
        model = make_model(args.quick)
        t0 = time.perf_counter()
        if name == "gradient_clipping":
            unlearn.gradient_clipping(model, data, epsilon=EPSILON, delta=DELTA, steps=steps, finetune_steps=0,
                                      batch_size=BATCH, loss="dice_ce", noise_seed=0)
        else:
            unlearn.finetune(model, data, steps=steps, batch_size=BATCH, loss="dice_ce")
        return time.perf_counter() - t0

    few, many = 1, 1 + max(2, repeats // 2)
    per_step = {}
    for name in ("gradient_clipping", "adam"):
        per_step[name] = (operator(name, many) - operator(name, few)) / (many - few)
    for name, s in per_step.items():
        rows.append({"measure": "operator_step", "provider": name, "median_ms": s * 1e3,
                     "vs_adam": s / per_step["adam"]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--quick", action="store_true", help="120 images at 64^2 and a small U-Net (smoke test)")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: a folder in the temp dir)")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.images = args.images or (120 if args.quick else 2594)
    args.size = args.size or (64 if args.quick else 256)
    args.data = args.data or Path(tempfile.gettempdir()) / f"pyunlearn-bench-scale-{args.size}"
    if args.child:
        memory_child(args)
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    write_dataset(args.data, args.images, args.size)
    print(f"data: {args.images} images at {args.size}^2 in {args.data} ({time.perf_counter() - t0:.0f} s)", flush=True)
    n_params = sum(p.numel() for p in make_model(args.quick).parameters())
    rows = memory_rows(args)
    _common.print_table(rows, ["measure", "images", "peak_rss_gb", "image_tensor_gb", "scan_s", "run_s"])
    rows += step_rows(args, args.repeats or (3 if args.quick else 8))
    _common.print_table([r for r in rows if r["measure"] != "memory"], ["measure", "provider", "median_ms", "iqr_ms",
                                                                        "vs_adam"])
    if not args.no_save:
        device = torch.device("cpu")
        meta = {"environment": _common.environment(device), "quick": args.quick, "images": args.images,
                "size": args.size, "batch_size": BATCH, "noisy_steps": NOISY_STEPS, "parameters": n_params,
                "model": "monai BasicUNet", "workers": args.workers}
        paths = _common.write_results("bench_unlearn_scale", device, rows, meta, threads=args.threads)
        print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
