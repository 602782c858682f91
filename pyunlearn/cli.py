"""Command line: ``pyunlearn demo``, ``pyunlearn run CONFIG.toml``, ``pyunlearn unlearn CONFIG.toml``,
``pyunlearn sweep``, ``pyunlearn classify-demo``.

Every value is checked before any work starts: flags by argparse (seeds, thread counts) and writable
output folders; configuration files by :mod:`pyunlearn.config`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Data seeds must fit ``seed * 1_000_003 + epoch`` in torch's 64-bit generator seed (pyunlearn.config).
_SEED_LIMIT = 2**43
_NOISE_SEED_LIMIT = 2**63


def _int_in(lo: int, hi: int, text: str):
    """An argparse type: an integer in [lo, hi) (``text`` spells hi)."""
    def parse(value: str) -> int:
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
        if not lo <= v < hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {text}), got {v}")
        return v
    parse.__name__ = "int"
    return parse


_seed = _int_in(0, _SEED_LIMIT, "2**43")
_noise_seed = _int_in(0, _NOISE_SEED_LIMIT, "2**63")
_positive = _int_in(1, 2**31, "2**31")


def _add_demo(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="synthetic end-to-end job: coarse model, unlearning, evaluation, report")
    p.add_argument("--out", required=True, type=Path, help="output directory (report.json, report.md, figures)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=_seed, default=0)
    seeds.add_argument("--seeds", type=_seed, nargs="+", help="several seeds: DIR/seed-N each, plus DIR/summary.md")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny configuration (seconds; for smoke tests)")
    # NOTE: the demo's tensors are small; on 2 cores one intra-op thread ran the whole job in 88 s of CPU,
    # while two threads spent most of their time waiting for each other when the machine was busy.
    p.add_argument("--threads", type=_positive, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="checkpoint every stage here; rerunning the same command resumes after a crash. The "
                        "folder is locked while a job uses it. Its files (mode 0600, authenticated with a key kept "
                        "outside the folder: $PYUNLEARN_CHECKPOINT_KEY or ~/.config/pyunlearn/checkpoint.key) hold "
                        "each stage's current model and optimizer state: the public encoder, the coarse model "
                        "trained on the private data, and the certified methods' intermediate, UNCERTIFIED noisy "
                        "models. All are deleted when the job succeeds, unless --keep-checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the --checkpoint-dir files after success (they include uncertified models: keep "
                        "them private)")
    p.add_argument("--noise-seed", type=_noise_seed, default=None,
                   help="seed the certified noise (reproducible, NOT secret; each data seed and operator gets "
                        "its own key); default: a secret key from the OS")
    p.add_argument("--diagnostics", action="store_true",
                   help="also record the certified methods' noisy-phase losses and evaluations; they are NOT "
                        "covered by the certificates, which then say so (as does the report)")
    return p


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the same job on your own data (ISIC 2018 or image/mask folders)")
    p.add_argument("config", type=Path, help="TOML configuration file (see README)")
    p.add_argument("--no-progress", action="store_true")


def _add_unlearn(sub) -> None:
    p = sub.add_parser("unlearn", help="unlearn the coarse-mask shortcut of your own trained segmentation model")
    p.add_argument("config", type=Path, help="TOML configuration file (see README: pyunlearn unlearn)")
    p.add_argument("--no-progress", action="store_true")


def _add_sweep(sub) -> None:
    from . import sweep

    sweep.add_arguments(sub.add_parser("sweep", help="sample-efficiency sweep of the synthetic job: fine fractions x "
                                                     "seeds x methods (sweep.json, sweep.md, sweep.png; resumable)"))


def _add_classify(sub) -> None:
    p = sub.add_parser("classify-demo", help="targeted unlearning (PSG and baselines) on scikit-learn digits")
    try:
        from . import classify_demo
    except ImportError:  # pragma: no cover - module ships with the package
        return
    classify_demo.add_arguments(p)


def _quick_config():
    from .pipeline import DemoConfig

    return DemoConfig(n_public=48, n_private=64, n_test=48, image_size=24, width=8, public_steps=20, coarse_steps=20,
                      retrain_steps=10, finetune_steps=10, post_steps=10, gc_steps=5, mc_steps=3, eval_every=5, s_global_boot=20,
                      blank_is_dead=False)


def _init_distributed(device: str) -> bool:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE in the environment); returns
    whether this call joined it."""
    import os

    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return True
    return False


def _leave_distributed() -> None:
    """Wait for every rank, then leave the process group (an orderly teardown: a rank that exits while
    another still talks to it can abort the job)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyunlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = _add_demo(sub)
    _add_run(sub)
    _add_unlearn(sub)
    _add_sweep(sub)
    _add_classify(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_demo_folders(args, demo)
    joined = _init_distributed(getattr(args, "device", "cpu"))
    from .config import ConfigError

    try:
        code = _run(args, parser)
    except ConfigError as exc:
        if argv is not None:  # called from Python (tests, notebooks): the exception itself
            raise
        parser.error(str(exc))  # the command line: a usage error, no traceback
    if joined:
        _leave_distributed()
    return code


def _check_demo_folders(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--out`` (and ``--checkpoint-dir``) created and writable before any work; an argparse error if not."""
    from .config import ConfigError, check_writable_dir

    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: lists a seed more than once: {args.seeds}")
    for flag, folder in (("--out", args.out), ("--checkpoint-dir", args.checkpoint_dir)):
        if folder is None:
            continue
        try:
            check_writable_dir(folder, what=f"argument {flag}")
        except ConfigError as exc:
            parser.error(str(exc))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "demo":
        import torch

        from .pipeline import run_synthetic_demo

        torch.set_num_threads(args.threads)
        from .report import format_table

        import dataclasses

        from .pipeline import DemoConfig

        config = dataclasses.replace(_quick_config() if args.quick else DemoConfig(), noise_seed=args.noise_seed,
                                     diagnostics=args.diagnostics)
        if args.seeds:
            from .report import summarize_seeds

            reports = {s: run_synthetic_demo(args.out / f"seed-{s}", seed=s, device=args.device, config=config,
                                             progress=not args.no_progress,
                                             checkpoint_dir=args.checkpoint_dir and args.checkpoint_dir / f"seed-{s}",
                                             keep_checkpoints=args.keep_checkpoints)
                       for s in args.seeds}
            if args.checkpoint_dir is not None and not args.keep_checkpoints and _is_main_rank():
                try:
                    args.checkpoint_dir.rmdir()  # each seed's job emptied and removed its own folder
                except OSError:
                    pass
            if _is_main_rank():
                summarize_seeds(reports, args.out)
                print((args.out / "summary.md").read_text())
            return 0
        report = run_synthetic_demo(args.out, seed=args.seed, device=args.device, config=config,
                                    progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                                    keep_checkpoints=args.keep_checkpoints)
        if _is_main_rank():
            print(format_table(report["methods"], markdown=False))
            print(f"\nreport: {args.out / 'report.md'}  ({report['config']['total_wall_s']:.0f} s)")
        return 0
    if args.command == "run":
        from .pipeline import run_config
        from .report import format_table

        report, out = run_config(args.config, progress=not args.no_progress)
        if _is_main_rank():
            print(format_table(report["methods"], markdown=False))
            print(f"\nreport: {out / 'report.md'}")
        return 0
    if args.command == "unlearn":
        from .unlearn_job import run_unlearn

        result = run_unlearn(args.config, progress=not args.no_progress)
        if _is_main_rank():
            print(result["summary"])
        return 0 if result["released"] else 1
    if args.command == "sweep":
        from . import sweep

        return sweep.main(args)
    if args.command == "classify-demo":
        from . import classify_demo

        return classify_demo.main(args) or 0
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
