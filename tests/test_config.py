"""Configuration files and command-line flags are checked completely before any work starts."""
import dataclasses
import math

import pytest

import pyunlearn.data._io
import pyunlearn.pipeline
from pyunlearn import config as cfg
from pyunlearn.cli import main
from pyunlearn.config import ConfigError, load_run_config
from pyunlearn.pipeline import DemoConfig


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Any data loading or training fails the test: every error must come before them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the configuration was checked")

    for name in ("pretrain", "run_synthetic_demo", "run_pipeline", "StreamingEvalSet"):
        monkeypatch.setattr(pyunlearn.pipeline, name, forbidden)
    monkeypatch.setattr(pyunlearn.data._io.PairedImageMaskDataset, "__getitem__", forbidden)


def write(tmp_path, body: str, *, name="run.toml"):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text('out = "report"\n[data]\nkind = "folder"\nimages = "images"\nmasks = "masks"\n'
                    'labels_csv = "labels.csv"\n' + body)
    (tmp_path / "labels.csv").write_text("image,label\n")
    return path


def run(path):
    return main(["run", str(path), "--no-progress"])


# ------------------------------------------------------------------ the five failures of the brief
def test_misspelt_split_key_fails_at_once_with_a_hint(tmp_path):
    path = write(tmp_path, "[split]\ntests = 0.5\n")
    with pytest.raises(ConfigError, match=r"run\.toml: \[split\] unknown key 'tests' \(did you mean 'test'\?\)"):
        run(path)


def test_string_epsilon_fails_before_pretraining(tmp_path):
    path = write(tmp_path, '[pipeline]\nepsilon = "1.0"\n')
    with pytest.raises(ConfigError, match=r"run\.toml: \[pipeline\] epsilon must be a number, got str '1\.0'"):
        run(path)


def test_methods_as_a_string_is_not_split_into_letters(tmp_path):
    path = write(tmp_path, '[pipeline]\nmethods = "retrain"\n')
    with pytest.raises(ConfigError, match=r"\[pipeline\] methods must be a list of strings.*got str 'retrain'"):
        run(path)
    path = write(tmp_path, '[pipeline]\nmethods = ["retrain", "finetun"]\n')
    with pytest.raises(ConfigError, match=r"\[pipeline\] methods: unknown value 'finetun' \(did you mean 'finetune'"):
        run(path)


def test_unwritable_out_fails_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    path = write(tmp_path, "")
    path.write_text(path.read_text().replace('out = "report"', 'out = "a_file/report"'))
    with pytest.raises(ConfigError, match=r"run\.toml: out: cannot create or write the folder .*a_file/report"):
        run(path)
    assert not any(p.name.startswith(".pyunlearn-write-probe") for p in tmp_path.rglob("*"))


def test_a_writable_out_is_created_and_left_clean(tmp_path):
    path = write(tmp_path, "[split]\ntest = 0.25\nseed = 3\n[pipeline]\nepsilon = 2\nmethods = ['retrain']\n")
    run_cfg = load_run_config(path)
    assert run_cfg.out == tmp_path / "report" and run_cfg.out.is_dir() and not list(run_cfg.out.iterdir())
    assert (run_cfg.test, run_cfg.seed, run_cfg.public) == (0.25, 3, 0.3)
    assert run_cfg.pipeline.epsilon == 2.0 and isinstance(run_cfg.pipeline.epsilon, float)
    assert run_cfg.pipeline.methods == ("retrain",)
    assert run_cfg.data["images"] == str(tmp_path / "images")  # relative to the file


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], r"argument --seed: must be an integer in \[0, 2\*\*43\), got -1"),
    (["--seed", str(2**43)], r"argument --seed: must be an integer in \[0, 2\*\*43\)"),
    (["--seeds", "0", "-3"], r"argument --seeds: must be an integer in \[0, 2\*\*43\), got -3"),
    (["--seeds", "1", "1"], r"argument --seeds: lists a seed more than once"),
    (["--seed", "x"], r"argument --seed: must be an integer, got 'x'"),
    (["--noise-seed", "-1"], r"argument --noise-seed: must be an integer in \[0, 2\*\*63\)"),
    (["--noise-seed", str(2**63)], r"argument --noise-seed: must be an integer in \[0, 2\*\*63\)"),
    (["--threads", "0"], r"argument --threads: must be an integer in \[1,"),
])
def test_demo_flags_fail_at_once(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "out"), "--quick", "--no-progress", *flags])
    assert exc.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_demo_unwritable_folders_fail_at_once(tmp_path, capsys, flag):
    (tmp_path / "a_file").write_text("x")
    args = {"--out": str(tmp_path / "out"), "--checkpoint-dir": str(tmp_path / "ck")}
    args[flag] = str(tmp_path / "a_file" / "sub")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--quick", "--no-progress", *[x for kv in args.items() for x in kv]])
    assert exc.value.code == 2
    assert f"argument {flag}: cannot create or write the folder" in capsys.readouterr().err


def test_demo_valid_flags_reach_the_job(tmp_path, monkeypatch):
    seen = {}

    def fake(out, *, seed, config, **kwargs):
        seen.update(out=out, seed=seed, noise_seed=config.noise_seed)
        return {"methods": {}, "config": {"total_wall_s": 0.0}}

    monkeypatch.setattr(pyunlearn.pipeline, "run_synthetic_demo", fake)
    assert main(["demo", "--out", str(tmp_path / "o"), "--quick", "--no-progress", "--seed", str(2**43 - 1),
                 "--noise-seed", str(2**63 - 1)]) == 0
    assert seen == {"out": tmp_path / "o", "seed": 2**43 - 1, "noise_seed": 2**63 - 1}


# ------------------------------------------------------------------ the rest of the run schema
@pytest.mark.parametrize("body, message", [
    ('outt = "x"\n', r"run\.toml: unknown key 'outt' \(did you mean 'out'\?\)"),
    ("[pipeline]\nepsilonn = 1.0\n", r"\[pipeline\] unknown key 'epsilonn' \(did you mean 'epsilon'\?\)"),
    ("[pipeline]\nwidth = true\n", r"\[pipeline\] width must be an integer, got bool True"),
    ("[pipeline]\nwidth = 4.0\n", r"\[pipeline\] width must be an integer, got float 4\.0"),
    ("[pipeline]\nepsilon = 0\n", r"\[pipeline\] epsilon must be > 0, got 0"),
    ("[pipeline]\nepsilon = nan\n", r"\[pipeline\] epsilon must be a finite number"),
    ("[pipeline]\ndelta = 1.0\n", r"\[pipeline\] delta must lie in \(0, 1\), got 1\.0"),
    ("[pipeline]\nfine_fraction = 0.0\n", r"\[pipeline\] fine_fraction must lie in \(0, 1\]"),
    ("[pipeline]\ngc_steps = 0\n", r"\[pipeline\] gc_steps must be >= 1, got 0"),
    ("[pipeline]\nnoise_seed = -2\n", r"\[pipeline\] noise_seed must be an integer in \[0, 2\*\*63\)"),
    ("[pipeline]\ndifficulty = 'hrad'\n", r"\[pipeline\] difficulty: unknown value 'hrad' \(did you mean 'hard'"),
    ("[pipeline]\nmethods = ['retrain', 'retrain']\n", r"\[pipeline\] methods must list each method once"),
    ("[split]\ntest = 1.5\n", r"\[split\] test must lie in \(0, 1\), got 1\.5"),
    ("[split]\nseed = -1\n", r"\[split\] seed must be an integer in \[0, 2\*\*43\), got -1"),
    ("[split]\npublic = 0.6\ntest = 0.5\n", r"\[split\] public \+ test must be < 1"),
    ("[split]\nseed = '0'\n", r"\[split\] seed must be an integer, got str '0'"),
    ("split = 3\n", r"run\.toml: split must be a table, got int 3"),
])
def test_run_schema_errors(tmp_path, body, message):
    path = write(tmp_path, "")
    text = path.read_text()
    # top-level keys must come before the first table
    path.write_text(body + text if not body.startswith("[") else text + body)
    with pytest.raises(ConfigError, match=message):
        run(path)


@pytest.mark.parametrize("data, message", [
    ('kind = "folder"\nimages = "images"\n', r"\[data\] missing required entry 'masks'"),
    ('kind = "folder"\nimages = "images"\nmasks = "nowhere"\n', r"\[data\] masks: no such folder .*nowhere"),
    ('kind = "folder"\nimages = "images"\nmasks = "masks"\nlabel_csv = "l.csv"\n',
     r"\[data\] unknown key 'label_csv' \(did you mean 'labels_csv'\?\)"),
    ('kind = "folder"\nimages = "images"\nmasks = "masks"\nsize = [0, 4]\n', r"\[data\] size must be a positive"),
    ('kind = "folder"\nimages = "images"\nmasks = "masks"\ncoarse_mode = "box"\n',
     r"\[data\] coarse_mode: unknown value 'box'"),
    ('kind = "isic"\nroot = "images"\nsize = "16"\n', r"\[data\] size must be a positive integer"),
    ('kind = "nope"\n', r"\[data\] kind must be 'isic' or 'folder', got 'nope'"),
])
def test_run_data_errors(tmp_path, data, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    path = tmp_path / "run.toml"
    path.write_text(f'out = "r"\n[data]\n{data}')
    with pytest.raises(ConfigError, match=message):
        run(path)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("out = \n")
    with pytest.raises(ConfigError, match=r"run\.toml: not valid TOML"):
        run(path)
    with pytest.raises(ConfigError, match=r"missing\.toml: no such configuration file"):
        run(tmp_path / "missing.toml")


def test_demo_config_spec_follows_the_dataclass():
    spec = cfg.demo_config_spec()
    assert list(spec) == [f.name for f in dataclasses.fields(DemoConfig)]
    checked = cfg.check_table("t.toml", "pipeline", DemoConfig().to_dict() | {"noise_seed": 5}, spec)
    assert DemoConfig(**{**checked, "methods": tuple(checked["methods"])}) == dataclasses.replace(DemoConfig(),
                                                                                               noise_seed=5)
    floats = [f.name for f in dataclasses.fields(DemoConfig) if isinstance(f.default, float)]
    assert floats and all(spec[n].kind == "float" for n in floats)
    assert all(spec[f.name].rule is not None for f in dataclasses.fields(DemoConfig)
               if isinstance(f.default, (int, float)) and not isinstance(f.default, bool))


def test_int_is_taken_for_a_float_nothing_else():
    spec = {"x": cfg.Key("float"), "n": cfg.Key("int")}
    assert cfg.check_table("f", "t", {"x": 2, "n": 3}, spec) == {"x": 2.0, "n": 3}
    for bad in ("2", True, [2.0], math.inf):
        with pytest.raises(ConfigError, match=r"f: \[t\] x must be a"):
            cfg.check_table("f", "t", {"x": bad}, spec)


def test_range_rules_name_only_existing_fields():
    assert set(cfg._demo_rules()) <= {f.name for f in dataclasses.fields(DemoConfig)}


def test_operator_spec_follows_the_signature():
    import inspect

    for name in cfg.SEGMENTATION_OPERATORS:
        spec = cfg.operator_spec(name)
        params = inspect.signature(cfg.operator_function(name)).parameters
        assert set(spec) == {p for p in params if p not in ("model", "data", "eval_fn", "eval_every", "inplace",
                                                            "progress")}, name
        assert all(k.kind != "any" for k in spec.values()), name
