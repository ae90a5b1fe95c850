"""The benchmark scripts run end to end at a tiny size and end with the figure their docs promise."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_view_retrieval_matches_a_slow_reference():
    retrieval = load_script("view_retrieval")
    torch.manual_seed(0)
    first = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    second = torch.nn.functional.normalize(first + 0.8 * torch.randn(20, 8), dim=1)
    scores = retrieval.view_retrieval(first, second)
    hits, positives, negatives = 0, [], []
    for i in range(20):
        sims = [float(first[i] @ second[j]) for j in range(20)]
        hits += max(range(20), key=sims.__getitem__) == i
        positives.append(sims[i])
        negatives += [s for j, s in enumerate(sims) if j != i]
    assert 0 < hits < 20  # the case is neither trivial nor hopeless
    assert scores["top1"] == pytest.approx(hits / 20)
    assert scores["positive_cos"] == pytest.approx(sum(positives) / 20, abs=1e-6)
    assert scores["negative_cos"] == pytest.approx(sum(negatives) / len(negatives), abs=1e-6)


def test_view_retrieval_script_scores_each_backbone(tmp_path):
    from densecl.evaluation.probe import load_frozen_backbone
    from densecl.weights.export import save_backbone

    weights = tmp_path / "backbone.pth"
    save_backbone(load_frozen_backbone("resnet18", None, seed=3).state_dict(), weights, "resnet18")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "view_retrieval.py"), "random:3", str(weights),
         "--scenes", "8", "--crop", "64", "--image-size", "64", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].endswith("chance top-1 0.1250")
    scores = [re.fullmatch(r"(\S+): view top-1 (\d\.\d{4}), positive cos .*", line) for line in lines[1:]]
    assert [m.group(1) for m in scores] == ["random:3", str(weights)]
    assert scores[0].group(2) == scores[1].group(2)  # the same network, drawn or loaded
