"""Run every benchmark script in turn (``make bench``); extra arguments (e.g. ``--quick``) go to each."""
import subprocess
import sys
from pathlib import Path

SCRIPTS = ("bench_masked_cross_entropy.py", "bench_clip_noise_step.py", "bench_per_sample_norms.py",
           "bench_dpsgd_step.py")


def main() -> int:
    here = Path(__file__).parent
    failed = [name for name in SCRIPTS
              if subprocess.run([sys.executable, str(here / name), *sys.argv[1:]]).returncode != 0]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
