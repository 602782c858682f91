#!/usr/bin/env python
"""One DP-SGD training step of a small convolutional decoder, four providers side by side.

Providers (same decoder, data, clip norm C, noise multiplier and learning rate):

* ``nonprivate``  plain ``torch.optim.SGD`` on the mean loss (the reference cost);
* ``pyunlearn``   ``PerSampleGradients`` (book-keeping) + ``pyunlearn.optim.DPSGD``;
* ``torch_func``  ``torch.func.vmap(grad(...))`` per-sample gradients + manual clip / noise / update;
* ``opacus``      ``opacus.GradSampleModule`` + ``opacus.optimizers.DPOptimizer`` (Poisson sampling off).

Each provider lives in its own spawned process; the timing rounds are interleaved across providers
(round-robin) so drifts in machine load hit all of them alike. Reported per provider: median step time
and inter-quartile range over all timed steps, the ratio to the non-private step, the fastest step
(the least disturbed by other load on a shared machine), the median process CPU time, and peak memory:
on CUDA ``torch.cuda.max_memory_allocated`` above the memory held before the first step; on CPU the
peak resident set size (``ru_maxrss``) above the resident size before the first step (includes
allocator caching; approximate). Results go to
``benchmarks/results/bench_dpsgd_step-<device>[-t<threads>]-<date>.json`` and ``.csv``.

On a shared machine, OpenMP with several threads is very sensitive to other load (every parallel
region waits for all its threads to be scheduled), which inflates every provider by the number of
parallel regions rather than by its arithmetic; compare ``--threads 1`` and the ``min`` column there.

    python benchmarks/bench_dpsgd_step.py            # full run
    python benchmarks/bench_dpsgd_step.py --quick    # a few steps (smoke test)
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

PROVIDERS = ("nonprivate", "pyunlearn", "torch_func", "opacus")
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------ workload
def make_decoder(channels: int, layers: int):
    """``layers`` 3x3 convolutions channels -> channels with ReLU, then a 1x1 convolution to one logit."""
    from torch import nn

    body = []
    for _ in range(layers):
        body += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*body, nn.Conv2d(channels, 1, 1))


def per_sample_loss(logits, target):
    """(B,) mean pixel binary cross-entropy of each sample."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def build(provider: str, cfg: dict):
    """Model, data and a ``step()`` closure for one provider."""
    import torch

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    model = make_decoder(cfg["channels"], cfg["layers"]).to(device)
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["size"], cfg["size"], device=device)
    target = (torch.rand(cfg["batch"], 1, cfg["size"], cfg["size"], device=device) > 0.5).float()
    lr, c, sigma, batch = cfg["lr"], cfg["max_grad_norm"], cfg["noise_multiplier"], cfg["batch"]

    if provider == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def step():
            opt.zero_grad(set_to_none=True)
            per_sample_loss(model(x), target).mean().backward()
            opt.step()

    elif provider == "pyunlearn":
        from pyunlearn.optim.dpsgd import DPSGD
        from pyunlearn.per_sample import PerSampleGradients

        psg = PerSampleGradients(model, loss_reduction="mean")
        opt = DPSGD(model.parameters(), lr=lr, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=batch,
                    seed=0)

        def step():
            opt.zero_grad(set_to_none=True)
            per_sample_loss(model(x), target).mean().backward()
            psg.clipped_sum_(c)
            opt.step()

    elif provider == "torch_func":
        from torch.func import functional_call, grad, vmap

        params = dict(model.named_parameters())

        def loss_one(p, xi, ti):
            return per_sample_loss(functional_call(model, p, (xi[None],)), ti[None]).sum()

        per_sample_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
        gen = torch.Generator(device=device).manual_seed(0)

        def step():
            detached = {k: v.detach() for k, v in params.items()}
            grads = per_sample_grad(detached, x, target)
            norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
            factor = (c / (norms + 1e-6)).clamp(max=1.0)
            with torch.no_grad():
                for k, p in params.items():
                    summed = torch.einsum("b,b...->...", factor, grads[k])
                    noise = torch.normal(0.0, sigma * c, size=p.shape, device=device, generator=gen)
                    p.sub_(lr * (summed + noise) / batch)

    elif provider == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=c,
                          expected_batch_size=batch, loss_reduction="mean")

        def step():
            opt.zero_grad(set_to_none=True)
            per_sample_loss(gsm(x), target).mean().backward()
            opt.step()

    else:
        raise ValueError(f"unknown provider {provider!r}")
    return step


# ------------------------------------------------------------------------------------ workers
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def worker(provider: str, cfg: dict, conn) -> None:
    """Serve commands: ('run', n) -> list of step seconds; ('memory',) -> peak bytes or None; ('stop',)."""
    warnings.filterwarnings("ignore")
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"].startswith("cuda")
    try:
        step = build(provider, cfg)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_bytes()
        for _ in range(cfg["warmup"]):
            step()
        if cuda:
            torch.cuda.synchronize()
        conn.send(("ready", None))
    except Exception as exc:  # report and leave
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        cmd = conn.recv()
        if cmd[0] == "run":
            times = []
            for _ in range(cmd[1]):
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                if cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0, time.process_time() - c0))
            conn.send(("times", times))
        elif cmd[0] == "memory":
            if cuda:
                conn.send(("memory", torch.cuda.max_memory_allocated() - base))
            elif base is not None and sys.platform.startswith("linux"):
                conn.send(("memory", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base))
            else:
                conn.send(("memory", None))
        else:
            return


# ------------------------------------------------------------------------------------ driver
def device_info(device: str) -> tuple[str, str]:
    """(human-readable device name, file-name tag)."""
    import torch

    import _common

    dev = torch.device(device)
    return _common.device_name(dev), _common.tag(dev)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps: a smoke test, not a measurement")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 15, quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3, quick 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-save", action="store_true", help="print only, write no result files")
    args = ap.parse_args(argv)

    import torch

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    rounds = args.rounds or (2 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 3)
    cfg = dict(device=device, batch=args.batch, channels=args.channels, size=args.size, layers=args.layers,
               lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0, warmup=1 if args.quick else 3,
               threads=args.threads)

    ctx = mp.get_context("spawn")
    workers = {}
    for name in providers:  # started one at a time: each warms up alone
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, cfg, child), daemon=True)
        proc.start()
        status, detail = parent.recv()
        if status != "ready":
            print(f"{name}: failed to start ({detail})", file=sys.stderr)
            proc.join()
            continue
        workers[name] = (proc, parent)
    times: dict[str, list[float]] = {name: [] for name in workers}
    cpu_times: dict[str, list[float]] = {name: [] for name in workers}
    for _ in range(rounds):
        for name, (_, conn) in workers.items():
            conn.send(("run", steps))
            for wall, cpu in conn.recv()[1]:
                times[name].append(wall)
                cpu_times[name].append(cpu)
    memory = {}
    for name, (proc, conn) in workers.items():
        conn.send(("memory",))
        memory[name] = conn.recv()[1]
        conn.send(("stop",))
        proc.join()

    device_name, tag = device_info(device)
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None
    base = statistics.median(times["nonprivate"]) if "nonprivate" in times else None
    cpu_base = statistics.median(cpu_times["nonprivate"]) if "nonprivate" in times else None
    rows = []
    for name in workers:
        q1, med, q3 = quartiles(times[name])
        cq1, cmed, cq3 = quartiles(cpu_times[name])
        rows.append(dict(provider=name, median_ms=1e3 * med, q1_ms=1e3 * q1, q3_ms=1e3 * q3, iqr_ms=1e3 * (q3 - q1),
                         min_ms=1e3 * min(times[name]), ratio_to_nonprivate=med / base if base else None,
                         min_ratio_to_nonprivate=(min(times[name]) / min(times["nonprivate"])
                                                  if "nonprivate" in times else None),
                         cpu_median_ms=1e3 * cmed, cpu_iqr_ms=1e3 * (cq3 - cq1),
                         cpu_ratio_to_nonprivate=cmed / cpu_base if cpu_base else None, n_steps=len(times[name]),
                         peak_memory_mb=memory[name] / 2**20 if memory[name] is not None else None))
    by_name = {r["provider"]: r for r in rows}
    both = {"opacus", "pyunlearn"} <= by_name.keys()
    speedup = by_name["opacus"]["median_ms"] / by_name["pyunlearn"]["median_ms"] if both else None
    min_speedup = by_name["opacus"]["min_ms"] / by_name["pyunlearn"]["min_ms"] if both else None
    cpu_speedup = by_name["opacus"]["cpu_median_ms"] / by_name["pyunlearn"]["cpu_median_ms"] if both else None
    today = dt.date.today().isoformat()
    report = dict(
        benchmark="bench_dpsgd_step", date=today, timestamp=dt.datetime.now().isoformat(timespec="seconds"),
        device=device, device_name=device_name, torch=torch.__version__, opacus=opacus_version,
        python=platform.python_version(), threads=args.threads or torch.get_num_threads(), quick=args.quick,
        config=dict(cfg, rounds=rounds, steps_per_round=steps,
                    model=f"{args.layers} x Conv2d({args.channels},{args.channels},3,pad 1)+ReLU, Conv2d("
                          f"{args.channels},1,1); input ({args.batch},{args.channels},{args.size},{args.size})"),
        memory_note=("torch.cuda.max_memory_allocated above the allocation before the first step"
                     if device.startswith("cuda") else
                     "peak RSS (ru_maxrss) above the RSS before the first step, per provider process; approximate"),
        timing_note=("wall: perf_counter per step; cpu: process CPU time per step (all threads; less sensitive "
                     "to other load on a shared machine, but counts OpenMP spin-waiting)"),
        load_average_before=load_before, load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
        results=rows, speedup_pyunlearn_vs_opacus=speedup, cpu_speedup_pyunlearn_vs_opacus=cpu_speedup,
        min_speedup_pyunlearn_vs_opacus=min_speedup,
        target="DP-SGD decoder step >= 1.5x faster than Opacus (CPU, 2 cores)",
    )
    if args.threads:
        tag += f"-t{args.threads}"
    stem = args.out / f"bench_dpsgd_step-{tag}-{today}"
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            meta = dict(date=today, device=device_name, torch=torch.__version__, opacus=opacus_version,
                        threads=report["threads"], quick=args.quick)
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(meta))
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, **meta})

    print(f"{device_name}; torch {torch.__version__}, opacus {opacus_version}, threads {report['threads']}")
    print(f"{'provider':<12}{'median ms':>11}{'IQR ms':>9}{'x nonpriv':>11}{'min ms':>9}{'min x':>7}"
          f"{'cpu ms':>9}{'cpu x':>7}{'peak MiB':>10}")

    def fmt(v):
        return f"{v:.2f}" if v else "-"

    for r in rows:
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        print(f"{r['provider']:<12}{r['median_ms']:>11.1f}{r['iqr_ms']:>9.1f}{fmt(r['ratio_to_nonprivate']):>11}"
              f"{r['min_ms']:>9.1f}{fmt(r['min_ratio_to_nonprivate']):>7}{r['cpu_median_ms']:>9.1f}"
              f"{fmt(r['cpu_ratio_to_nonprivate']):>7}{mem:>10}")
    if speedup:
        print(f"pyunlearn vs opacus: {speedup:.2f}x (median wall), {min_speedup:.2f}x (min wall), "
              f"{cpu_speedup:.2f}x (median CPU time); target >= 1.5x")
    if not args.no_save:
        print(f"wrote {stem}.json and .csv")
    return report


if __name__ == "__main__":
    main()
