"""The benchmark scripts run end to end at a tiny size and end with the figure their docs promise."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, pattern",
    [
        ("amp_speedup.py", r"bf16/fp32 step-time ratio: (\d+\.\d{3})"),
        ("step_overhead.py", r"densecl/mocov2 step-time ratio: (\d+\.\d{3})"),
    ],
)
def test_step_time_benchmarks_print_their_ratio_last(script, pattern):
    args = ["--arch", "resnet18", "--size", "64", "--batch", "4", "--iters", "1", "--warmup", "1",
            "--queue-len", "16"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(pattern, last)
    assert match and float(match.group(1)) > 0, last
