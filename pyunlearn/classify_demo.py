"""``pyunlearn classify-demo``: classification unlearning side by side on real images (no download).

Data: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes), scaled to [0, 1],
split 70/30 train/test (stratified, seeded). Model: :class:`pyunlearn.models_classify.DigitsCNN`.

Scenarios
  * ``class`` — forget every training image of one digit (``FORGET_CLASS``). Held-out set for the
    membership attack: the test images of that digit; ``test_acc`` is on the other digits' test images.
  * ``device`` — a "deprecated acquisition device": a random 25% of the images (train and test)
    carry its artefact (raised black level, fixed-pattern noise, a bright stripe down the right
    edge). Forget set: the training images from that device; held-out set: its test images;
    ``test_acc`` is on the clean test images. Retraining without the device is the reference; an
    unlearned model should look like it (``retrain_gap``).

Methods: ``original`` (no unlearning), ``retrain``, ``finetune``, ``neggrad_plus``, ``scrub``,
``boundary_shrink`` (published form: no remain data), ``psg`` and ``compose`` (feature extractor of
the unlearning run best on the remain set + head of the run best at forgetting — lowest forget
accuracy — briefly fine-tuned on the remain set).

Outputs in ``DIR``: ``report.json`` (``{"scenarios": {NAME: {"methods": {METHOD: {"forget_acc",
"remain_acc", "test_acc", "mia", "wall_s", ...}}, ...}}, "methods": <the class scenario's>, ...}``),
``report.md`` and ``embedding_<scenario>.png`` (PCA of the penultimate features of forget and remain
samples, coloured by predicted label, for the original model and after PSG; the shaded decision
regions are the head's predictions on the PCA plane through the feature mean).

Combined criterion (``score``, higher is better), used to compare PSG with Boundary Shrink:
``mean(1 − forget_acc, min(1, remain_acc / remain_acc_original), 1 − 2·|mia − 0.5|)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .metrics.forgetting import evaluate_forgetting, per_sample_losses, retrain_gap
from .models_classify import DigitsCNN
from .unlearn.classification import compose, finetune, neggrad_plus, retrain, scrub, train_classifier
from .unlearn.psg import boundary_shrink, psg

__all__ = ["run", "add_arguments", "main", "load_digits", "device_artefact", "combined_score"]

FORGET_CLASS = 3
DEVICE_FRACTION = 0.25
TEST_FRACTION = 0.3

# Hyper-parameters of the full run; ``quick`` scales the step counts down.
TRAIN = dict(epochs=40, lr=2e-3, batch_size=64)
METHODS: dict[str, dict[str, Any]] = {
    "finetune": dict(steps=200, lr=3e-3, batch_size=64),
    "neggrad_plus": dict(beta=0.95, steps=100, lr=2e-4, batch_size=64),
    "scrub": dict(epochs=6, max_epochs=3, alpha=1.0, gamma=1.0, temperature=4.0, lr=1e-3, batch_size=64,
                  forget_batch_size=16),
    "boundary_shrink": dict(epsilon=0.25, steps=60, lr=1e-3, batch_size=64),
    "psg": dict(epsilon=0.25, gamma=0.5, lam=0.0, inner_steps=10, kappa=0.1, remain_weight=1.0, steps=60,
                lr=1e-3, batch_size=64),
    "compose": dict(train="head", steps=50, lr=1e-3, batch_size=64),
}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``x (1797, 1, 8, 8)`` float32 in [0, 1] and ``y (1797,)`` int64."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def device_artefact(x: Tensor, *, seed: int = 1234) -> Tensor:
    """The deprecated device's acquisition artefact: raised black level, fixed-pattern noise, a stripe.

    Deterministic in ``seed`` (the device's fixed noise pattern); output stays in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    pattern = (torch.rand(x.shape[1:], generator=gen) - 0.5) * 0.3
    out = 0.35 + 0.65 * x + pattern
    out[..., :, -1] = 1.0
    return out.clamp(0.0, 1.0)


def _split(n: int, y: Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    return train_test_split(idx, test_size=TEST_FRACTION, stratify=y.numpy(), random_state=seed)


def _scenarios(seed: int, quick: bool) -> dict[str, dict[str, Any]]:
    x, y = load_digits()
    if quick:  # a small stratified subset
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(np.arange(len(y)), train_size=360, stratify=y.numpy(), random_state=seed)
        x, y = x[keep], y[keep]
    tr, te = _split(len(y), y, seed)
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    out: dict[str, dict[str, Any]] = {}

    f_tr, f_te = ytr == FORGET_CLASS, yte == FORGET_CLASS
    out["class"] = dict(
        description=f"forget every training image of digit {FORGET_CLASS}",
        train=(xtr, ytr), forget=(xtr[f_tr], ytr[f_tr]), remain=(xtr[~f_tr], ytr[~f_tr]),
        test=(xte[~f_te], yte[~f_te]), heldout=(xte[f_te], yte[f_te]),
    )

    gen = torch.Generator().manual_seed(seed + 17)
    d_tr = torch.rand(len(ytr), generator=gen) < DEVICE_FRACTION
    d_te = torch.rand(len(yte), generator=gen) < DEVICE_FRACTION
    xtr_d, xte_d = xtr.clone(), xte.clone()
    xtr_d[d_tr] = device_artefact(xtr[d_tr])
    xte_d[d_te] = device_artefact(xte[d_te])
    out["device"] = dict(
        description=f"forget the training images of a deprecated device ({DEVICE_FRACTION:.0%} of images, "
                    "raised black level + fixed-pattern noise + edge stripe)",
        train=(xtr_d, ytr), forget=(xtr_d[d_tr], ytr[d_tr]), remain=(xtr_d[~d_tr], ytr[~d_tr]),
        test=(xte_d[~d_te], yte[~d_te]), heldout=(xte_d[d_te], yte[d_te]),
    )
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------------
def combined_score(m: dict[str, float], original_remain_acc: float) -> float:
    """``mean(1 − forget_acc, min(1, remain_acc / original), 1 − 2|mia − 0.5|)`` — higher is better."""
    terms = [1.0 - m["forget_acc"], min(1.0, m["remain_acc"] / max(original_remain_acc, 1e-12)),
             1.0 - 2.0 * abs(m["mia"] - 0.5)]
    return float(np.mean(terms))


def _scaled(cfg: dict[str, Any], quick: bool) -> dict[str, Any]:
    if not quick:
        return dict(cfg)
    out = dict(cfg)
    for key in ("steps",):
        if key in out:
            out[key] = max(2, out[key] // 10)
    for key in ("epochs",):
        if key in out:
            out[key] = max(1, out[key] // 4)
    if "max_epochs" in out:
        out["max_epochs"] = min(out["max_epochs"], out.get("epochs", 1))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(w) for w in v]
    if isinstance(v, Tensor):
        return v.tolist() if v.numel() <= 64 else f"tensor{tuple(v.shape)}"
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _embedding_plot(path: str, models: dict[str, nn.Module], forget: tuple[Tensor, Tensor],
                    remain: tuple[Tensor, Tensor], title: str, seed: int, *, grid: int = 200, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from sklearn.decomposition import PCA

    gen = torch.Generator().manual_seed(seed)
    n_rem = min(400, remain[0].shape[0])
    ridx = torch.randperm(remain[0].shape[0], generator=gen)[:n_rem]
    xr = remain[0][ridx]
    xf = forget[0]
    cmap = ListedColormap(plt.get_cmap("tab10").colors)
    norm = BoundaryNorm(np.arange(-0.5, 10.5, 1.0), cmap.N)
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models) + 1.0, 4.6), squeeze=False,
                             layout="constrained")
    handles = [Line2D([], [], marker="o", color="grey", linestyle="", markersize=4, label="remain"),
               Line2D([], [], marker="X", color="grey", markeredgecolor="black", linestyle="", markersize=7,
                      label="forget")]
    for ax, (name, model) in zip(axes[0], models.items()):
        model.eval()
        feats = torch.cat([model.features(xr), model.features(xf)]).double().numpy()
        pca = PCA(n_components=2, random_state=0).fit(feats)
        emb = pca.transform(feats)
        lo, hi = emb.min(0), emb.max(0)
        pad = 0.08 * (hi - lo + 1e-9)
        gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid),
                             np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid))
        plane = pca.inverse_transform(np.stack([gx.ravel(), gy.ravel()], 1))
        grid_pred = model.head(torch.tensor(plane, dtype=torch.float32)).argmax(1).numpy().reshape(gx.shape)
        ax.contourf(gx, gy, grid_pred, levels=np.arange(-0.5, 10.5, 1.0), cmap=cmap, norm=norm, alpha=0.22)
        pred_r = model.head(torch.tensor(feats[:n_rem], dtype=torch.float32)).argmax(1).numpy()
        pred_f = model.head(torch.tensor(feats[n_rem:], dtype=torch.float32)).argmax(1).numpy()
        ax.scatter(emb[:n_rem, 0], emb[:n_rem, 1], c=pred_r, cmap=cmap, norm=norm, s=9, alpha=0.6,
                   linewidths=0)
        ax.scatter(emb[n_rem:, 0], emb[n_rem:, 1], c=pred_f, cmap=cmap, norm=norm, s=34, marker="X",
                   edgecolors="black", linewidths=0.5)
        acc = float((pred_f == forget[1].numpy()).mean())
        ax.set_title(f"{name}: forget acc {acc:.2f}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(handles=handles, loc="best", fontsize=8)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(sm, ax=axes[0].tolist(), ticks=range(10), label="predicted label")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def _run_scenario(name: str, sc: dict[str, Any], *, seed: int, quick: bool, log: Callable[[str], None],
                  out_dir: str) -> dict[str, Any]:
    forget, remain, test, heldout = sc["forget"], sc["remain"], sc["test"], sc["heldout"]

    def evaluate(model: nn.Module) -> dict[str, Any]:
        return evaluate_forgetting(model, forget=forget, remain=remain, test=test, heldout=heldout, seed=seed)

    with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        original = DigitsCNN(10)
    train_cfg = _scaled(TRAIN, quick)
    rec = train_classifier(original, sc["train"], seed=seed, **train_cfg)
    results: dict[str, dict[str, Any]] = {"original": {**evaluate(original), "wall_s": rec["wall_s"]}}
    log(f"[{name}] original: {_fmt(results['original'])}")
    models: dict[str, nn.Module] = {"original": original}
    records: dict[str, dict[str, Any]] = {"original": rec}

    runs: dict[str, Callable[[], tuple[nn.Module, dict]]] = {
        "retrain": lambda: retrain(original, forget, remain, seed=seed + 1, **train_cfg),
        "finetune": lambda: finetune(original, forget, remain, seed=seed, **_scaled(METHODS["finetune"], quick)),
        "neggrad_plus": lambda: neggrad_plus(original, forget, remain, seed=seed,
                                             **_scaled(METHODS["neggrad_plus"], quick)),
        "scrub": lambda: scrub(original, forget, remain, seed=seed, **_scaled(METHODS["scrub"], quick)),
        "boundary_shrink": lambda: boundary_shrink(original, forget, remain, seed=seed,
                                                   **_scaled(METHODS["boundary_shrink"], quick)),
        "psg": lambda: psg(original, forget, remain, seed=seed, **_scaled(METHODS["psg"], quick)),
    }
    for method, fn in runs.items():
        model, rec = fn()
        models[method], records[method] = model, rec
        results[method] = {**evaluate(model), "wall_s": rec["wall_s"]}
        log(f"[{name}] {method}: {_fmt(results[method])}")

    # Candidates: the unlearning runs that forgot, i.e. whose forget accuracy is closer to retrain's than
    # to the original's (all runs if none did). Features from the best on the remain set; head from the
    # best at forgetting (lowest forget accuracy, ties broken by the higher mean forget-set loss).
    runs_ = ["finetune", "neggrad_plus", "scrub", "boundary_shrink", "psg"]
    midpoint = 0.5 * (results["original"]["forget_acc"] + results["retrain"]["forget_acc"])
    candidates = [m for m in runs_ if results[m]["forget_acc"] <= midpoint] or runs_
    forget_loss = {m: float(per_sample_losses(models[m], forget).mean()) for m in candidates}
    best_remain = max(candidates, key=lambda m: (results[m]["remain_acc"], -results[m]["forget_acc"]))
    best_forget = min(candidates, key=lambda m: (results[m]["forget_acc"], -forget_loss[m]))
    model, rec = compose(models[best_remain], models[best_forget], remain, seed=seed,
                         **_scaled(METHODS["compose"], quick))
    rec.update(remain_model=best_remain, forget_model=best_forget)
    models["compose"], records["compose"] = model, rec
    results["compose"] = {**evaluate(model), "wall_s": rec["wall_s"]}
    log(f"[{name}] compose({best_remain} features + {best_forget} head): {_fmt(results['compose'])}")

    orig_remain = results["original"]["remain_acc"]
    for method, m in results.items():
        m["score"] = combined_score(m, orig_remain)
        if method != "retrain":
            m["retrain_gap"] = retrain_gap(m, results["retrain"])["mean"]

    plot = f"embedding_{name}.png"
    _embedding_plot(os.path.join(out_dir, plot),
                    {"original": original, "psg": models["psg"], "retrain": models["retrain"]}, forget, remain,
                    f"{name}: {sc['description']}\nPCA of penultimate features; colour = predicted label, "
                    "shading = decision regions on the PCA plane", seed,
                    grid=60 if quick else 200, dpi=60 if quick else 110)

    psg_m, bs_m = results["psg"], results["boundary_shrink"]
    summary = {
        "description": sc["description"],
        "sizes": {k: int(sc[k][0].shape[0]) for k in ("forget", "remain", "test", "heldout")},
        "methods": results,
        "records": {k: {kk: vv for kk, vv in v.items() if kk != "new_labels"} for k, v in records.items()},
        "plot": plot,
        "psg_vs_boundary_shrink": {"psg_score": psg_m["score"], "boundary_shrink_score": bs_m["score"],
                                   "psg_at_least_as_good": psg_m["score"] >= bs_m["score"]},
    }
    if name == "class":
        summary["targets"] = {
            "psg_forget_acc_le_0.05": psg_m["forget_acc"] <= 0.05,
            "psg_remain_ratio_ge_0.97": psg_m["remain_acc"] >= 0.97 * orig_remain,
            "psg_mia_within_0.05": abs(psg_m["mia"] - 0.5) <= 0.05,
            "psg_score_ge_boundary_shrink": psg_m["score"] >= bs_m["score"],
        }
    return summary


def _fmt(m: dict[str, Any]) -> str:
    return (f"forget {m['forget_acc']:.3f}  remain {m['remain_acc']:.3f}  test {m['test_acc']:.3f}  "
            f"mia {m['mia']:.3f}  ({m['wall_s']:.1f}s)")


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# classify-demo report", "",
             f"seed {report['seed']}, quick={report['quick']}, torch threads {report['threads']}, "
             f"total {report['wall_s']:.1f}s wall, {report['cpu_s']:.1f}s CPU", ""]
    if report["quick"]:
        lines += ["**quick=True**: a smoke-test configuration (a data subset, a few steps); the numbers below "
                  "are not meaningful.", ""]
    lines += ["Metrics: accuracies on the forget set (training images to forget), the remain set "
              "(training images kept) and the test set of the kept distribution; `mia` = balanced, "
              "5-fold cross-validated accuracy of a logistic-regression membership attack on per-sample "
              "losses, forget vs held-out images of the forget distribution (0.5 ideal; about ±0.05 of "
              "noise at these set sizes); `gap` = mean absolute difference to retrain over the four "
              "metrics; `score` = mean(1 − forget, min(1, remain/remain_original), 1 − 2|mia − 0.5|).", ""]
    for name, sc in report["scenarios"].items():
        lines += [f"## Scenario `{name}`: {sc['description']}", "",
                  "sizes: " + ", ".join(f"{k} {v}" for k, v in sc["sizes"].items()), "",
                  "| method | forget acc | remain acc | test acc | MIA | gap to retrain | score | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, m in sc["methods"].items():
            gap = m.get("retrain_gap")
            lines.append(f"| {method} | {m['forget_acc']:.3f} | {m['remain_acc']:.3f} | {m['test_acc']:.3f} | "
                         f"{m['mia']:.3f} | {'—' if gap is None else f'{gap:.3f}'} | {m['score']:.3f} | "
                         f"{m['wall_s']:.2f} |")
        crec = sc["records"]["compose"]
        prec = sc["records"]["psg"]
        lines += ["", f"compose = features of `{crec['remain_model']}` + head of `{crec['forget_model']}`, "
                      f"{crec['train']} fine-tuned {crec['steps']} steps.",
                  f"PSG relabels that stayed on the true class: {prec['relabel_stayed_true']} of "
                  f"{prec['n_forget']} forget samples ({prec['relabel_stayed_true_rate']:.1%} of all visits).", ""]
        if "targets" in sc:
            lines += ["Targets: " + ", ".join(f"{k} {'✔' if v else '✘'}" for k, v in sc["targets"].items()), ""]
        lines += [f"![embedding]({sc['plot']})", ""]
    return "\n".join(lines)


def run(out_dir: str, *, seed: int = 0, quick: bool = False, progress: bool = True,
        threads: Optional[int] = 1) -> dict[str, Any]:
    """Run both scenarios with every method; write ``report.json``, ``report.md`` and the plots.

    ``threads``: torch intra-op threads and BLAS/OpenMP threads for the run (restored afterwards).
    The default 1 is the fastest for this tiny CNN and these small matrices: with more,
    synchronisation costs more than the work, and badly so on a loaded machine. ``None`` keeps the
    current settings.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    if threads is None:
        return _run(out_dir, seed=seed, quick=quick, progress=progress)
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):  # BLAS/OpenMP pools of numpy, scipy, scikit-learn
            return _run(out_dir, seed=seed, quick=quick, progress=progress)
    finally:
        torch.set_num_threads(previous)


def _run(out_dir: str, *, seed: int, quick: bool, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    cpu_start = time.process_time()
    os.makedirs(out_dir, exist_ok=True)

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    scenarios = _scenarios(seed, quick)
    report: dict[str, Any] = {"seed": seed, "quick": quick, "threads": torch.get_num_threads(),
                              "forget_class": FORGET_CLASS, "scenarios": {}}
    for name, sc in scenarios.items():
        report["scenarios"][name] = _run_scenario(name, sc, seed=seed, quick=quick, log=log, out_dir=out_dir)
    report["methods"] = report["scenarios"]["class"]["methods"]
    report["wall_s"] = time.perf_counter() - start
    report["cpu_s"] = time.process_time() - cpu_start
    report = _jsonable(report)
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(_markdown(report))
    log(f"wrote {os.path.join(out_dir, 'report.json')} and report.md ({report['wall_s']:.1f}s)")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``classify-demo`` subcommand."""
    parser.add_argument("--out", required=True, help="output directory (report.json, report.md, plots)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the models and the methods")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration for smoke tests")
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress lines on stderr")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for this tiny model)")


def main(args: Optional[argparse.Namespace] = None) -> int:
    """Entry point: ``args`` from a parser set up by :func:`add_arguments` (parsed from argv if None)."""
    if args is None:
        parser = argparse.ArgumentParser(prog="pyunlearn classify-demo", description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args()
    run(args.out, seed=args.seed, quick=args.quick, progress=not getattr(args, "quiet", False),
        threads=getattr(args, "threads", 1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
