"""report.json, report.md and the figures of the main job."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

__all__ = ["write_report", "format_table"]

_COLUMNS = (("auroc", "AUROC"), ("worst_group_auroc", "worst-group AUROC"), ("dice", "Dice"),
            ("s_global", "S_global"), ("wall_s", "wall s"), ("certificate", "certificate"))


def _cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if key == "certificate":
        if not value:
            return "-"
        return (f"eps={value['epsilon']:.3g}, delta={value['delta']:.0e}, "
                f"{'seeded' if value.get('seeded') else 'secret'} noise")
    if value is None:
        return "-"
    if key == "s_global" and metrics.get("s_global_ci"):
        lo, hi = metrics["s_global_ci"]
        return f"{value:.4f} [{lo:.4f}, {hi:.4f}]"
    return f"{value:.1f}" if key == "wall_s" else f"{value:.3f}"


#: What a dead method's row shows instead of numbers.
DEAD_CELL = "dead (no usable output)"


def is_dead(metrics: dict) -> bool:
    return metrics.get("status") == "dead"


def _row(name: str, metrics: dict) -> list[str]:
    if is_dead(metrics):  # never numbers: the first metric column says so, the others are empty
        return [name, DEAD_CELL] + ["-"] * (len(_COLUMNS) - 1)
    return [name] + [_cell(metrics, key) for key, _ in _COLUMNS]


def format_table(methods: dict, *, markdown: bool = True) -> str:
    """The per-method table, as Markdown or as aligned plain text for the terminal. A dead method (status
    ``"dead"``: constant output) shows :data:`DEAD_CELL` and no metrics."""
    header = ["method"] + [title for _, title in _COLUMNS]
    rows = [_row(name, m) for name, m in methods.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _figures(report: dict, out: Path, models: dict, test) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pipeline import _probabilities

    written = []
    methods = report["methods"]
    # 1. Mask overlays: image, fine, coarse-style forget pixels, predictions before/after.
    shown = [m for m in ("coarse", "retrain", "finetune", "gradient_clipping", "model_clipping") if m in models]
    has_art = test.has_artefact.nonzero().flatten()[:2].tolist()
    clean = (~test.has_artefact).nonzero().flatten()[:1].tolist()
    picks = has_art + clean
    if picks and hasattr(test, "subset"):  # a streamed evaluation set: read only the images shown
        test, picks = test.subset(picks), list(range(len(picks)))
    if picks:
        probs = {m: _probabilities(models[m], test.images[picks]).cpu() for m in shown}
        cols = 2 + len(shown)
        fig, axes = plt.subplots(len(picks), cols, figsize=(2.1 * cols, 2.2 * len(picks)), squeeze=False)
        for r, i in enumerate(picks):
            img = test.images[i].permute(1, 2, 0).cpu().clamp(0, 1)
            axes[r, 0].imshow(img.numpy())
            axes[r, 0].set_title("image" + (" (artefact)" if test.has_artefact[i] else ""), fontsize=8)
            overlay = img.clone()
            if test.artefact_map is not None:
                overlay[test.artefact_map[i].cpu()] = torch.tensor([1.0, 0.0, 1.0])
            overlay[test.fine[i].cpu()] = overlay[test.fine[i].cpu()] * 0.4 + torch.tensor([0.0, 0.6, 0.0])
            axes[r, 1].imshow(overlay.numpy())
            axes[r, 1].set_title("fine (green), artefact (magenta)", fontsize=7)
            for c, m in enumerate(shown):
                axes[r, 2 + c].imshow(probs[m][r].numpy(), vmin=0, vmax=1, cmap="magma")
                axes[r, 2 + c].contour(test.fine[i].cpu().float().numpy(), levels=[0.5], colors="cyan", linewidths=0.6)
                axes[r, 2 + c].set_title(f"{m}", fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("Foreground probability per method (cyan: fine outline)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "overlays.png", dpi=110)
        plt.close(fig)
        written.append("overlays.png")
    # 2. Worst-group AUROC along the unlearning run. A certified method's curve starts at the end of its
    #    noisy phase (the certified model); the noisy phase itself is drawn only from diagnostics, labelled.
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    any_diagnostics = False
    for name, m in methods.items():
        traj = m.get("trajectory") or []
        if traj:
            ax.plot([p["step"] for p in traj], [p["worst_group_auroc"] for p in traj], marker=".", label=name)
            noisy = (m.get("hyperparameters") or {}).get("steps") if m.get("certificate") else None
            if noisy:
                ax.axvline(noisy, color=ax.lines[-1].get_color(), ls=":", lw=0.8)
        diag = (m.get("diagnostics") or {}).get("trajectory") or []
        if diag:
            any_diagnostics = True
            ax.plot([p["step"] for p in diag], [p["worst_group_auroc"] for p in diag], ls="--", lw=0.8, marker="x",
                    color=ax.lines[-1].get_color() if traj else None,
                    label=f"{name}: noisy phase (diagnostics, NOT certified)")
    for name in ("coarse", "oracle"):
        if name in methods and methods[name].get("worst_group_auroc") is not None:
            ax.axhline(methods[name]["worst_group_auroc"], ls="--", lw=0.8, color="grey")
            ax.text(0, methods[name]["worst_group_auroc"], f" {name}", fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("unlearning step (dotted: end of the noisy phase" + ("; dashed: not certified)" if any_diagnostics
                                                                       else ")"))
    ax.set_ylabel("worst-group AUROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trajectory.png", dpi=110)
    plt.close(fig)
    written.append("trajectory.png")
    # 3. Subgroup AUROC bars per method (dead methods have none).
    methods = {name: m for name, m in methods.items() if m.get("group_auroc")}
    if not methods:
        return written
    groups = list(next(iter(methods.values()))["group_auroc"].keys())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods)), 3.8))
    width = 0.8 / len(groups)
    for g_i, g in enumerate(groups):
        xs = [i + g_i * width for i in range(len(methods))]
        ys = [m["group_auroc"].get(g) or 0.0 for m in methods.values()]
        ax.bar(xs, ys, width, label=g)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))])
    ax.set_xticklabels(list(methods), rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC (pooled scores)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "subgroup_auroc.png", dpi=110)
    plt.close(fig)
    written.append("subgroup_auroc.png")
    return written


def write_report(report: dict, out: Path, *, models: Optional[dict] = None, test=None, figures: bool = True) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2))
    pictures = _figures(report, out, models, test) if figures and models and test is not None else []
    lines = ["# pyunlearn report", "", format_table(report["methods"]), ""]
    lines += ["Pooled image score = mean foreground probability. Subgroup AUROC compares the positives of one "
              "artefact subgroup with the negatives of another; `pos_clean_vs_neg_art` is where a shortcut "
              "misleads. S_global in nats with a bootstrap interval over images.", ""]
    dead = {name: m for name, m in report["methods"].items() if is_dead(m)}
    if dead:
        lines += ["**Dead models** (constant, near-constant or blank output; no metrics are reported for them): "
                  + "; ".join(f"`{n}`: {m.get('reason', 'constant output')}"
                              + (f" (after {len(m['retries'])} retries with other initialisation seeds)"
                                 if m.get("retries") else "")
                              for n, m in dead.items()), ""]
    retried = {name: m["retries"] for name, m in report["methods"].items() if m.get("retries") and not is_dead(m)}
    if retried:
        lines += ["**Retried** (a from-scratch training ended dead and was rerun with another initialisation "
                  "seed): " + "; ".join(f"`{n}`: " + ", ".join(
                      f"{r.get('stage', n)} seed {r['seed']} ({r['reason']})" for r in rs) for n, rs in retried.items()),
                  ""]
    certified = [name for name, m in report["methods"].items() if m.get("certificate")]
    if certified:
        lines += ["A certificate covers its method's released model and everything this report shows of that method: "
                  "the metrics of its final model, its curve in the trajectory figure (which starts at the certified "
                  "model, the end of the noisy phase, and continues through noise-free post-processing on retain "
                  "data), its hyper-parameters and its wall time. The other rows evaluate uncertified models (the "
                  "coarse model, retraining, fine-tuning, ...) and are comparisons, covered by no certificate.", ""]
    diagnosed = [name for name in certified if report["methods"][name].get("diagnostics")]
    if diagnosed:
        lines += ["**Diagnostics are on** for " + ", ".join(f"`{n}`" for n in diagnosed) + ": report.json holds "
                  "their noisy phase's losses and evaluations under `diagnostics`, and the trajectory figure draws "
                  "them dashed. These are computed from intermediate, uncertified models: they are NOT covered by "
                  "the certificates, and releasing them voids the guarantee.", ""]
    for name, m in report["methods"].items():
        cert = m.get("certificate")
        if cert:
            seed = (cert.get("hyperparameters") or {}).get("seed")
            noise = (f"seeded (seed {seed}): reproducible and NOT secret, for tests and reproducibility only; the "
                     "guarantee holds only against an adversary who does not know the seed"
                     if cert.get("seeded") else "secret: a key drawn from the operating system's entropy, never stored")
            lines += [f"## Certificate: {name}", "", f"(epsilon, delta) = ({cert['epsilon']:.4g}, {cert['delta']:.1e}),"
                      f" operator `{cert['operator']}`, covers {len(cert['parameters'])} tensors: "
                      + ", ".join(f"`{p}`" for p in cert["parameters"]), "", f"Noise: {noise}.", "", "Assumptions:", ""]
            lines += [f"- {a}" for a in cert["assumptions"]] + [""]
            if cert.get("not_covered"):
                lines += ["NOT covered by this certificate:", ""] + [f"- {a}" for a in cert["not_covered"]] + [""]
    for pic in pictures:
        lines += [f"![{pic}]({pic})", ""]
    lines += ["## Configuration", "", "```json", json.dumps(_jsonable(report.get("config", {})), indent=2), "```", ""]
    (out / "report.md").write_text("\n".join(lines))


def summarize_seeds(reports: dict[int, dict], out: Path) -> dict:
    """Mean and standard deviation over seeds of each method's headline metrics; writes summary.json/.md."""
    import statistics

    keys = ("auroc", "worst_group_auroc", "dice", "s_global", "wall_s")
    names = list(next(iter(reports.values()))["methods"])
    summary = {}
    for name in names:
        row = {}
        for key in keys:
            values = [r["methods"][name][key] for r in reports.values()
                      if name in r["methods"] and not is_dead(r["methods"][name])
                      and r["methods"][name].get(key) is not None]
            if values:
                row[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        dead = [s for s, r in reports.items() if name in r["methods"] and is_dead(r["methods"][name])]
        if dead:
            row["dead_seeds"] = dead
        summary[name] = row
    result = {"seeds": list(reports), "methods": summary}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_jsonable(result), indent=2))
    header = "| method | " + " | ".join(keys) + " |"
    lines = [f"Mean ± std over seeds {list(reports)}.", "", header, "|" + "---|" * (len(keys) + 1)]
    for name, row in summary.items():
        digits = {"s_global": 4, "wall_s": 1}
        cells = [f"{row[k]['mean']:.{digits.get(k, 3)}f} ± {row[k]['std']:.{digits.get(k, 3)}f}" if k in row else "-"
                 for k in keys]
        if row.get("dead_seeds"):
            cells[0] += f" ({DEAD_CELL} at seeds {row['dead_seeds']}, left out)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return result
