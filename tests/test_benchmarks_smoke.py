"""Every benchmark script runs end to end in its --quick mode (no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.parametrize("script,args", [
    ("bench_masked_cross_entropy.py", ["--no-save"]),
    ("bench_clip_noise_step.py", ["--no-save"]),
    ("bench_per_sample_norms.py", ["--no-save"]),
    ("bench_dpsgd_step.py", ["--size", "16", "--channels", "8", "--out", "{tmp}"]),
])
def test_benchmark_quick_mode_runs(script, args, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
