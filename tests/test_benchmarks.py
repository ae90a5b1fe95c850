"""The benchmark scripts run end to end at a tiny size and end with the figure their docs promise; the folder's
README lists every tool in it."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def test_step_overhead_prints_its_ratio_last():
    args = ["--arch", "resnet18", "--size", "64", "--batch", "4", "--iters", "1", "--warmup", "1",
            "--queue-len", "16", "--device", "cpu", "--threads", "1"]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "step_overhead.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"densecl/mocov2 step-time ratio: (\d+\.\d{3})", last)
    assert match and float(match.group(1)) > 0, last


def test_the_readme_lists_every_tool_and_only_existing_ones():
    readme = (BENCHMARKS / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w.]+)` \|", readme, re.MULTILINE))
    tools = {p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh")}
    assert listed == tools, {"not in the README": tools - listed, "no such file": listed - tools}
    # every command in the table names a script of the folder
    for script in re.findall(r"`(?:python|bash) benchmarks/([\w.]+)", readme):
        assert (BENCHMARKS / script).is_file(), script
