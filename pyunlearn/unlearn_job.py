"""``pyunlearn unlearn CONFIG.toml``: unlearn the coarse-mask shortcut of a user's own trained model.

The job: check the whole file (:func:`pyunlearn.config.load_unlearn_config`), build the user's model
(:func:`pyunlearn.user_model.build_user_model`), split the data set into the images to unlearn with and a
held-out evaluation split, evaluate the model, run the operator, evaluate the result, and write to ``out``:

* ``unlearned.pt``: the user's state dict (the user's key names), unless the result is dead;
* ``certificate.json``: the certificate of a certified operator, listing the frozen parameters as assumed
  public (``public_parameters``);
* ``report.json`` / ``report.md``: the evaluation on the held-out split before and after, side by side (Dice on
  fine masks where present; pooled-score AUROC where labels exist, worst-group AUROC where artefact flags
  exist), or ``dead`` (constant output, or a blank segmentation) instead of numbers.

Data is read through DataLoaders a batch at a time (the operators through
:class:`pyunlearn.unlearn.StreamingSegmentationData`), never stacked whole.

A configuration (relative paths are relative to the file)::

    out = "runs/unlearned"
    [model]
    factory = "monai.networks.nets:UNet"       # "package.module:callable"
    kwargs = { spatial_dims = 2, in_channels = 3, out_channels = 2, channels = [16, 32, 64], strides = [2, 2] }
    weights = "coarse_model.pt"                # a state dict (torch.load(weights_only=True))
    certify = ["model.2.*"]                     # fnmatch patterns: the certified parameters; the rest is frozen
    output = 0                                  # optional: selects the logits of a tuple/list (int) or dict (str)
    replace_batchnorm = false                   # optional: BatchNorm -> GroupNorm before unlearning
    [unlearn]
    operator = "gradient_clipping"              # see pyunlearn.config.SEGMENTATION_OPERATORS
    epsilon = 1.0
    delta = 1e-5
    loss = "dice_ce"                            # any other keyword argument of the operator
    [data]
    kind = "folder"                             # CoarseFineFolder's arguments; "nifti": NiftiFolder's (3-D
                                                # volumes, same keys); or "isic" with ISIC2018's
    images = "data/images"
    coarse = "data/coarse"
    fine = "data/fine"
    labels_csv = "data/labels.csv"
    [split]
    test = 0.2                                  # held-out evaluation split
    seed = 0
    [evaluation]
    batch_size = 16                             # optional: evaluation batches
"""
from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from .certify import Certificate
from .config import ConfigError, UnlearnConfig, load_unlearn_config, operator_function
from .user_model import UserModel, build_user_model, select_output

__all__ = ["evaluate_stream", "run_unlearn", "unlearning_data"]

_METRICS = (("dice", "Dice (fine masks)"), ("auroc", "AUROC (pooled score)"),
            ("worst_group_auroc", "worst-group AUROC"))


def _dataset(cfg: UnlearnConfig):
    from . import data

    loader = {"folder": data.CoarseFineFolder, "nifti": data.NiftiFolder, "isic": data.ISIC2018}[cfg.kind]
    return loader(**cfg.data)


def _split(n: int, test: float, seed: int, *, where: str) -> tuple[list[int], list[int]]:
    """``(unlearn, test)`` image indices: a seeded permutation, ``round(test * n)`` (at least 1) held out."""
    n_test = max(1, int(round(test * n)))
    if n - n_test < 1:
        raise ValueError(f"{where}[split] test = {test} leaves no image to unlearn with ({n} images)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_test:]), sorted(order[:n_test])


def unlearning_data(dataset, **kwargs):
    """The operators' data from a Dataset of item dicts: :class:`~pyunlearn.unlearn.StreamingSegmentationData`
    (memory bounded)."""
    from .unlearn import StreamingSegmentationData

    return StreamingSegmentationData(dataset, **kwargs)


def _dead(n: int, total: float, squares: float, above: int, finite: bool, foreground: int) -> Optional[str]:
    """:func:`pyunlearn.pipeline.dead_reason`'s rule from running sums of the foreground probabilities."""
    from .pipeline import dead_reason_of_sums

    return dead_reason_of_sums(n, total, squares, above, finite, where="held-out split", foreground=foreground)


def evaluate_stream(model: nn.Module, dataset, *, batch_size: int = 16, progress: bool = False) -> dict:
    """Evaluate ``model`` on a Dataset of item dicts, one batch at a time.

    Returns ``{"status": "ok", "n_images", "dice", "n_fine", "auroc", "worst_group_auroc", "group_auroc",
    "notes"}`` (a metric the data cannot give is None, with a note saying why), or ``{"status": "dead",
    "reason"}`` for a model with (near-)constant or non-finite output, or a blank segmentation of fine-masked
    images (:func:`pyunlearn.pipeline.dead_reason`'s rule), whose numbers are never reported."""
    from tqdm.auto import tqdm

    from .metrics import auroc, subgroup_auroc
    from .pipeline import foreground_probabilities

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    n_px, total, squares, above, finite = 0, 0.0, 0.0, 0, True
    inter = pred_sum = true_sum = 0.0
    n_fine = 0
    scores, labels, artefacts = [], [], []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
                images = batch["image"]
                logits = select_output(model(images), None)
                spatial = tuple(images.shape[2:])
                if logits.dim() != 2 + len(spatial) or tuple(logits.shape[2:]) != spatial:
                    raise ValueError(f"the model maps images of shape {tuple(images.shape)} to logits of shape "
                                     f"{tuple(logits.shape)}; expected (B, K, {', '.join(map(str, spatial))})")
                probs = foreground_probabilities(logits.float()).double()
                finite &= bool(torch.isfinite(probs).all())
                n_px += probs.numel()
                total += float(probs.sum())
                squares += float((probs * probs).sum())
                pred = probs > 0.5
                above += int(pred.sum())
                has_fine = batch["has_fine"].bool().reshape(-1)
                if has_fine.any():
                    p, t = pred[has_fine], batch["fine"].bool()[has_fine]
                    inter += float((p & t).sum())
                    pred_sum += float(p.sum())
                    true_sum += float(t.sum())
                    n_fine += int(has_fine.sum())
                scores.append(probs.flatten(1).mean(dim=1))
                labels.append(batch["label"].reshape(-1).long())
                artefacts.append(batch["artefacts"].reshape(images.shape[0], -1))
    finally:
        model.train(was_training)
    reason = _dead(n_px, total, squares, above, finite, int(true_sum))
    if reason is not None:
        return {"status": "dead", "reason": reason}
    notes: list[str] = []
    result: dict[str, Any] = {"status": "ok", "n_images": int(sum(s.numel() for s in scores)), "n_fine": n_fine,
                              "dice": None, "auroc": None, "worst_group_auroc": None, "group_auroc": None}
    if n_fine:
        eps = 1e-7
        result["dice"] = (2.0 * inter + eps) / (pred_sum + true_sum + eps)
    else:
        notes.append("no held-out image has a fine mask: no Dice")
    s, y, a = torch.cat(scores), torch.cat(labels), torch.cat(artefacts)
    known = y >= 0
    s, y, a = s[known], y[known], a[known]
    if not known.any():
        notes.append("no image-level labels (labels_csv): no AUROC")
    elif not set(y.unique().tolist()) <= {0, 1}:
        notes.append(f"labels are not binary ({sorted(set(y.unique().tolist()))}): no AUROC")
    elif y.unique().numel() < 2:
        notes.append("the held-out split has one class only: no AUROC")
    elif a.shape[1] == 0:
        result["auroc"] = auroc(s, y)
        notes.append("no artefact flags (artefacts_csv): no worst-group AUROC")
    else:
        groups = subgroup_auroc(s, y, a.sum(dim=1) > 0)
        result.update(auroc=groups["auroc"], worst_group_auroc=groups["worst_group_auroc"],
                      group_auroc=groups["groups"])
        if groups["worst_group_auroc"] is None:
            notes.append("some artefact subgroup is empty: no worst-group AUROC")
    result["notes"] = notes
    return result


def _certificate(record_cert: Optional[dict], user: UserModel) -> Optional[Certificate]:
    """The operator's certificate in the user's parameter names, listing the frozen parameters as public."""
    if record_cert is None:
        return None
    cert = Certificate.from_dict(record_cert)
    cert.parameters = [user.user_name(n) for n in cert.parameters]
    if sorted(cert.parameters) != sorted(user.certified):  # pragma: no cover - the operators certify requires_grad
        raise RuntimeError(f"the certificate covers {cert.parameters}, but [model] certify selected {user.certified}")
    cert.public_parameters = list(user.public)
    if user.public:
        cert.assumptions.append(
            f"the {len(user.public)} frozen parameters listed in public_parameters, and the model's buffers, are "
            "public: they never saw the private training data (e.g. a public pretrained encoder); the certificate "
            "covers the released model only under this assumption")
    return cert


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _markdown(report: dict) -> str:
    before, after, cfg = report["before"], report["after"], report["config"]
    lines = [f"# pyunlearn unlearn: {cfg['operator']}", "",
             f"Configuration: `{cfg['source']}`; model `{cfg['model']['factory']}` from `{cfg['model']['weights']}`; "
             f"{cfg['split']['n_unlearn']} images unlearned with, {cfg['split']['n_test']} held out "
             f"(test = {cfg['split']['test']}, seed {cfg['split']['seed']}).", "",
             "| metric (held-out split) | before | after |", "|---|---|---|"]
    for key, label in _METRICS:
        cells = [("dead" if r["status"] == "dead" else _fmt(r.get(key))) for r in (before, after)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for name, r in (("before", before), ("after", after)):
        if r["status"] == "dead":
            lines.append(f"\n**The model {name} unlearning is dead**: {r['reason']}. No metrics are reported for it.")
        for note in r.get("notes", []):
            lines.append(f"\n- {name}: {note}")
    lines += ["", "## Released model", ""]
    if report["released"]:
        lines.append("`unlearned.pt`: the state dict of your model, with your key names.")
    else:
        lines.append(f"Nothing released: the unlearned model is dead ({report['after']['reason']}).")
    if cfg["model"]["converted"]:
        lines.append(f"BatchNorm was replaced by GroupNorm in {len(cfg['model']['converted'])} module(s) "
                     "(replace_batchnorm = true): load `unlearned.pt` into the converted architecture.")
    cert = report["certificate"]
    lines += ["", "## Certificate", ""]
    if cert is None:
        lines.append(f"None: operator '{cfg['operator']}' is not certified." if report["released"] else
                     "None (nothing released).")
    else:
        lines += [f"({cert['epsilon']:.4g}, {cert['delta']:.3g})-certified, noise "
                  f"{'seeded (reproducible, NOT secret)' if cert['seeded'] else 'secret'}; covers "
                  f"{len(cert['parameters'])} parameter tensor(s), {len(cert['public_parameters'])} frozen ones "
                  "assumed public (see `certificate.json`).", "", "Assumptions:", ""]
        lines += [f"- {a}" for a in cert["assumptions"]]
        if cert["not_covered"]:
            lines += ["", "NOT covered:", ""] + [f"- {x}" for x in cert["not_covered"]]
    lines += ["", f"Wall time of the operator: {report['record']['wall_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def _summary(report: dict, out: Path) -> str:
    rows = [f"{'metric':<22} {'before':>10} {'after':>10}"]
    for key, label in _METRICS:
        cells = [("dead" if r["status"] == "dead" else _fmt(r.get(key))) for r in (report["before"], report["after"])]
        rows.append(f"{label:<22} {cells[0]:>10} {cells[1]:>10}")
    rows.append(f"\nreport: {out / 'report.md'}" + ("" if report["released"] else "  (dead result: nothing released)"))
    return "\n".join(rows)


def run_unlearn(path: str | Path, *, progress: bool = True) -> dict:
    """Run ``pyunlearn unlearn CONFIG.toml``; returns ``{"report", "out", "released", "summary"}``."""
    path = Path(path)
    cfg = load_unlearn_config(path)  # everything checked before any data is read
    try:
        user = build_user_model(factory=cfg.factory_fn, kwargs=cfg.kwargs, weights=cfg.weights, certify=cfg.certify,
                                output=cfg.output, replace_batchnorm=cfg.replace_batchnorm,
                                where=f"{path}: [model] ")
    except (ValueError, TypeError) as exc:  # the model does not fit its configuration: still before any data
        raise ConfigError(str(exc)) from exc
    dataset = _dataset(cfg)
    train_idx, test_idx = _split(len(dataset), cfg.test, cfg.seed, where=f"{path}: ")
    test_set, train_set = Subset(dataset, test_idx), Subset(dataset, train_idx)
    before = evaluate_stream(user.module, test_set, batch_size=cfg.batch_size, progress=progress)
    data = unlearning_data(train_set)
    if cfg.operator == "psg_segmentation":  # it keeps every forget image's labels: the unlearning split in memory
        data = data.batch(data.image_indices("all"))
    op = operator_function(cfg.operator)
    kwargs = dict(cfg.operator_kwargs)
    if "progress" in inspect.signature(op).parameters:
        kwargs["progress"] = progress
    t0 = time.perf_counter()
    trained, record = op(user.module, data, **kwargs)
    wall = time.perf_counter() - t0
    after = evaluate_stream(trained, test_set, batch_size=cfg.batch_size, progress=progress)
    released = after["status"] == "ok"
    cert = _certificate(record.get("certificate"), user) if released else None
    out = cfg.out
    if released:
        torch.save(user.user_state_dict(trained), out / "unlearned.pt")
        if cert is not None:
            (out / "certificate.json").write_text(json.dumps(json.loads(cert.to_json()), indent=2) + "\n")
    report = {
        "config": {"source": str(path), "operator": cfg.operator, "operator_kwargs": cfg.operator_kwargs,
                   "model": {"factory": cfg.factory, "kwargs": cfg.kwargs, "weights": str(cfg.weights),
                             "certify": cfg.certify, "output": cfg.output, "replace_batchnorm": cfg.replace_batchnorm,
                             "converted": user.converted, "certified": user.certified, "public": user.public},
                   "data": cfg.raw["data"],
                   "split": {"test": cfg.test, "seed": cfg.seed, "n_unlearn": len(train_idx), "n_test": len(test_idx),
                             "test_ids": _ids(dataset, test_idx)}},
        "before": before, "after": after, "released": released,
        "certificate": None if cert is None else json.loads(cert.to_json()),
        "record": {"method": record.get("method", cfg.operator), "wall_s": record.get("wall_s", wall),
                   "hyperparameters": record.get("hyperparameters"), "losses": record.get("losses", [])},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return {"report": report, "out": out, "released": released, "summary": _summary(report, out)}


def _ids(dataset, indices: list[int]) -> Optional[list[str]]:
    ids = getattr(dataset, "ids", None)
    if ids is None:
        return None
    try:
        return [str(ids[i]) for i in indices]
    except (TypeError, IndexError, KeyError):
        return None


def _jsonable(value):
    if isinstance(value, (Path,)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
