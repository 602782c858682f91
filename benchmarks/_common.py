"""Shared helpers of the kernel benchmarks: interleaved timing, summaries, environment, result files."""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-save", action="store_true", help="print only, write no result files")
    return p


def setup(doc: str, *, repeats: int) -> tuple[argparse.Namespace, torch.device, int]:
    """Parse the common options of a benchmark script (described by the first line of ``doc``), apply
    ``--threads``, and return (args, device, timed calls per provider: ``repeats`` unless ``--quick``
    or ``--repeats`` say otherwise)."""
    args = parser(doc.splitlines()[1]).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, torch.device(args.device), args.repeats or (3 if args.quick else repeats)


def forced(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` wrapped to run with ``PYUNLEARN_BACKEND=backend`` (the previous value restored)."""
    def run():
        old = os.environ.get("PYUNLEARN_BACKEND")
        os.environ["PYUNLEARN_BACKEND"] = backend
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("PYUNLEARN_BACKEND")
            else:
                os.environ["PYUNLEARN_BACKEND"] = old
    return run


def kernel_backends(device: torch.device) -> list[str]:
    """The compiled backends live for ``device`` (``cpp`` on CPU; ``cuda`` and ``triton`` on GPU)."""
    from pyunlearn.ops import backends

    live = backends()
    if device.type == "cpu":
        return ["cpp"] if live["cpp"] else []
    return [name for name in ("cuda", "triton") if live[name] and not (name == "triton" and live["triton_interpreter"])]


def copy_bandwidth(device: torch.device, *, nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (bytes read + bytes written): the memory-bound
    ceiling the bandwidth of the fused ops is compared with."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device, repeats=repeats)["copy"]
    return 2 * src.numel() * 4 / statistics.median(seconds) / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(providers: dict[str, Callable[[], object]], *, device: torch.device, repeats: int,
                     warmup: int = 2, setup: Optional[dict[str, Callable[[], None]]] = None) -> dict[str, list[float]]:
    """Seconds per call of each provider, timed round-robin (one call of each per round) so that drifts in
    machine load hit every provider alike. ``setup[name]`` (untimed) runs before each timed call."""
    setup = setup or {}
    for name, fn in providers.items():
        for _ in range(warmup):
            if name in setup:
                setup[name]()
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            if name in setup:
                setup[name]()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and inter-quartile range, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) >= 4:
        q1, _, q3 = statistics.quantiles(ms, n=4)
    else:
        q1, q3 = ms[0], ms[-1]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "n": len(ms)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from pyunlearn.ops import backends

    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "backends": backends(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def tag(device: torch.device) -> str:
    """File-name tag of a device: 'cpu' or the GPU model."""
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-").lower()


def write_results(name: str, device: torch.device, rows: list[dict], meta: dict,
                  threads: Optional[int] = None) -> tuple[Path, Path]:
    """``benchmarks/results/<name>-<device>-<date>.json`` (meta + rows) and ``.csv`` (rows); the device
    tag gets ``-<n>t`` when the thread count was set explicitly (``--threads``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = tag(device) + (f"-{threads}t" if threads else "")
    stem = f"{name}-{label}-{dt.date.today().isoformat()}"
    json_path, csv_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.csv"
    json_path.write_text(json.dumps({"benchmark": name, **meta, "results": rows}, indent=2) + "\n")
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
