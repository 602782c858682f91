"""Up-front validation of configuration files and command-line values.

Every check here runs before any data is read or any model trained: unknown keys at every level (with a
"did you mean" hint), types (an integer is accepted for a float, nothing else is converted), ranges, and
that the output folders can be created and written. Errors are :class:`ConfigError` (a ``ValueError``)
naming the file, the table and the key, e.g. ``run.toml: [split] unknown key 'tests' (did you mean 'test'?)``.

``load_run_config`` validates a ``pyunlearn run`` file, ``load_unlearn_config`` a ``pyunlearn unlearn``
file. Their schemas are derived from the code they configure: :class:`pyunlearn.pipeline.DemoConfig`'s
fields, the data loaders' and the unlearning operators' signatures.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import collections.abc
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["ConfigError", "Key", "check_table", "check_writable_dir", "demo_config_spec", "load_run_config",
           "load_unlearn_config", "operator_function", "operator_spec", "RunConfig", "UnlearnConfig",
           "SEGMENTATION_OPERATORS", "SEED_LIMIT", "NOISE_SEED_LIMIT"]

#: Data seeds must fit ``seed * 1_000_003 + epoch`` in torch's 64-bit generator seed.
SEED_LIMIT = 2**43
#: Noise seeds.
NOISE_SEED_LIMIT = 2**63


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the file, the table and the key."""


# --------------------------------------------------------------------------------------------
# Key specifications and range rules
# --------------------------------------------------------------------------------------------
#: A rule returns a complaint ("must be > 0") or None.
Rule = Callable[[Any], Optional[str]]


def interval(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A rule: the value lies in the interval."""
    def rule(v):
        if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            if hi == math.inf:
                return f"must be {'>' if lo_open else '>='} {lo:g}"
            return f"must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        return None
    return rule


def below(limit: int, *, text: str) -> Rule:
    """A rule: an integer in [0, limit) (``text`` spells the limit, e.g. ``2**43``)."""
    return lambda v: None if 0 <= v < limit else f"must be an integer in [0, {text})"


POSITIVE = interval(0.0, lo_open=True)
NON_NEGATIVE = interval(0.0)
AT_LEAST_ONE = interval(1)
FRACTION = interval(0.0, 1.0, lo_open=True, hi_open=True)
UNIT = interval(0.0, 1.0)
SEED = below(SEED_LIMIT, text="2**43")
NOISE_SEED = below(NOISE_SEED_LIMIT, text="2**63")

_KINDS = ("int", "float", "bool", "str", "path", "list[str]", "list[int]", "list[float]", "size", "table", "int|str",
          "any")


@dataclass(frozen=True)
class Key:
    """One key of a table: its kind (one of ``int float bool str path list[str] list[int] size table int|str
    any``), whether it is required, a range rule and the allowed values (``choices``; for ``list[str]``, of
    each element)."""

    kind: str = "any"
    required: bool = False
    rule: Optional[Rule] = None
    choices: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:  # pragma: no cover - a programming error
            raise ValueError(f"unknown key kind {self.kind!r}")


def _where(file: str, table: str) -> str:
    return f"{file}: [{table}] " if table else f"{file}: "


def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _hint(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _typed(value: Any, kind: str) -> tuple[bool, Any, str]:
    """``(ok, value, expected)``: ``value`` in its kind (an int is taken for a float; nothing else converts)."""
    if kind == "any":
        return True, value, ""
    if kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool)), value, "an integer"
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value, "a number"
        if not math.isfinite(value):
            return False, value, "a finite number"
        return True, float(value), "a number"
    if kind == "bool":
        return isinstance(value, bool), value, "true or false"
    if kind in ("str", "path"):
        return (isinstance(value, str) and value != ""), value, "a non-empty string"
    if kind == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return ok, value, "a list of strings, e.g. [\"a\", \"b\"]"
    if kind == "list[int]":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return ok, value, "a list of integers"
    if kind == "list[float]":
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) for v in value)
        return ok, ([float(v) for v in value] if ok else value), "a list of finite numbers"
    if kind == "size":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return True, value, ""
        ok = (isinstance(value, list) and len(value) in (2, 3)
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))
        return ok, (tuple(value) if ok else value), "a positive integer or a list of 2 (or 3) positive integers"
    if kind == "table":
        return isinstance(value, dict), value, "a table"
    if kind == "int|str":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)
        return ok, value, "an integer or a string"
    raise AssertionError(kind)  # pragma: no cover


def check_value(file: str, table: str, key: str, value: Any, spec: Key) -> Any:
    """One value against its spec; the checked value (ints as floats for float keys)."""
    ok, value, expected = _typed(value, spec.kind)
    if not ok:
        raise ConfigError(f"{_where(file, table)}{key} must be {expected}, got {_type_name(value)}")
    if spec.choices:
        values = value if spec.kind == "list[str]" else [value]
        for v in values:
            if v not in spec.choices:
                raise ConfigError(f"{_where(file, table)}{key}: unknown value {v!r}{_hint(str(v), spec.choices)}; "
                                  f"choose from {', '.join(map(repr, spec.choices))}")
    if spec.rule is not None:
        values = value if spec.kind in ("list[int]",) else [value]
        for v in values:
            complaint = spec.rule(v)
            if complaint:
                raise ConfigError(f"{_where(file, table)}{key} {complaint}, got {value!r}")
    return value


def check_table(file: str, table: str, values: Any, spec: dict[str, Key]) -> dict:
    """Every key of ``values`` known to ``spec``, every required one present, each value checked; returns
    the checked values (only the keys given)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: [{table}] must be a table, got {_type_name(values)}")
    for key in values:
        if key not in spec:
            raise ConfigError(f"{_where(file, table)}unknown key {key!r}{_hint(key, spec)}; known keys: "
                              f"{', '.join(sorted(spec))}")
    for key, s in spec.items():
        if s.required and key not in values:
            raise ConfigError(f"{_where(file, table)}missing required entry {key!r}")
    return {key: check_value(file, table, key, value, spec[key]) for key, value in values.items()}


def check_writable_dir(path: Path, *, what: str) -> Path:
    """Create ``path`` (and its parents) if needed and show that a file can be written and removed in it;
    ConfigError (``what`` names the key) otherwise. Returns ``path``."""
    path = Path(path)
    probe = path / f".pyunlearn-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"probe")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create or write the folder {str(path)!r} ({exc.strerror or exc})") \
            from None
    return path


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _check_exists(file: str, table: str, key: str, path: Path, *, folder: bool) -> Path:
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise ConfigError(f"{_where(file, table)}{key}: no such {kind} {str(path)!r}")
    return path


def _load_toml(path: Path) -> dict:
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


# --------------------------------------------------------------------------------------------
# Specs derived from the code
# --------------------------------------------------------------------------------------------
def _kind_of(hint: Any, default: Any) -> str:
    """The key kind of a type hint (``Optional[X]`` is X: TOML has no null, leave the key out instead)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _kind_of(args[0], default)
        return "any"
    for kind, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint is t:
            return kind
    if hint in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
        args = typing.get_args(hint)
        if not args or args[0] is str:
            return "list[str]"
        return {int: "list[int]", float: "list[float]"}.get(args[0], "any")
    if hint is inspect.Parameter.empty or hint is None:
        if isinstance(default, bool):
            return "bool"
        if isinstance(default, (int, float, str)):
            return {int: "int", float: "float", str: "str"}[type(default)]
    return "any"


def _hints(obj) -> dict:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # unresolvable annotations: fall back on the defaults' types
        return {}


def _demo_rules() -> dict[str, Key]:
    from .data.synthetic import DIFFICULTIES
    from .pipeline import METHODS

    steps = {"public_steps", "coarse_steps", "retrain_steps", "finetune_steps", "gc_steps", "mc_steps"}
    rules: dict[str, Key] = {name: Key("int", rule=AT_LEAST_ONE) for name in steps}
    rules.update(
        image_size=Key("int", rule=interval(4)), n_public=Key("int", rule=AT_LEAST_ONE),
        n_private=Key("int", rule=interval(2)), n_test=Key("int", rule=interval(2)),
        correlation=Key("float", rule=UNIT), dilation_radius=Key("int", rule=AT_LEAST_ONE),
        fine_fraction=Key("float", rule=interval(0.0, 1.0, lo_open=True)), width=Key("int", rule=AT_LEAST_ONE),
        batch_size=Key("int", rule=AT_LEAST_ONE), neggrad_beta=Key("float", rule=UNIT),
        epsilon=Key("float", rule=POSITIVE), delta=Key("float", rule=FRACTION),
        gc_weight_decay=Key("float", rule=NON_NEGATIVE), post_steps=Key("int", rule=NON_NEGATIVE),
        noise_seed=Key("int", rule=NOISE_SEED), eval_every=Key("int", rule=NON_NEGATIVE),
        s_global_boot=Key("int", rule=AT_LEAST_ONE), dead_retries=Key("int", rule=NON_NEGATIVE),
        difficulty=Key("str", choices=tuple(DIFFICULTIES)),
        fine_share=_OPERATOR_RULES["fine_share"],
        methods=Key("list[str]", choices=tuple(METHODS) + ("psg_segmentation",)),
    )
    return rules


def _generic_rule(name: str, kind: str) -> Optional[Rule]:
    """Ranges by naming convention, for keys without a rule of their own."""
    if kind not in ("int", "float"):
        return None
    if name == "seed" or name.endswith("_seed"):
        return NOISE_SEED if "noise" in name else SEED
    if name in ("lr", "sigma") or name.endswith("_lr") or name.startswith(("c0", "c1", "c2", "gc_c", "mc_c")):
        return POSITIVE
    if name == "steps" or name.endswith("_every") and name != "eval_every" or name == "batch_size":
        return AT_LEAST_ONE
    return NON_NEGATIVE


def demo_config_spec() -> dict[str, Key]:
    """One key per field of :class:`pyunlearn.pipeline.DemoConfig`: the kind from its annotation (or default),
    the range from the pipeline's own rules (a field without one: non-negative, finite)."""
    from .pipeline import DemoConfig

    hints, rules = _hints(DemoConfig), _demo_rules()
    spec = {}
    for f in dataclasses.fields(DemoConfig):
        if f.name in rules:
            spec[f.name] = rules[f.name]
        else:
            kind = _kind_of(hints.get(f.name, inspect.Parameter.empty), f.default)
            spec[f.name] = Key(kind, rule=_generic_rule(f.name, kind))
    return spec


#: Segmentation operators a ``pyunlearn unlearn`` file may name (psg_segmentation, which keeps every forget
#: image's new labels, reads the images it unlearns with in memory; the others stream them).
SEGMENTATION_OPERATORS = ("gradient_clipping", "model_clipping", "output_perturbation", "finetune", "neggrad_seg",
                          "relabel", "retrain", "psg_segmentation")
#: Operator arguments the job sets itself.
_JOB_ARGUMENTS = ("model", "data", "eval_fn", "eval_every", "inplace", "progress")
_OPERATOR_RULES = {
    "epsilon": Key("float", rule=POSITIVE), "delta": Key("float", rule=FRACTION),
    "finetune_steps": Key("int", rule=NON_NEGATIVE), "weight_decay": Key("float", rule=NON_NEGATIVE),
    "sigma0": Key("float", rule=NON_NEGATIVE), "beta": Key("float", rule=UNIT),
    "checkpoint": Key("path"), "noise_seed": Key("int", rule=NOISE_SEED),
    "fine_share": Key("float", rule=interval(0.0, 1.0, lo_open=True, hi_open=True)),
}


def operator_function(name: str) -> Callable:
    """The segmentation operator ``name`` (:data:`SEGMENTATION_OPERATORS`)."""
    import importlib

    module = "psg" if name == "psg_segmentation" else "segmentation"
    return getattr(importlib.import_module(f"pyunlearn.unlearn.{module}"), name)


def operator_spec(name: str) -> dict[str, Key]:
    """The keyword arguments of operator ``name`` a configuration may set (all but :data:`_JOB_ARGUMENTS`)."""
    from .losses import LOSSES

    fn = operator_function(name)
    hints = _hints(fn)
    spec = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in _JOB_ARGUMENTS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if p.name == "loss":
            spec[p.name] = Key("str", choices=tuple(LOSSES))
        elif p.name in _OPERATOR_RULES:
            spec[p.name] = _OPERATOR_RULES[p.name]
        else:
            kind = _kind_of(hints.get(p.name, p.annotation if not isinstance(p.annotation, str) else p.empty),
                            p.default)
            spec[p.name] = Key(kind, rule=_generic_rule(p.name, kind))
    return spec


def _signature_spec(cls, *, skip=(), paths=()) -> dict[str, Key]:
    """Keys from a loader's ``__init__`` (path arguments as paths, sizes as sizes)."""
    hints = _hints(cls.__init__)
    spec = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in paths:
            kind = "path"
        elif p.name == "size":
            kind = "size"
        elif p.name == "coarse_radius":
            spec[p.name] = Key("int", required=p.default is p.empty, rule=NON_NEGATIVE)
            continue
        else:
            kind = _kind_of(hints.get(p.name, p.empty), p.default)
        spec[p.name] = Key(kind, required=p.default is p.empty)
    return spec


# --------------------------------------------------------------------------------------------
# pyunlearn run
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """A checked ``pyunlearn run`` file."""

    source: Path
    out: Path
    kind: str
    data: dict  # the loader's keyword arguments (paths resolved)
    coarse_radius: int
    coarse_mode: str
    public: float
    test: float
    seed: int
    pipeline: Any  # DemoConfig
    raw: dict = field(default_factory=dict)  # the file as read


_SPLIT_RUN = {"public": Key("float", rule=FRACTION), "test": Key("float", rule=FRACTION), "seed": Key("int", rule=SEED)}


def _run_data_spec(kind: str) -> tuple[dict[str, Key], dict[str, bool]]:
    """The ``[data]`` keys of ``kind`` and which are paths resolved against the file (True: a folder)."""
    from .data import ISIC2018, ImageMaskFolder
    from .data._io import COARSE_MODES

    extra = {"kind": Key("str", required=True), "coarse_radius": Key("int", rule=AT_LEAST_ONE),
             "coarse_mode": Key("str", choices=tuple(COARSE_MODES))}
    if kind == "isic":
        paths = {"root": True}
        spec = _signature_spec(ISIC2018, skip=("coarse_radius", "coarse_mode"),
                               paths=("root", "image_dir", "mask_dir", "labels_csv", "artefacts_csv"))
    else:
        paths = {"images": True, "masks": True, "labels_csv": False}
        spec = _signature_spec(ImageMaskFolder, skip=("coarse_radius", "coarse_mode"), paths=tuple(paths))
    return {**spec, **extra}, paths


def _check_data_paths(file: str, table: str, data: dict, paths: dict[str, bool], base: Path) -> dict:
    data = dict(data)
    for key, folder in paths.items():
        if key in data:
            data[key] = str(_check_exists(file, table, key, _resolve(base, data[key]), folder=folder))
    return data


def load_run_config(path: str | Path) -> RunConfig:
    """Read and check a ``pyunlearn run`` file completely (nothing is loaded or trained); the output folder is
    created and shown writable. Relative paths (``out``, the data folders) are relative to the file."""
    from .pipeline import DemoConfig

    path = Path(path)
    file, base = str(path), path.parent
    raw = _load_toml(path)
    top = check_table(file, "", raw, {"out": Key("path", required=True), "data": Key("table", required=True),
                                      "split": Key("table"), "pipeline": Key("table")})
    kind = top["data"].get("kind")
    if kind not in ("isic", "folder"):
        raise ConfigError(f"{file}: [data] kind must be 'isic' or 'folder', got {kind!r}")
    spec, paths = _run_data_spec(kind)
    data = check_table(file, "data", top["data"], spec)
    data = _check_data_paths(file, "data", data, paths, base)
    split = check_table(file, "split", top.get("split", {}), _SPLIT_RUN)
    public, test = split.get("public", 0.3), split.get("test", 0.2)
    if public + test >= 1.0:
        raise ConfigError(f"{file}: [split] public + test must be < 1 (the rest is the private set), got "
                          f"{public} + {test}")
    pipeline = check_table(file, "pipeline", top.get("pipeline", {}), demo_config_spec())
    if "methods" in pipeline:
        methods = pipeline["methods"]
        duplicated = sorted({m for m in methods if methods.count(m) > 1})
        if duplicated or not methods:
            raise ConfigError(f"{file}: [pipeline] methods must list each method once, got {methods!r}")
        pipeline["methods"] = tuple(methods)
    config = DemoConfig(**pipeline)
    out = check_writable_dir(_resolve(base, top["out"]), what=f"{file}: out")
    loader = {k: v for k, v in data.items() if k not in ("kind", "coarse_radius", "coarse_mode")}
    return RunConfig(source=path, out=out, kind=kind, data=loader, coarse_radius=data.get("coarse_radius", 3),
                     coarse_mode=data.get("coarse_mode", "dilate"), public=public, test=test,
                     seed=split.get("seed", 0), pipeline=config, raw=raw)


# --------------------------------------------------------------------------------------------
# pyunlearn unlearn
# --------------------------------------------------------------------------------------------
@dataclass
class UnlearnConfig:
    """A checked ``pyunlearn unlearn`` file."""

    source: Path
    out: Path
    factory: str
    factory_fn: Callable
    kwargs: dict
    weights: Path
    certify: list
    output: Any  # None, an int or a str
    replace_batchnorm: bool
    operator: str
    operator_kwargs: dict  # epsilon, delta, loss and the operator's own
    kind: str
    data: dict  # the loader's keyword arguments (paths resolved)
    test: float
    seed: int
    batch_size: int  # of the evaluation and streaming loaders
    raw: dict = field(default_factory=dict)


_MODEL_SPEC = {"factory": Key("str", required=True), "kwargs": Key("table"), "weights": Key("path", required=True),
               "certify": Key("list[str]", required=True), "output": Key("int|str"),
               "replace_batchnorm": Key("bool")}
_SPLIT_UNLEARN = {"test": Key("float", rule=FRACTION), "seed": Key("int", rule=SEED)}
_EVAL_SPEC = {"batch_size": Key("int", rule=AT_LEAST_ONE)}


def _unlearn_data_spec(kind: str) -> tuple[dict[str, Key], dict[str, bool]]:
    from .data._io import COARSE_MODES

    if kind in ("folder", "nifti"):
        from .data import CoarseFineFolder, NiftiFolder

        paths = {"images": True, "coarse": True, "fine": True, "labels_csv": False, "artefacts_csv": False}
        spec = _signature_spec(CoarseFineFolder if kind == "folder" else NiftiFolder, paths=tuple(paths))
        if "foreground" in spec:
            spec["foreground"] = Key("any")
    else:
        from .data import ISIC2018

        paths = {"root": True}
        spec = _signature_spec(ISIC2018, paths=("root", "image_dir", "mask_dir", "labels_csv", "artefacts_csv",
                                                "coarse_dir"))
        spec["coarse_radius"] = Key("int", rule=AT_LEAST_ONE)
        spec["coarse_mode"] = Key("str", choices=tuple(COARSE_MODES))
    return {**spec, "kind": Key("str", required=True)}, paths


def load_unlearn_config(path: str | Path) -> UnlearnConfig:
    """Read and check a ``pyunlearn unlearn`` file completely before any work: every table's keys, the factory
    importable and callable, the weights file present, the operator known and its arguments checked against
    its signature, the data paths present, the output folder writable (and a checkpoint's folder). Relative
    paths are relative to the file."""
    from .user_model import load_factory

    path = Path(path)
    file, base = str(path), path.parent
    raw = _load_toml(path)
    top = check_table(file, "", raw, {"out": Key("path", required=True), "model": Key("table", required=True),
                                      "unlearn": Key("table", required=True), "data": Key("table", required=True),
                                      "split": Key("table"), "evaluation": Key("table")})
    model = check_table(file, "model", top["model"], _MODEL_SPEC)
    if not model["certify"]:
        raise ConfigError(f"{file}: [model] certify must list at least one parameter-name pattern")
    try:
        factory_fn = load_factory(model["factory"])
    except (ValueError, ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{file}: [model] factory: {exc}") from None
    kwargs = model.get("kwargs", {})
    try:
        inspect.signature(factory_fn).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{file}: [model.kwargs] do not fit {model['factory']}: {exc}") from None
    except ValueError:  # no signature to check (a builtin): the call will tell
        pass
    weights = _check_exists(file, "model", "weights", _resolve(base, model["weights"]), folder=False)

    unl = dict(top["unlearn"])
    operator = unl.pop("operator", None)
    if operator is None:
        raise ConfigError(f"{file}: [unlearn] missing required entry 'operator'")
    if operator not in SEGMENTATION_OPERATORS:
        raise ConfigError(f"{file}: [unlearn] operator: unknown operator {operator!r}"
                          f"{_hint(str(operator), SEGMENTATION_OPERATORS)}; choose from "
                          f"{', '.join(SEGMENTATION_OPERATORS)}")
    spec = operator_spec(operator)
    for key in unl:
        if key not in spec:
            raise ConfigError(f"{file}: [unlearn] operator {operator!r} takes no argument {key!r}{_hint(key, spec)};"
                              f" its arguments: {', '.join(sorted(spec))}")
    op_kwargs = check_table(file, "unlearn", unl, spec)
    if "checkpoint" in op_kwargs:
        ckpt = _resolve(base, op_kwargs["checkpoint"])
        check_writable_dir(ckpt.parent, what=f"{file}: [unlearn] checkpoint")
        op_kwargs["checkpoint"] = str(ckpt)

    kind = top["data"].get("kind")
    if kind not in ("isic", "folder", "nifti"):
        raise ConfigError(f"{file}: [data] kind must be 'isic', 'folder' or 'nifti', got {kind!r}")
    dspec, paths = _unlearn_data_spec(kind)
    data = _check_data_paths(file, "data", check_table(file, "data", top["data"], dspec), paths, base)
    data.pop("kind")
    if kind == "isic" and ("coarse_radius" in data) == ("coarse_dir" in data):
        raise ConfigError(f"{file}: [data] kind = 'isic' needs exactly one of coarse_dir (your coarse masks) or "
                          "coarse_radius (coarse masks simulated by dilating the fine ones)")
    split = check_table(file, "split", top.get("split", {}), _SPLIT_UNLEARN)
    evaluation = check_table(file, "evaluation", top.get("evaluation", {}), _EVAL_SPEC)
    out = check_writable_dir(_resolve(base, top["out"]), what=f"{file}: out")
    return UnlearnConfig(source=path, out=out, factory=model["factory"], factory_fn=factory_fn, kwargs=kwargs,
                         weights=weights, certify=list(model["certify"]), output=model.get("output"),
                         replace_batchnorm=model.get("replace_batchnorm", False), operator=operator,
                         operator_kwargs=op_kwargs, kind=kind, data=data, test=split.get("test", 0.2),
                         seed=split.get("seed", 0), batch_size=evaluation.get("batch_size", 16), raw=raw)
