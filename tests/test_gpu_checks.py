"""benchmarks/gpu_checks.sh runs every step at a tiny size on the CPU and leaves every figure in its summary; the
mini_paper_gpu preset is mini_paper's claim at 13x its pre-training budget, launched on one GPU."""

from __future__ import annotations

import math
import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest

from densecl.training.pretrain import warn_if_queue_holds_own_keys
from pipelines import schema

pytestmark = pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_:UserWarning")

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {  # step: the figures its summary lines must carry
    "jpeg_folder": ["jpeg_images"],
    "throughput_gpu_aug": ["tensors", "jpeg_gpu_aug", "gpu_aug_over_tensors"],
    "throughput_cpu_aug": ["jpeg_cpu_aug"],
    "step_overhead": ["densecl_over_mocov2"],
    "chain": [f"{stage}{suffix}" for stage in ("pretrain", "convert", "det_voc", "det_coco", "seg_voc")
              for suffix in ("", "_seconds")],
    "mini_paper_gpu": ["sweep_seconds", "jobs_done"],
    "mini_paper_gpu_report": ["claim_met"],
}
LINE = re.compile(r"step=(\S+) status=(\S+) figure=(\S+) value=(\S+) unit=(\S+) target=(\S+) met=(\S+) "
                  r"seconds=(\d+) limit=(\d+) \| (.*)")
THROUGHPUT = r"^throughput {}: (\d+\.\d) images/s \(.+\)$"


def summary_lines(out: Path) -> list[re.Match]:
    lines = [line for line in (out / "summary.txt").read_text().splitlines() if not line.startswith("#")]
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    return matches


@pytest.mark.slow
@pytest.mark.detectron2
def test_gpu_checks_tiny_runs_every_step_and_writes_every_figure(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECKS_TINY": "1"}
    for key in ("GPU_CHECKS_STEPS", "MLFLOW_RUN_ID", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    figures = {}
    for m in summary_lines(out):
        step, status, figure, value = m.group(1, 2, 3, 4)
        assert status == "ok", f"{m.group(0)}\n{(out / f'{step}.log').read_text()[-3000:]}"
        assert math.isfinite(float(value)), m.group(0)
        figures[step, figure] = float(value)
    assert set(figures) == {(step, f) for step, names in FIGURES.items() for f in names}
    assert figures["mini_paper_gpu", "jobs_done"] == 3  # the tiny sweep: 3 models, seed 0
    assert 0 <= figures["mini_paper_gpu_report", "claim_met"] <= 1  # one metric (the probe) at the tiny size
    total = sum(map(len, FIGURES.values()))
    assert (out / "summary.txt").read_text().splitlines()[-1] == f"# {total} of {total} figures ok"

    machine = (out / "machine.txt").read_text()
    for key in ("date", "mode", "code", "gpu", "torch", "cpus", "data workers"):
        assert re.search(rf"^{key}: \S", machine, re.MULTILINE), (key, machine)
    assert "mode: tiny" in machine

    gpu_log = (out / "throughput_gpu_aug.log").read_text()
    rates = {mode: re.search(THROUGHPUT.format(mode), gpu_log, re.MULTILINE) for mode in ("tensors", "pipeline")}
    assert all(rates.values()), gpu_log[-3000:]
    assert "augment_on=gpu" in rates["pipeline"].group(0)
    ratio = re.search(r"^pipeline/tensors: (\d+\.\d{3})$", gpu_log, re.MULTILINE)
    assert ratio and float(ratio.group(1)) == pytest.approx(figures["throughput_gpu_aug", "gpu_aug_over_tensors"])
    assert float(rates["tensors"].group(1)) == pytest.approx(figures["throughput_gpu_aug", "tensors"], rel=1e-3)
    cpu_log = (out / "throughput_cpu_aug.log").read_text()
    cpu_rate = re.search(THROUGHPUT.format("pipeline"), cpu_log, re.MULTILINE)
    assert cpu_rate and "augment_on=cpu" in cpu_rate.group(0), cpu_log[-3000:]
    assert len(list((out / "jpeg_folder").rglob("*.jpg"))) == figures["jpeg_folder", "jpeg_images"]


@pytest.mark.slow
def test_a_failed_step_is_recorded_and_the_next_one_still_runs(tmp_path):
    """A step that fails (here: the image folder cannot be made, a file is in its place) is a `failed` line
    without a value, and the script goes on to the next step."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "jpeg_folder").write_text("a file where the folder should be")
    env = {**os.environ, "GPU_CHECKS_TINY": "1", "GPU_CHECKS_STEPS": "jpeg_folder step_overhead"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {m.group(1): m for m in summary_lines(out)}
    assert set(lines) == {"jpeg_folder", "step_overhead"}
    assert lines["jpeg_folder"].group(2, 4) == ("failed", "nan"), lines["jpeg_folder"].group(0)
    assert lines["step_overhead"].group(2) == "ok", lines["step_overhead"].group(0)
    assert (out / "summary.txt").read_text().splitlines()[-1] == "# 1 of 2 figures ok"


def compose(*overrides: str):
    return schema.compose(overrides)


def sweep(cfg) -> dict[str, list[str]]:
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


def test_mini_paper_gpu_is_mini_paper_at_13x_the_pretraining_budget_on_one_gpu():
    cpu, gpu = compose("+experiment=mini_paper"), compose("+experiment=mini_paper_gpu")
    schema.validate(gpu, check_paths=False)
    assert sweep(gpu) == sweep(cpu) == {"model": ["random_init", "mocov2", "densecl"], "seed": ["0", "1", "2"]}

    def budget(cfg) -> int:  # two-view samples of pre-training
        return cfg.pretrain.iters * cfg.pretrain.batch_size

    assert budget(gpu) >= 13 * budget(cpu), (budget(gpu), budget(cpu))
    assert gpu.pretrain.crop_size == cpu.pretrain.crop_size and gpu.backbone == cpu.backbone
    # the same downstream protocol, stages and method
    assert list(gpu.stages) == list(cpu.stages) and gpu.downstream == cpu.downstream and gpu.model == cpu.model
    assert gpu.device == "cuda" and gpu.pretrain.amp == "bf16" and gpu.data.augment_on == "gpu"
    assert gpu.data.cache_dir == gpu.paths.cache_dir
    with warnings.catch_warnings():  # the engine's warning about images meeting their own queued keys
        warnings.simplefilter("error")
        warn_if_queue_holds_own_keys(gpu.pretrain.queue_len, gpu.data.num_images, budget(gpu))
    # 9 local processes that see the GPU: submitit_local hides every GPU unless gpus_per_node is set
    launcher = gpu.hydra.launcher
    assert launcher._target_.endswith("LocalLauncher") and launcher.gpus_per_node >= 1
