"""Sample-efficiency sweep of the synthetic main job: ``pyunlearn sweep``.

::

    pyunlearn sweep --out DIR [--fractions 0.02 0.05 0.1 0.25] [--seeds 0 1 2] [--methods ...] [--image-size N]
                    [--quick] [--device cpu|cuda] [--threads N] [--jobs N] [--no-progress] [--noise-seed N]
                    [--checkpoint-dir DIR]

For every cell (fine fraction ``f``, data seed ``s``) it runs the main job of ``pyunlearn demo``
(:func:`pyunlearn.pipeline.run_synthetic_demo`) with ``DemoConfig(fine_fraction=f)`` and writes

* ``DIR/cells/fraction-<f>/seed-<s>/``: that cell's report (report.json, report.md, figures) and
  ``cell.json`` (the configuration it ran with and its status). A cell folder appears only when the cell is
  complete (it is written under a temporary name, then renamed), so rerunning an interrupted sweep skips
  the complete cells and runs the others. A rerun whose configuration differs from that of a complete cell
  (other methods, steps, noise seed, device, ...) is refused before any training, with the differences
  listed: give it another ``--out``, or delete the cells it names. A cell depends only on its own
  fraction and seed, so a rerun may add fractions or seeds, or report a sub-grid; cells of the folder outside
  the requested grid are left alone and not reported.
* ``DIR/sweep.json``: the configuration, every cell's per-method metrics (AUROC, worst-group AUROC, Dice,
  S_global, wall time, certificate epsilon/delta) and, per method and fraction, the mean, std and n over
  seeds of each metric. Dead models (constant outputs or blank segmentations; see
  :func:`pyunlearn.pipeline.dead_reason`) are recorded as dead with their reason and counted, never averaged
  in. A cell whose coarse model stayed dead after its retries (:class:`pyunlearn.pipeline.DeadModelError`) is
  complete and dead for every method. A cell that failed otherwise is listed as failed and rerun by the next
  call.
* ``DIR/sweep.md``: one table per metric (rows: methods, columns: fractions, cells: mean ± std (n)) and the
  dead or failed cells.
* ``DIR/sweep.png``: worst-group AUROC against the fine fraction (log axis), one line per method, shaded by
  the spread over seeds (mean ± std with 3 or more seeds per point, min-max otherwise; the legend says which).

Noise: without ``--noise-seed`` every certified model gets a secret key from the OS. With ``--noise-seed N``
each cell gets its own noise seed derived from ``(N, fraction, seed)`` (:func:`cell_noise_seed`), so no two
released models of the sweep share noise, not even two cells with the same data seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError

__all__ = ["run_sweep", "add_arguments", "main", "cell_noise_seed", "cell_dir", "aggregate", "cell_metrics",
           "FRACTIONS", "SEEDS", "METRICS"]

FRACTIONS = (0.02, 0.05, 0.1, 0.25)
SEEDS = (0, 1, 2)
#: The metrics aggregated over seeds (``epsilon``/``delta`` from the certificate, where there is one).
METRICS = ("auroc", "worst_group_auroc", "dice", "s_global", "wall_s", "epsilon", "delta")
_TITLES = {"auroc": "AUROC", "worst_group_auroc": "worst-group AUROC", "dice": "Dice", "s_global": "S_global",
           "wall_s": "wall time (s)", "epsilon": "certificate epsilon", "delta": "certificate delta"}
_DIGITS = {"s_global": 4, "wall_s": 1}
#: Version of cell.json; a cell of another version is not reused.
_CELL_FORMAT = 1
_PARTIAL = ".partial"


def _all_methods() -> tuple:
    from .pipeline import METHODS

    return METHODS + ("psg_segmentation",)


def fraction_label(fraction: float) -> str:
    """The exact spelling of ``fraction`` in folder names and sweep.json keys (``repr`` of the float)."""
    return repr(float(fraction))


def cell_dir(out_dir: str | Path, fraction: float, seed: int) -> Path:
    return Path(out_dir) / "cells" / f"fraction-{fraction_label(fraction)}" / f"seed-{int(seed)}"


def cell_noise_seed(noise_seed: Optional[int], fraction: float, seed: int) -> Optional[int]:
    """The noise seed of cell ``(fraction, seed)``: None stays None (secret keys); otherwise
    :func:`pyunlearn.pipeline.job_noise_seed` of a cell-specific integer (a hash of the fraction and the data
    seed), so every cell, not only every data seed, has its own key. The pipeline then derives each
    operator's key from it and the data seed."""
    from .pipeline import job_noise_seed

    if noise_seed is None:
        return None
    digest = hashlib.sha256(f"pyunlearn/sweep-cell/v1\0{fraction_label(fraction)}\0{int(seed)}".encode()).digest()
    return job_noise_seed(noise_seed, int.from_bytes(digest[:8], "little") % 2**63)


def _normalise(obj):
    """JSON round trip: tuples become lists, so recorded and current configurations compare equal."""
    return json.loads(json.dumps(obj))


def _cell_identity(config, seed: int, device: str) -> dict:
    """What a complete cell must have run with to be reused."""
    return _normalise({"format": _CELL_FORMAT, "seed": int(seed), "device": device, "config": config.to_dict()})


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} (complete cell) vs {b!r} (now)")
    return out


def _read_cell(path: Path) -> Optional[dict]:
    """The cell.json of a complete cell, or None when the cell is missing."""
    file = path / "cell.json"
    if not path.is_dir():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a complete sweep cell ({exc}); delete the folder to rerun the cell") \
            from None


def cell_metrics(report: dict) -> dict:
    """The per-method metrics of one cell report: the numbers of :data:`METRICS` (``None`` when absent),
    or ``{"status": "dead", "reason": ...}`` for a dead method."""
    out = {}
    for name, m in report["methods"].items():
        if m.get("status") == "dead":
            out[name] = {"status": "dead", "reason": m.get("reason", "constant output"), "wall_s": m.get("wall_s")}
            continue
        cert = m.get("certificate") or {}
        row = {"status": "ok"}
        for key in ("auroc", "worst_group_auroc", "dice", "s_global", "wall_s"):
            value = m.get(key)
            row[key] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        row["epsilon"] = cert.get("epsilon")
        row["delta"] = cert.get("delta")
        row["seeded_noise"] = cert.get("seeded") if cert else None
        row["retries"] = len(m.get("retries") or [])
        out[name] = row
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "min": min(values), "max": max(values)}


def aggregate(cells: list[dict], fractions: Sequence[float], methods: Sequence[str]) -> dict:
    """Per method and fraction label: each metric's mean, std (sample, None for n = 1), n, min and max over
    the cells whose method is alive, plus ``n_dead`` with ``dead_seeds`` and ``n_failed``. Dead methods and
    failed cells contribute no numbers."""
    summary: dict = {}
    for name in methods:
        per_fraction = {}
        for fraction in fractions:
            label = fraction_label(fraction)
            here = [c for c in cells if fraction_label(c["fraction"]) == label]
            alive = [c["methods"][name] for c in here if c["status"] == "ok"
                     and c["methods"].get(name, {}).get("status") == "ok"]
            dead = [c["seed"] for c in here if c["status"] == "dead"
                    or (c["status"] == "ok" and c["methods"].get(name, {}).get("status") == "dead")]
            row = {}
            for key in METRICS:
                values = [m[key] for m in alive if m.get(key) is not None]
                if values:
                    row[key] = _stats(values)
            row["n_ok"] = len(alive)
            row["n_dead"] = len(dead)
            row["dead_seeds"] = dead
            row["n_failed"] = sum(c["status"] == "failed" for c in here)
            per_fraction[label] = row
        summary[name] = per_fraction
    return summary


def _format_stat(stat: Optional[dict], key: str) -> str:
    if not stat:
        return "-"
    d = _DIGITS.get(key, 3)
    fmt = (lambda v: f"{v:.1e}") if key == "delta" else (lambda v: f"{v:.{d}f}")
    spread = f" ± {fmt(stat['std'])}" if stat["std"] is not None else ""
    return f"{fmt(stat['mean'])}{spread} ({stat['n']})"


def _markdown(result: dict) -> str:
    fractions = result["config"]["fractions"]
    labels = [fraction_label(f) for f in fractions]
    n_fine = result["config"]["n_fine"]
    summary = result["summary"]
    lines = ["# pyunlearn sweep: sample efficiency", "",
             f"The main job per fine fraction (columns; fine-mask images of the {result['config']['n_private']} "
             f"private ones in brackets) and data seed {result['config']['seeds']}. Cells: mean ± std (n) over the "
             "seeds whose model is alive (sample std; none for n = 1). Dead models are left out and listed below.",
             ""]
    header = "| method | " + " | ".join(f"{lab} ({n_fine[lab]})" for lab in labels) + " |"
    for key in METRICS:
        if not any(key in summary[m][lab] for m in summary for lab in labels):
            continue  # e.g. no certified method: no epsilon table
        lines += [f"## {_TITLES[key]}", "", header, "|" + "---|" * (len(labels) + 1)]
        for name, row in summary.items():
            if key in ("epsilon", "delta") and not any(key in row[lab] for lab in labels):
                continue  # no certificate: no row in the certificate tables
            cells = []
            for lab in labels:
                text = _format_stat(row[lab].get(key), key)
                if row[lab]["n_dead"]:
                    text += f"; {row[lab]['n_dead']} dead"
                cells.append(text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    trouble = []
    for c in result["cells"]:
        where = f"fraction {fraction_label(c['fraction'])}, seed {c['seed']}"
        if c["status"] in ("dead", "failed"):
            trouble.append(f"- {where}: **{c['status']}** (whole cell): {c.get('reason')}")
        elif c["status"] == "ok":
            trouble += [f"- {where}: `{name}` **dead**: {m.get('reason')}" for name, m in c["methods"].items()
                        if m.get("status") == "dead"]
    lines += ["## Dead or failed cells", ""] + (trouble or ["None."]) + [""]
    if result.get("figure"):
        lines += [f"![worst-group AUROC against fine fraction]({result['figure']})", "",
                  result.get("figure_caption", ""), ""]
    lines += ["## Configuration", "", "```json", json.dumps(result["config"], indent=2), "```", ""]
    return "\n".join(lines)


def _figure(result: dict, path: Path) -> Optional[str]:
    """Worst-group AUROC against the fine fraction, one line per method, shaded by the seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = result["config"]["fractions"]
    summary = result["summary"]
    points = {name: [(f, row[fraction_label(f)]["worst_group_auroc"]) for f in fractions
                     if "worst_group_auroc" in row[fraction_label(f)]] for name, row in summary.items()}
    ns = [s["n"] for pts in points.values() for _, s in pts]
    if not ns:
        return None
    use_std = min(ns) >= 3
    band = "mean ± std over seeds" if use_std else "min-max over seeds (fewer than 3 per point)"
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, pts in points.items():
        if not pts:
            continue
        xs = [f for f, _ in pts]
        means = [s["mean"] for _, s in pts]
        if use_std:
            lo = [s["mean"] - s["std"] for _, s in pts]
            hi = [s["mean"] + s["std"] for _, s in pts]
        else:
            lo, hi = [s["min"] for _, s in pts], [s["max"] for _, s in pts]
        line, = ax.plot(xs, means, marker="o", label=name)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.fill_between([], [], [], color="grey", alpha=0.15, label=f"shaded: {band}")
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([fraction_label(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fine fraction (share of private images with a fine mask)")
    ax.set_ylabel("worst-group AUROC")
    ax.set_title("Sample efficiency: line = mean over seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    result["figure_caption"] = (f"Worst-group AUROC against the fine fraction (log axis); lines: mean over seeds, "
                                f"shaded: {band}. Dead models are left out.")
    return path.name


def _check_grid(fractions, seeds, methods, config) -> None:
    """ConfigError for a grid the sweep cannot run (all checked before any training)."""
    from .cli import _SEED_LIMIT

    if not fractions:
        raise ConfigError("fractions: give at least one fine fraction")
    if not seeds:
        raise ConfigError("seeds: give at least one seed")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise ConfigError(f"fractions: each must be a number in (0, 1), got {f!r}")
        if round(float(f) * config.n_private) < 1:
            raise ConfigError(f"fractions: {f!r} of the {config.n_private} private images gives no fine mask "
                              f"(round({f!r} * {config.n_private}) = 0); use a fraction >= "
                              f"{0.5 / config.n_private:.3g}")
    labels = [fraction_label(f) for f in fractions]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"fractions: lists a fraction more than once: {list(fractions)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < _SEED_LIMIT:
            raise ConfigError(f"seeds: each must be an integer in [0, 2**43), got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: lists a seed more than once: {list(seeds)}")
    known = _all_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; choose from {list(known)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods: lists a method more than once: {list(methods)}")


def run_sweep(out_dir: str | Path, *, fractions: Sequence[float] = FRACTIONS, seeds: Sequence[int] = SEEDS,
              methods: Optional[Sequence[str]] = None, config=None, device: str = "cpu", progress: bool = True,
              noise_seed: Optional[int] = None, checkpoint_dir: Optional[str | Path] = None,
              figures: bool = True, jobs: int = 1) -> dict:
    """Run the main job for every (fine fraction, seed) cell not yet complete in ``out_dir``; write
    sweep.json, sweep.md and sweep.png (see the module docstring). Returns the content of sweep.json.

    ``config`` (a :class:`~pyunlearn.pipeline.DemoConfig`, default the demo's) gives every knob but the fine
    fraction; ``methods`` overrides its method list (the coarse model is always evaluated). ``noise_seed``
    (or, when None, ``config.noise_seed``) seeds the certified noise per cell (:func:`cell_noise_seed`);
    None: secret keys. ``checkpoint_dir``: each cell checkpoints in ``<checkpoint_dir>/fraction-<f>/seed-<s>``
    (deleted when the cell succeeds). ``figures``: the cells' own report figures. ``jobs``: cells run at once,
    each in its own process with this process's torch thread count (cells are independent and seeded, so the
    results do not depend on it; not under torchrun). The processes are spawned, so a script that calls this
    with ``jobs > 1`` needs the usual ``if __name__ == "__main__":`` guard."""
    import torch
    from tqdm.auto import tqdm

    from . import pipeline
    from .checkpoint import RunLock

    config = config or pipeline.DemoConfig()
    fractions = [float(f) if isinstance(f, int) and not isinstance(f, bool) else f for f in fractions]
    seeds = list(seeds)
    if methods is not None:
        methods = tuple(methods)
        config = dataclasses.replace(config, methods=methods if "coarse" in methods else ("coarse",) + methods)
    master_noise = noise_seed if noise_seed is not None else config.noise_seed
    _check_grid(fractions, seeds, list(config.methods), config)
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs: a positive integer, got {jobs!r}")
    if jobs > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError("jobs: under torchrun the ranks share each cell; run with jobs = 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_rank = pipeline._main_rank()

    grid = [(f, s) for f in fractions for s in seeds]
    plan = {}
    for f, s in grid:
        cfg = dataclasses.replace(config, fine_fraction=f, noise_seed=cell_noise_seed(master_noise, f, s))
        plan[(f, s)] = (cfg, _cell_identity(cfg, s, device))
    # Every complete cell is checked against the current configuration before any training.
    mismatched = []
    for (f, s), (_, identity) in plan.items():
        record = _read_cell(cell_dir(out, f, s))
        if record is not None and record.get("identity") != identity:
            diff = _differences(record.get("identity") or {}, identity)
            mismatched.append(f"{cell_dir(out, f, s)}: " + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""))
    if mismatched:
        raise ConfigError("the sweep folder holds complete cells run with another configuration, which this run "
                          "would mix with its own; use another --out, or delete these cells to rerun them:\n  "
                          + "\n  ".join(mismatched))

    t0 = time.perf_counter()
    records: dict = {}
    lock = RunLock(out / ".sweep.lock", what="sweep folder").acquire() if main_rank else None
    try:
        todo = []
        for f, s in grid:
            record = _read_cell(cell_dir(out, f, s))
            if record is None:
                todo.append((f, s))
            else:
                records[(f, s)] = record
        bar = tqdm(total=len(grid), initial=len(records), desc="sweep cells", disable=not progress)
        arguments = {(f, s): dict(folder=cell_dir(out, f, s), config=plan[(f, s)][0], identity=plan[(f, s)][1],
                                  seed=s, device=device, figures=figures, main_rank=main_rank,
                                  checkpoint_dir=None if checkpoint_dir is None else
                                  Path(checkpoint_dir) / f"fraction-{fraction_label(f)}" / f"seed-{s}")
                     for f, s in todo}
        if jobs == 1 or len(todo) < 2:
            for f, s in todo:
                bar.set_postfix_str(f"fraction {fraction_label(f)}, seed {s}")
                records[(f, s)] = _run_cell(progress=progress, **arguments[(f, s)])
                bar.update()
        else:
            records.update(_run_cells_in_processes(arguments, min(jobs, len(todo)), torch.get_num_threads(), bar))
        bar.close()
        if checkpoint_dir is not None:  # drop the folders the cells emptied (a failed cell keeps its checkpoints)
            for folder in sorted({arguments[c]["checkpoint_dir"].parent for c in todo}) + [Path(checkpoint_dir)]:
                try:
                    folder.rmdir()
                except OSError:
                    pass
    finally:
        if lock is not None:
            lock.release()
    cells = [{"fraction": f, "seed": s, "path": str(cell_dir(out, f, s).relative_to(out)),
              "noise_seed": plan[(f, s)][0].noise_seed, "n_fine": round(f * config.n_private),
              **{k: records[(f, s)].get(k) for k in ("status", "reason", "wall_s")},
              "methods": records[(f, s)].get("methods", {})} for f, s in grid]

    reported = [m for m in config.methods]
    for c in cells:
        reported += [m for m in c["methods"] if m not in reported]
    result = {"config": {"fractions": fractions, "seeds": seeds, "methods": reported, "device": device,
                         "noise": "secret" if master_noise is None else "seeded",
                         "noise_seed": master_noise, "n_private": config.n_private,
                         "n_fine": {fraction_label(f): round(f * config.n_private) for f in fractions},
                         "base": {k: v for k, v in _normalise(config.to_dict()).items()
                                  if k not in ("fine_fraction", "noise_seed")},
                         "wall_s": time.perf_counter() - t0},
              "cells": cells,
              "n_cells": {status: sum(c["status"] == status for c in cells) for status in ("ok", "dead", "failed")},
              "summary": aggregate(cells, fractions, reported)}
    if main_rank:
        result["figure"] = _figure(result, out / "sweep.png")
        (out / "sweep.md").write_text(_markdown(result))
        from .report import _jsonable

        (out / "sweep.json").write_text(json.dumps(_jsonable(result), indent=2))
    return result


def _run_cells_in_processes(arguments: dict, jobs: int, threads: int, bar) -> dict:
    """:func:`_run_cell` for every cell of ``arguments`` in ``jobs`` fresh processes (spawned: no state of this
    one is inherited but the environment) with ``threads`` torch threads each; returns the records by cell."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    records = {}
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_set_threads, initargs=(threads,))
    try:
        futures = {pool.submit(_run_cell, progress=False, **kwargs): cell for cell, kwargs in arguments.items()}
        for future in as_completed(futures):
            f, s = futures[future]
            records[(f, s)] = future.result()
            bar.set_postfix_str(f"done: fraction {fraction_label(f)}, seed {s}")
            bar.update()
    finally:  # on an error or Ctrl-C the queued cells are dropped; the next run reruns them
        pool.shutdown(wait=True, cancel_futures=True)
    return records


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_cell(folder: Path, config, identity: dict, *, seed: int, device: str, progress: bool,
              checkpoint_dir: Optional[Path], figures: bool, main_rank: bool) -> dict:
    """Run one cell into a temporary folder and rename it into place when complete. Returns the cell
    record (status ``ok`` or ``dead``, written to cell.json; ``failed`` is returned only, never written)."""
    from . import pipeline

    partial = folder.with_name(folder.name + _PARTIAL)
    if main_rank:
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
        partial.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        report = pipeline.run_synthetic_demo(partial, seed=seed, device=device, config=config, progress=progress,
                                             figures=figures, checkpoint_dir=checkpoint_dir)
        record = {"status": "ok", "reason": None, "methods": cell_metrics(report)}
    except pipeline.DeadModelError as exc:
        # Deterministic for this configuration: the cell is complete, dead for every method.
        record = {"status": "dead", "reason": str(exc), "methods": {}}
        if checkpoint_dir is not None:  # the failed job kept its (private, uncertified) checkpoints: drop them
            stages = pipeline._with_retries(pipeline.PRETRAIN_STAGES + tuple(pipeline._stages(config)),
                                            config.dead_retries)
            with pipeline.checkpoint_folder(checkpoint_dir, stages):
                pass
    except Exception as exc:  # noqa: BLE001 - recorded as a failed cell; the next run retries it
        if main_rank:
            shutil.rmtree(partial, ignore_errors=True)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - t0,
                "methods": {}}
    record["wall_s"] = time.perf_counter() - t0
    if main_rank:
        (partial / "cell.json").write_text(json.dumps({"identity": identity, **record}, indent=2))
        os.replace(partial, folder)
    return record


# ------------------------------------------------------------------------------------------- command line
def _fraction(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < v < 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {value}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``sweep`` subcommand."""
    from .cli import _int_in, _noise_seed, _positive, _seed

    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: cells/, sweep.json, sweep.md, sweep.png; rerunning resumes")
    parser.add_argument("--fractions", type=_fraction, nargs="+", default=list(FRACTIONS),
                        help=f"fine fractions in (0, 1) (default {' '.join(map(str, FRACTIONS))})")
    parser.add_argument("--seeds", type=_seed, nargs="+", default=list(SEEDS),
                        help=f"data seeds (default {' '.join(map(str, SEEDS))})")
    parser.add_argument("--methods", nargs="+", choices=_all_methods(), default=None,
                        help="methods to run (default: the demo's; the coarse model is always evaluated)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds per cell; smoke tests)")
    # NOTE: the default stays the demo's 32 px. With --jobs 2 on 2 CPU cores a 32 px cell took 108-126 s (the
    # whole sweep 12 min) and a 64 px cell 591-705 s, so a 64 px sweep would take ~65 min, past the 40-minute
    # budget; sharing the fraction-independent stages (encoder, coarse model, oracle) would save at most ~30%.
    parser.add_argument("--image-size", type=_int_in(8, 2**31, "2**31"), default=None,
                        help="image side in pixels (default: the demo's, 32; a 64 px cell took ~5x as long)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=_positive, default=1, help="torch intra-op threads (default 1)")
    # NOTE: a cell is one small job that keeps one core busy (two threads spent most of their time waiting for
    # each other); cells in separate processes use the other cores.
    parser.add_argument("--jobs", type=_positive, default=1,
                        help="cells run at once, one process each (default 1; e.g. the number of cores divided "
                             "by --threads). The results do not depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--noise-seed", type=_noise_seed, default=None,
                        help="seed the certified noise (reproducible, NOT secret; every cell gets its own key); "
                             "default: secret keys from the OS")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="checkpoint each cell's stages here (one subfolder per cell; deleted when the cell "
                             "succeeds); a rerun resumes inside an interrupted cell")


def main(args: argparse.Namespace) -> int:
    """``pyunlearn sweep``: ``args`` from a parser set up by :func:`add_arguments`. Every flag is checked
    (ConfigError) before any training. Returns 0, or 1 when a cell failed (rerun to retry it)."""
    import torch

    from .cli import _quick_config
    from .config import check_writable_dir
    from .pipeline import DemoConfig

    config = _quick_config() if args.quick else DemoConfig()
    if args.image_size is not None:
        config = dataclasses.replace(config, image_size=args.image_size)
    _check_grid(list(args.fractions), list(args.seeds), list(args.methods or config.methods), config)
    for flag, folder in (("--out", args.out), ("--checkpoint-dir", args.checkpoint_dir)):
        if folder is not None:
            check_writable_dir(Path(folder), what=f"argument {flag}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("argument --device: cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    result = run_sweep(args.out, fractions=args.fractions, seeds=args.seeds, methods=args.methods, config=config,
                       device=args.device, progress=not args.no_progress, noise_seed=args.noise_seed,
                       checkpoint_dir=args.checkpoint_dir, jobs=args.jobs)
    from .pipeline import _main_rank

    if _main_rank():
        counts = result["n_cells"]
        print(f"sweep: {counts['ok']} cells ok, {counts['dead']} dead, {counts['failed']} failed; "
              f"{Path(args.out) / 'sweep.md'}")
    return 1 if result["n_cells"]["failed"] else 0
