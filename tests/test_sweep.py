"""``pyunlearn sweep``: the main job over fine fractions x seeds (quick configuration, a few cells)."""
import argparse
import json
import shutil
import statistics

import pytest

from pyunlearn import pipeline, sweep
from pyunlearn.config import ConfigError

FRACTIONS = ("0.05", "0.25")
METHODS = ["coarse", "retrain", "gradient_clipping"]


@pytest.fixture(autouse=True)
def private_key_file(tmp_path_factory, monkeypatch):
    """Checkpoints are authenticated with a key file of the test's own, outside the checkpoint folders."""
    monkeypatch.setenv("PYUNLEARN_CHECKPOINT_KEY_FILE", str(tmp_path_factory.mktemp("keys") / "checkpoint.key"))
    monkeypatch.delenv("PYUNLEARN_CHECKPOINT_KEY", raising=False)


def parse(argv):
    parser = argparse.ArgumentParser(prog="pyunlearn sweep")
    sweep.add_arguments(parser)
    return parser.parse_args(argv)


def quick_argv(out, *extra):
    return ["--out", str(out), "--quick", "--no-progress", "--fractions", *FRACTIONS, "--seeds", "0", "1",
            "--methods", "retrain", "gradient_clipping", *extra]


@pytest.fixture
def count_jobs(monkeypatch):
    """Counts (and optionally forbids) calls of the main job."""
    real = pipeline.run_synthetic_demo
    calls = []

    def counted(out_dir, **kwargs):
        calls.append((kwargs["config"].fine_fraction, kwargs["seed"]))
        return real(out_dir, **kwargs)

    monkeypatch.setattr(pipeline, "run_synthetic_demo", counted)
    return calls


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """One real quick sweep (2 fractions x 2 seeds, 3 methods, seeded noise, checkpoints), shared."""
    root = tmp_path_factory.mktemp("sweep")
    out, ckpt = root / "out", root / "ckpt"
    mp = pytest.MonkeyPatch()
    mp.setenv("PYUNLEARN_CHECKPOINT_KEY_FILE", str(root / "checkpoint.key"))
    try:
        code = sweep.main(parse(quick_argv(out, "--noise-seed", "3", "--checkpoint-dir", str(ckpt))))
    finally:
        mp.undo()
    return code, out, ckpt


def test_sweep_writes_cells_json_markdown_and_figure(quick_sweep):
    code, out, ckpt = quick_sweep
    assert code == 0
    assert not ckpt.exists()  # every cell's checkpoints deleted after success
    result = json.loads((out / "sweep.json").read_text())
    assert set(result) >= {"config", "cells", "summary", "n_cells"}
    assert result["config"]["fractions"] == [0.05, 0.25] and result["config"]["seeds"] == [0, 1]
    assert result["config"]["methods"] == METHODS and result["config"]["noise"] == "seeded"
    assert result["config"]["n_fine"] == {"0.05": 3, "0.25": 16}
    assert result["n_cells"] == {"ok": 4, "dead": 0, "failed": 0}
    assert [(c["fraction"], c["seed"]) for c in result["cells"]] == [(0.05, 0), (0.05, 1), (0.25, 0), (0.25, 1)]
    for c in result["cells"]:
        folder = out / c["path"]
        assert folder == sweep.cell_dir(out, c["fraction"], c["seed"])
        assert {"report.json", "report.md", "cell.json", "trajectory.png"} <= {p.name for p in folder.iterdir()}
        assert c["status"] == "ok" and list(c["methods"]) == METHODS
        for name, m in c["methods"].items():
            assert {"auroc", "worst_group_auroc", "dice", "wall_s", "epsilon", "delta"} <= set(m)
            assert 0.0 <= m["worst_group_auroc"] <= 1.0
        assert c["methods"]["gradient_clipping"]["epsilon"] <= 1.0 + 1e-9
        assert c["methods"]["gradient_clipping"]["delta"] == 1e-5
        assert c["methods"]["retrain"]["epsilon"] is None
    assert not list(out.glob("cells/*/*.partial"))
    for name in METHODS:
        for label in FRACTIONS:
            row = result["summary"][name][label]
            assert row["worst_group_auroc"]["n"] == 2 and row["n_dead"] == 0 and row["n_failed"] == 0
            assert set(row["worst_group_auroc"]) == {"mean", "std", "n", "min", "max"}
    md = (out / "sweep.md").read_text()
    for title in ("## AUROC", "## worst-group AUROC", "## Dice", "## wall time (s)", "## certificate epsilon",
                  "## Dead or failed cells"):
        assert title in md
    assert "| method | 0.05 (3) | 0.25 (16) |" in md
    wg = result["summary"]["retrain"]["0.05"]["worst_group_auroc"]
    assert f"| retrain | {wg['mean']:.3f} ± {wg['std']:.3f} (2)" in md
    assert "None." in md and "min-max over seeds" in md
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_sweep_aggregates_the_cell_reports(quick_sweep):
    _, out, _ = quick_sweep
    summary = json.loads((out / "sweep.json").read_text())["summary"]
    for name in METHODS:
        for label in FRACTIONS:
            reports = [json.loads((out / f"cells/fraction-{label}/seed-{s}/report.json").read_text())
                       for s in (0, 1)]
            for key in ("auroc", "worst_group_auroc", "dice", "wall_s"):
                values = [r["methods"][name][key] for r in reports]
                stat = summary[name][label][key]
                assert stat["mean"] == pytest.approx(statistics.fmean(values))
                assert stat["std"] == pytest.approx(statistics.stdev(values))
                assert (stat["n"], stat["min"], stat["max"]) == (2, min(values), max(values))
            assert ("epsilon" in summary[name][label]) == (name == "gradient_clipping")


def test_every_cell_has_its_own_noise(quick_sweep):
    _, out, _ = quick_sweep
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    seeds = [c["noise_seed"] for c in cells]
    assert None not in seeds and len(set(seeds)) == len(cells)
    operator = []
    for c in cells:
        report = json.loads((out / c["path"] / "report.json").read_text())
        assert report["config"]["noise_seed"] == c["noise_seed"]
        cert = report["methods"]["gradient_clipping"]["certificate"]
        assert cert["seeded"] is True
        operator.append(cert["hyperparameters"]["seed"])
    assert len(set(operator)) == len(cells)  # the operators' noise keys differ too


def without_wall_time(cells):
    return [{k: ({n: {k2: v2 for k2, v2 in m.items() if k2 != "wall_s"} for n, m in v.items()}
                 if k == "methods" else v) for k, v in c.items() if k != "wall_s"} for c in cells]


def test_cells_in_parallel_processes_give_the_same_results(quick_sweep, tmp_path, count_jobs):
    _, done, _ = quick_sweep
    out = tmp_path / "out"
    assert sweep.main(parse(quick_argv(out, "--noise-seed", "3", "--jobs", "2"))) == 0
    assert count_jobs == []  # every cell ran in a worker process
    serial = json.loads((done / "sweep.json").read_text())
    parallel = json.loads((out / "sweep.json").read_text())
    assert parallel["n_cells"] == {"ok": 4, "dead": 0, "failed": 0}
    assert without_wall_time(parallel["cells"]) == without_wall_time(serial["cells"])
    assert sorted(p.name for p in (out / "cells" / "fraction-0.05").iterdir()) == ["seed-0", "seed-1"]
    # complete cells are not rerun, whatever --jobs says
    assert sweep.main(parse(quick_argv(out, "--noise-seed", "3", "--jobs", "2"))) == 0
    assert json.loads((out / "sweep.json").read_text())["cells"] == parallel["cells"]  # wall times included


def test_cell_noise_seed_differs_per_fraction_and_seed():
    keys = {(f, s): sweep.cell_noise_seed(7, f, s) for f in (0.02, 0.05, 0.1, 0.25) for s in (0, 1, 2)}
    assert len(set(keys.values())) == len(keys)
    assert all(0 <= k < 2**63 for k in keys.values())
    # not the keys of the demo's jobs with the same data seeds, nor of another master seed
    assert not set(keys.values()) & {pipeline.job_noise_seed(7, s) for s in (0, 1, 2)}
    assert not set(keys.values()) & {sweep.cell_noise_seed(8, f, s) for f, s in keys}
    assert sweep.cell_noise_seed(7, 0.1, 1) == keys[(0.1, 1)]  # reproducible
    assert sweep.cell_noise_seed(None, 0.1, 1) is None  # secret keys stay secret


def test_rerun_recomputes_only_missing_cells(quick_sweep, tmp_path, count_jobs):
    _, done, _ = quick_sweep
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = json.loads((out / "sweep.json").read_text())
    kept = (out / "cells/fraction-0.05/seed-0/cell.json").read_text()
    shutil.rmtree(out / "cells/fraction-0.25/seed-1")
    (out / "cells/fraction-0.25/seed-1.partial").mkdir()  # left by an interrupted run
    (out / "cells/fraction-0.25/seed-1.partial/report.json").write_text("{}")
    assert sweep.main(parse(quick_argv(out, "--noise-seed", "3"))) == 0
    assert count_jobs == [(0.25, 1)]
    assert (out / "cells/fraction-0.05/seed-0/cell.json").read_text() == kept
    assert not (out / "cells/fraction-0.25/seed-1.partial").exists()
    after = json.loads((out / "sweep.json").read_text())
    # the recomputed cell is the same job (seeded noise): the same numbers up to wall times
    strip = [{k: v for k, v in c.items() if k != "wall_s"} | {"methods": {n: {k: v for k, v in m.items()
             if k != "wall_s"} for n, m in c["methods"].items()}} for c in (before["cells"][3], after["cells"][3])]
    assert strip[0] == strip[1]
    # nothing left to do: no job at all
    count_jobs.clear()
    assert sweep.main(parse(quick_argv(out, "--noise-seed", "3"))) == 0
    assert count_jobs == []
    # a sub-grid reuses its cells (a cell's configuration does not depend on the grid around it)
    argv = quick_argv(out, "--noise-seed", "3")
    argv[argv.index("--fractions"):argv.index("--methods")] = ["--fractions", "0.25", "--seeds", "1"]
    assert sweep.main(parse(argv)) == 0
    assert count_jobs == []
    assert [c["noise_seed"] for c in json.loads((out / "sweep.json").read_text())["cells"]] == \
        [after["cells"][3]["noise_seed"]]


def base_argv(out, methods, *extra):
    return ["--out", str(out), "--quick", "--no-progress", "--fractions", *FRACTIONS, "--seeds", "0", "1",
            "--methods", *methods, *extra]


@pytest.mark.parametrize("extra, methods, differs", [
    (("--noise-seed", "4"), ("retrain", "gradient_clipping"), "noise_seed"),  # another master seed
    ((), ("retrain", "gradient_clipping"), "noise_seed"),  # secret noise now, seeded then
    (("--noise-seed", "3"), ("retrain",), "methods"),
])
def test_rerun_with_another_configuration_is_refused(quick_sweep, count_jobs, extra, methods, differs):
    _, out, _ = quick_sweep
    argv = base_argv(out, methods, *extra)
    before = (out / "sweep.json").read_text()
    with pytest.raises(ConfigError, match="another configuration") as info:
        sweep.main(parse(argv))
    assert differs in str(info.value) and "fraction-0.05/seed-0" in str(info.value)
    assert count_jobs == []
    assert (out / "sweep.json").read_text() == before


# ----------------------------------------------------------------------------------- fabricated cells
def fake_report(config, seed, *, dead=(), scale=1.0):
    methods = {}
    for name in config.methods:
        if name in dead:
            methods[name] = {"status": "dead", "reason": "constant output on the evaluation set", "wall_s": 0.5,
                             "certificate": None}
            continue
        cert = {"epsilon": 1.0, "delta": 1e-5, "seeded": False} if name == "gradient_clipping" else None
        methods[name] = {"status": "ok", "auroc": 0.5 + 0.1 * seed * scale, "worst_group_auroc": 0.4 + 0.1 * seed,
                         "dice": 0.3, "s_global": 0.01, "wall_s": 1.0 + seed, "certificate": cert}
    return {"config": {**config.to_dict(), "seed": seed}, "methods": methods}


@pytest.fixture
def fake_jobs(monkeypatch):
    """The main job replaced by fabricated reports: ``plan[(fraction, seed)]`` is a set of dead methods, an
    exception to raise, or absent (all alive)."""
    plan, calls = {}, []

    def fake(out_dir, *, seed, config, **kwargs):
        calls.append((config.fine_fraction, seed))
        what = plan.get((config.fine_fraction, seed), ())
        if isinstance(what, BaseException):
            raise what
        report = fake_report(config, seed, dead=what)
        (out_dir / "report.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(pipeline, "run_synthetic_demo", fake)
    return plan, calls


def test_dead_models_are_counted_not_averaged(tmp_path, fake_jobs, capsys):
    plan, calls = fake_jobs
    plan[(0.05, 1)] = {"retrain"}  # retrain dead in one cell
    plan[(0.05, 2)] = pipeline.DeadModelError("coarse decoder: dead after 2 retries")  # the whole cell
    plan[(0.25, 0)] = RuntimeError("out of memory")  # a failure: not complete, rerun next time
    out = tmp_path / "out"
    argv = ["--out", str(out), "--quick", "--no-progress", "--fractions", *FRACTIONS, "--seeds", "0", "1", "2",
            "--methods", "retrain", "gradient_clipping"]
    assert sweep.main(parse(argv)) == 1  # a failed cell
    assert "1 failed" in capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert result["n_cells"] == {"ok": 4, "dead": 1, "failed": 1}
    by_cell = {(c["fraction"], c["seed"]): c for c in result["cells"]}
    assert by_cell[(0.05, 1)]["methods"]["retrain"] == {"status": "dead", "wall_s": 0.5,
                                                         "reason": "constant output on the evaluation set"}
    assert by_cell[(0.05, 2)]["status"] == "dead" and "coarse decoder" in by_cell[(0.05, 2)]["reason"]
    assert by_cell[(0.25, 0)]["status"] == "failed" and "out of memory" in by_cell[(0.25, 0)]["reason"]
    retrain = result["summary"]["retrain"]["0.05"]
    assert retrain["worst_group_auroc"] == {"mean": 0.4, "std": None, "n": 1, "min": 0.4, "max": 0.4}
    assert retrain["n_dead"] == 2 and retrain["dead_seeds"] == [1, 2]
    coarse = result["summary"]["coarse"]["0.05"]
    assert coarse["worst_group_auroc"]["n"] == 2 and coarse["n_dead"] == 1 and coarse["dead_seeds"] == [2]
    assert coarse["worst_group_auroc"]["mean"] == pytest.approx(0.45)
    assert coarse["worst_group_auroc"]["std"] == pytest.approx(statistics.stdev([0.4, 0.5]))
    late = result["summary"]["gradient_clipping"]["0.25"]
    assert late["n_failed"] == 1 and late["auroc"]["n"] == 2 and late["epsilon"]["mean"] == 1.0
    md = (out / "sweep.md").read_text()
    assert "| retrain | 0.400 (1); 2 dead |" in md
    assert "fraction 0.05, seed 1: `retrain` **dead**: constant output" in md
    assert "fraction 0.05, seed 2: **dead** (whole cell)" in md
    assert "fraction 0.25, seed 0: **failed** (whole cell): RuntimeError: out of memory" in md
    assert (out / "cells/fraction-0.05/seed-2/cell.json").exists()  # dead: complete
    assert not (out / "cells/fraction-0.25/seed-0").exists()  # failed: not complete
    assert not (out / "cells/fraction-0.25/seed-0.partial").exists()
    # the rerun runs only the failed cell (the dead one is deterministic and complete)
    calls.clear()
    del plan[(0.25, 0)]
    assert sweep.main(parse(argv)) == 0
    assert calls == [(0.25, 0)]
    assert json.loads((out / "sweep.json").read_text())["n_cells"] == {"ok": 5, "dead": 1, "failed": 0}


def test_interrupted_sweep_resumes(tmp_path, fake_jobs):
    plan, calls = fake_jobs
    plan[(0.25, 0)] = KeyboardInterrupt()
    out = tmp_path / "out"
    argv = ["--out", str(out), "--quick", "--no-progress", "--fractions", *FRACTIONS, "--seeds", "0"]
    with pytest.raises(KeyboardInterrupt):
        sweep.main(parse(argv))
    assert (out / "cells/fraction-0.05/seed-0/cell.json").exists()
    assert not (out / "cells/fraction-0.25/seed-0").exists() and not (out / "sweep.json").exists()
    assert not (out / ".sweep.lock").exists()
    del plan[(0.25, 0)]
    calls.clear()
    assert sweep.main(parse(argv)) == 0
    assert calls == [(0.25, 0)]
    # one seed: std is None, the figure shades min-max and says so
    result = json.loads((out / "sweep.json").read_text())
    assert result["summary"]["retrain"]["0.05"]["auroc"]["std"] is None
    assert "min-max" in result["figure_caption"] and (out / "sweep.png").stat().st_size > 1000


def test_image_size_flag_reaches_every_cell(tmp_path, fake_jobs, monkeypatch):
    sizes = []
    real = pipeline.run_synthetic_demo

    def spy(out_dir, **kwargs):
        sizes.append(kwargs["config"].image_size)
        return real(out_dir, **kwargs)

    monkeypatch.setattr(pipeline, "run_synthetic_demo", spy)
    argv = ["--out", str(tmp_path / "o"), "--quick", "--no-progress", "--fractions", *FRACTIONS, "--seeds", "0"]
    assert sweep.main(parse(argv + ["--image-size", "20"])) == 0
    assert sizes == [20] * len(FRACTIONS)
    sizes.clear()
    with pytest.raises(ConfigError, match="image_size"):  # another size is another configuration
        sweep.main(parse(argv + ["--image-size", "28"]))
    assert sizes == []


def test_a_sweep_folder_in_use_is_refused(tmp_path, fake_jobs):
    from pyunlearn.checkpoint import CheckpointLockedError, RunLock

    out = tmp_path / "out"
    with RunLock(out / ".sweep.lock"):
        with pytest.raises(CheckpointLockedError, match="another run"):
            sweep.run_sweep(out, fractions=[0.1], seeds=[0], progress=False)
    assert fake_jobs[1] == []


# ----------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv", [["--fractions", "0"], ["--fractions", "1"], ["--fractions", "1.5"],
                                  ["--fractions", "nan"], ["--fractions", "a"], ["--seeds", "-1"],
                                  ["--seeds", str(2**43)], ["--methods", "nope"], ["--threads", "0"],
                                  ["--jobs", "0"], ["--noise-seed", "-1"], ["--device", "tpu"], ["--image-size", "4"],
                                  ["--image-size", "0"], ["--image-size", "a"]])
def test_bad_flags_are_argparse_errors(tmp_path, argv, capsys):
    with pytest.raises(SystemExit):
        parse(["--out", str(tmp_path)] + argv)
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--fractions", "0.1", "0.10"], "lists a fraction more than once"),
    (["--seeds", "1", "1"], "lists a seed more than once"),
    (["--methods", "retrain", "retrain"], "lists a method more than once"),
    (["--fractions", "0.005"], "gives no fine mask"),
])
def test_bad_grids_fail_before_any_training(tmp_path, fake_jobs, argv, message):
    with pytest.raises(ConfigError, match=message):
        sweep.main(parse(["--out", str(tmp_path / "o"), "--quick", "--no-progress"] + argv))
    assert fake_jobs[1] == []
    assert not (tmp_path / "o").exists()


def test_unwritable_out_fails_before_any_training(tmp_path, fake_jobs):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, flag in (([str(blocker / "sub")], "--out"),
                       ([str(tmp_path / "o"), "--checkpoint-dir", str(blocker / "sub")], "--checkpoint-dir")):
        with pytest.raises(ConfigError, match=f"argument {flag}: cannot create"):
            sweep.main(parse(["--quick", "--no-progress", "--out"] + argv))
    assert fake_jobs[1] == []


def test_cuda_without_gpu_fails_before_any_training(tmp_path, fake_jobs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        sweep.main(parse(["--out", str(tmp_path), "--quick", "--no-progress", "--device", "cuda"]))
    assert fake_jobs[1] == []


def test_run_sweep_checks_its_arguments(tmp_path, fake_jobs):
    for kwargs, message in (({"fractions": [0.0]}, r"in \(0, 1\)"), ({"seeds": [-1]}, r"\[0, 2\*\*43\)"),
                            ({"seeds": [0.5]}, "integer"), ({"methods": ["x"]}, "unknown"),
                            ({"fractions": []}, "at least one"), ({"jobs": 0}, "jobs: a positive integer"),
                            ({"jobs": 1.5}, "jobs: a positive integer")):
        with pytest.raises(ConfigError, match=message):
            sweep.run_sweep(tmp_path / "o", progress=False, **kwargs)
    assert fake_jobs[1] == []


def test_the_cli_registers_sweep(tmp_path, monkeypatch):
    from pyunlearn import cli, pipeline

    monkeypatch.setattr(pipeline, "run_synthetic_demo", lambda *a, **k: pytest.fail("no cell may run"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", "--out", str(tmp_path / "s"), "--fractions", "1.5", "--quick"])
    assert exc.value.code == 2
