"""How often does the demo's training die? (offline check, not part of the test suite)

Runs the demo's job (:func:`pyunlearn.pipeline.run_synthetic_demo`, no figures) for N seeds and records,
per seed, which models were dead (constant or near-constant output, or a blank segmentation of the test
set; :func:`pyunlearn.pipeline.dead_reason`) before and after the retries: a model trained from scratch (public encoder, coarse decoder, retrain,
oracle) is retried with another initialisation seed up to ``DemoConfig.dead_retries`` times, a method
that starts from the coarse model (fine-tuning, NegGrad-Seg, the certified methods) is not, and is
reported dead. A coarse model dead after its retries stops the job (:class:`DeadModelError`).

    .venv/bin/python benchmarks/dead_model_check.py                  # 100 seeds, the demo's defaults
    .venv/bin/python benchmarks/dead_model_check.py --seeds 3 --quick --out /tmp/dead.json
    .venv/bin/python benchmarks/dead_model_check.py --first 50 --seeds 50 --out b.json   # a second process

With ``--out`` the file is rewritten after every seed (``"complete": false`` until the last), so a stopped
run keeps what it checked.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyunlearn.pipeline import METHODS, DeadModelError, DemoConfig, run_synthetic_demo  # noqa: E402


def check_seed(config: DemoConfig, seed: int) -> dict:
    """``died``: what was dead at its first training (before retries); ``dead``: what stayed dead (after);
    ``retries``: the dead attempts, with their seeds and reasons."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = run_synthetic_demo(tmp, seed=seed, config=config, progress=False, figures=False)
        except DeadModelError as err:
            return {"seed": seed, "died": ["coarse"], "dead": ["coarse"], "error": str(err),
                    "wall_s": time.perf_counter() - t0}
    died, dead, retries = [], [], {}
    for name, m in report["methods"].items():
        if m.get("retries"):
            retries[name] = m["retries"]
            died += sorted({r.get("stage", name) for r in m["retries"]})
        if m.get("status") == "dead":
            dead.append(name)
            if not m.get("retries"):
                died.append(name)
    return {"seed": seed, "died": died, "dead": dead, "retries": retries, "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100, help="number of seeds (default 100)")
    p.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--quick", action="store_true", help="the --quick demo configuration")
    p.add_argument("--difficulty", choices=("easy", "hard"), default=None, help="generator (default: DemoConfig's)")
    p.add_argument("--methods", nargs="+", default=None, help=f"methods (default: all, {list(METHODS)})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        from pyunlearn.cli import _quick_config
        config = _quick_config()
    else:
        config = DemoConfig()
    # Seeded certified noise: a rerun sees the same models.
    config = dataclasses.replace(config, noise_seed=0)
    if args.difficulty:
        config = dataclasses.replace(config, difficulty=args.difficulty)
    if args.methods:
        config = dataclasses.replace(config, methods=tuple(args.methods))
    rows, totals = [], {}
    names = ["public encoder", "coarse decoder", "coarse"] + [m for m in config.methods if m != "coarse"]
    for seed in range(args.first, args.first + args.seeds):
        row = check_seed(config, seed)
        rows.append(row)
        print(f"seed {seed}: died {row['died'] or '-'}; dead after retries {row['dead'] or '-'} "
              f"({row['wall_s']:.0f} s)", flush=True)
        totals = _totals(rows, names)
        if args.out:  # after every seed, so that a stopped run keeps what it checked
            _write(args.out, config, args.quick, rows, totals, complete=len(rows) == args.seeds)
    print(f"\n{len(rows)} seeds; " + ("; ".join(f"{n}: died {t['died']}, dead after retries {t['dead']}"
                                              for n, t in totals.items()) or "no dead model"))
    return 0


def _totals(rows: list[dict], names: list[str]) -> dict:
    totals = {n: {"died": sum(n in r["died"] for r in rows), "dead": sum(n in r["dead"] for r in rows)}
              for n in names}
    return {n: t for n, t in totals.items() if t["died"] or t["dead"]}


def _write(out: Path, config: DemoConfig, quick: bool, rows: list[dict], totals: dict, *, complete: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "config": config.to_dict(), "quick": quick, "complete": complete,
                               "seeds": rows, "totals": totals}, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
