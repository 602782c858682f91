"""Does the synthetic generator tell the methods apart? (offline check, not part of the test suite)

Builds the demo's three splits with :class:`pyunlearn.data.SyntheticShortcuts` (public split from the
shifted ``domain="public"`` distribution unless ``--same-domain``), pretrains the public encoder and the
coarse decoder with :func:`pyunlearn.pipeline.pretrain`, runs retrain (10% fine masks) and the oracle with
:func:`pyunlearn.pipeline.run_pipeline` and evaluates with :func:`pyunlearn.pipeline.evaluate`, for a few
seeds. Targets (issue "A benchmark that can tell the methods apart"):

* the shortcut is strong: coarse worst-group AUROC <= coarse AUROC - 0.15 (every seed and on average);
* retraining on the fine fraction leaves headroom: mean over seeds of
  (oracle worst-group AUROC - retrain worst-group AUROC) >= 0.05.

A dead model (near-constant output, Dice ~0 or AUROC ~0.5) is flagged per seed and method.

    .venv/bin/python benchmarks/generator_check.py --seeds 0 1 2 --out benchmarks/results/X.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyunlearn.data import SyntheticShortcuts  # noqa: E402
from pyunlearn.pipeline import DemoConfig, EvalSet, _probabilities, pretrain, run_pipeline  # noqa: E402
from pyunlearn.unlearn import SegmentationUnlearningData  # noqa: E402

SHORTCUT_GAP = 0.15
HEADROOM = 0.05


def build(config: DemoConfig, seed: int, *, same_domain: bool, generator: dict, public_generator: dict):
    """The splits of ``pipeline.build_synthetic`` (same seeds, correlations, fine fractions), with the
    generator options ``generator`` (``public_generator`` on top for the public split) and the public split
    drawn from the shifted public domain."""
    common = dict(image_size=config.image_size, dilation_radius=config.dilation_radius, **generator)
    public_kw = ({} if same_domain else {"domain": "public"}) | public_generator
    public = SyntheticShortcuts(config.n_public, correlation=0.0, fine_fraction=1.0, seed=10_000 + seed,
                                **common, **public_kw)
    private = SyntheticShortcuts(config.n_private, correlation=config.correlation,
                                 fine_fraction=config.fine_fraction, seed=seed, **common)
    test = SyntheticShortcuts(config.n_test, correlation=0.0, fine_fraction=1.0, seed=20_000 + seed, **common)
    return public, private, test


def dead(model, evalset: EvalSet, metrics: dict) -> list[str]:
    probs = _probabilities(model, evalset.images, features=evalset.features)
    why = []
    if float(probs.std()) < 1e-3:
        why.append(f"constant output (std {float(probs.std()):.2g})")
    if metrics["dice"] < 0.05:
        why.append(f"dice {metrics['dice']:.3f}")
    if abs(metrics["auroc"] - 0.5) < 0.02:
        why.append(f"auroc {metrics['auroc']:.3f}")
    return why


def pixel_diagnostics(model, evalset: EvalSet, test: SyntheticShortcuts) -> dict:
    """Where the foreground probability goes on the test set: mean probability on lesion pixels (per lesion
    type), on skin (outside lesion and artefact) and on each artefact kind's pixels, and the score each kind
    adds (its pixels' probability mass over the image area: what the pooled score gains from the artefact)."""
    probs = _probabilities(model, evalset.images, features=evalset.features).cpu()
    area = probs[0].numel()
    skin = ~test.fine & ~test.artefact_map
    out = {"lesion": float(probs[test.fine].mean()), "skin": float(probs[skin].mean()), "artefact": {},
           "artefact_score": {}, "lesion_by_type": {}}
    for k, kind in enumerate(test.artefact_names):
        idx = test.artefacts[:, k].bool()
        if idx.any():
            amap = test.artefact_map[idx]
            out["artefact"][kind] = float(probs[idx][amap].mean())
            out["artefact_score"][kind] = float((probs[idx] * amap).flatten(1).sum(1).mean() / area)
    if test.lesion_type is not None:
        from pyunlearn.data.synthetic import LESION_TYPES
        for t, name in enumerate(LESION_TYPES):
            idx = test.lesion_type == t
            if idx.any():
                out["lesion_by_type"][name] = float(probs[idx][test.fine[idx]].mean())
    return out


def run_seed(config: DemoConfig, seed: int, *, same_domain: bool, generator: dict, public_generator: dict) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    public, private, test = build(config, seed, same_domain=same_domain, generator=generator,
                                  public_generator=public_generator)
    data = SegmentationUnlearningData.from_masks(private.images, private.coarse, private.fine, private.has_fine)
    oracle = SegmentationUnlearningData.from_masks(private.images, private.coarse, private.fine,
                                                   torch.ones_like(private.has_fine))
    evalset = EvalSet(images=test.images, fine=test.fine, labels=test.labels, has_artefact=test.has_artefact,
                      artefact_map=test.artefact_map)
    t_data = time.perf_counter() - t0
    model = pretrain(public.images, public.fine, data, config, seed=seed, progress=False)
    evalset.cache_features(model)
    t_pre = time.perf_counter() - t0 - t_data
    methods, models = run_pipeline(model, data, evalset, config, seed=seed, oracle_data=oracle, progress=False)
    out = {"seed": seed, "data_s": round(t_data, 2), "pretrain_s": round(t_pre, 2),
           "total_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
           "methods": {}}
    for name, m in methods.items():
        out["methods"][name] = {"auroc": m["auroc"], "worst_group_auroc": m["worst_group_auroc"],
                                "group_auroc": m["group_auroc"], "dice": m["dice"],
                                "s_global": m.get("s_global"), "wall_s": m.get("wall_s"),
                                "dead": dead(models[name], evalset, m),
                                "pixels": pixel_diagnostics(models[name], evalset, test)}
    c, r, o = (out["methods"][k] for k in ("coarse", "retrain", "oracle"))
    out["shortcut_gap"] = c["auroc"] - c["worst_group_auroc"]
    out["headroom"] = o["worst_group_auroc"] - r["worst_group_auroc"]
    out["data_stats"] = {
        "private_artefact_rate": float(private.has_artefact.float().mean()),
        "private_forget_fraction": float((private.coarse & ~private.fine).float().mean()),
        "private_lesion_fraction": float(private.fine.float().mean()),
        "test_artefact_rate": float(test.has_artefact.float().mean()),
    }
    return out


def summarise(runs: list[dict]) -> dict:
    def ms(values):
        values = list(values)
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    table = {}
    for name in runs[0]["methods"]:
        table[name] = {k: ms(r["methods"][name][k] for r in runs) for k in ("auroc", "worst_group_auroc", "dice")}
    gap = ms(r["shortcut_gap"] for r in runs)
    head = ms(r["headroom"] for r in runs)
    return {"methods": table, "shortcut_gap": gap, "headroom": head,
            "targets": {"shortcut_gap_each_seed_ge_0.15": all(r["shortcut_gap"] >= SHORTCUT_GAP for r in runs),
                        "shortcut_gap_mean_ge_0.15": gap["mean"] >= SHORTCUT_GAP,
                        "headroom_mean_ge_0.05": head["mean"] >= HEADROOM},
            "dead_models": [{"seed": r["seed"], "method": n, "why": m["dead"]}
                            for r in runs for n, m in r["methods"].items() if m["dead"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-public", type=int, default=300)
    p.add_argument("--n-private", type=int, default=600)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--public-steps", type=int, default=300)
    p.add_argument("--coarse-steps", type=int, default=400)
    p.add_argument("--retrain-steps", type=int, default=400)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--difficulty", default="hard")
    p.add_argument("--same-domain", action="store_true", help="public split from the private distribution")
    p.add_argument("--generator", default="{}", help="extra SyntheticShortcuts keywords as JSON")
    p.add_argument("--public-generator", default="{}", help="extra keywords of the public split only, as JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the runs and summary as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    generator = {"difficulty": args.difficulty, **json.loads(args.generator)}
    public_generator = json.loads(args.public_generator)
    config = DemoConfig(image_size=args.image_size, n_public=args.n_public, n_private=args.n_private,
                        n_test=args.n_test, public_steps=args.public_steps, coarse_steps=args.coarse_steps,
                        retrain_steps=args.retrain_steps, width=args.width, s_global_boot=20,
                        eval_every=10**9,  # no trajectory: only the final models matter here
                        methods=("coarse", "retrain", "oracle"))
    runs = []
    for seed in args.seeds:
        run = run_seed(config, seed, same_domain=args.same_domain, generator=generator,
                       public_generator=public_generator)
        runs.append(run)
        m = run["methods"]
        print(f"seed {seed}: " + "  ".join(
            f"{k} auroc {v['auroc']:.3f} wga {v['worst_group_auroc']:.3f} dice {v['dice']:.3f}"
            + (f" DEAD({'; '.join(v['dead'])})" if v["dead"] else "") for k, v in m.items())
            + f"  | shortcut gap {run['shortcut_gap']:.3f} headroom {run['headroom']:.3f}"
            + f"  [{run['total_s']:.0f}s (cpu {run['cpu_s']:.0f}s): data {run['data_s']:.0f}, "
              f"pretrain {run['pretrain_s']:.0f}]", flush=True)
        for k, v in m.items():
            px = v["pixels"]
            print(f"    {k:8s} p(lesion) {px['lesion']:.2f} p(skin) {px['skin']:.3f} p(artefact) "
                  + " ".join(f"{a} {x:.2f}" for a, x in px["artefact"].items()) + " | by type "
                  + " ".join(f"{a} {x:.2f}" for a, x in px["lesion_by_type"].items()), flush=True)
    summary = summarise(runs)
    print(json.dumps({k: summary[k] for k in ("shortcut_gap", "headroom", "targets", "dead_models")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"date": dt.date.today().isoformat(), "argv": sys.argv[1:],
               "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{args.threads} thread(s)",
               "config": dataclasses.asdict(config) | {"methods": list(config.methods)},
               "generator": generator, "public_generator": public_generator,
               "public_domain": "private" if args.same_domain else "public",
               "targets": {"shortcut_gap": SHORTCUT_GAP, "headroom": HEADROOM},
               "summary": summary, "runs": runs}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
