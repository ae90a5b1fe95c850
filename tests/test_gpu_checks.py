"""benchmarks/gpu_checks.sh: its figure parser (benchmarks/gpu_checks_figures.py) reads every figure from what each
step leaves in OUT (recorded in tests/data/gpu_checks/out by one tiny run), reports a failed or timed-out step
with its status and catches a step whose output is incomplete; the script records a failed step and goes on; the
mini_paper_gpu preset is mini_paper's claim at 13x its pre-training budget, launched on one GPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from densecl.training.pretrain import warn_if_queue_holds_own_keys
from pipelines import schema
from pipelines.registry import STAGES

pytestmark = pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_:UserWarning")

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "tests" / "data" / "gpu_checks" / "out"
CHAIN = ["pretrain", "convert", "det_voc", "det_coco", "seg_voc"]  # as gpu_checks.sh runs the chain
LINE = re.compile(r"step=(\S+) status=(\S+) figure=(\S+) value=(\S+) unit=(\S+) target=(\S+) met=(\S+) "
                  r"seconds=(\d+) limit=(\d+) \| (.*)")


@pytest.fixture
def out(tmp_path) -> Path:
    """A copy of the recorded OUT, to plant mistakes in."""
    return Path(shutil.copytree(RECORDED, tmp_path / "out"))


def figures(step: str, out: Path, rc: int = 0, *extra: str) -> dict[str, dict[str, str]]:
    """The parser's lines for `step`, called as gpu_checks.sh calls it: {figure: {status, value, ..., detail}}."""
    if step == "chain":
        extra = ("--stages", ",".join(CHAIN), *extra)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_checks_figures.py"), step, str(out), "--rc", str(rc),
         "--seconds", "12.3", "--limit", "600", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    lines = [LINE.fullmatch(line) for line in done.stdout.splitlines()]
    assert lines and all(lines), done.stdout
    assert {m.group(1) for m in lines} == {step} and {m.group(8, 9) for m in lines} == {("12", "600")}
    keys = ("status", "value", "unit", "target", "met", "detail")
    return {m.group(3): dict(zip(keys, m.group(2, 4, 5, 6, 7, 10))) for m in lines}


def values(lines: dict[str, dict[str, str]]) -> dict[str, str]:
    assert {line["status"] for line in lines.values()} == {"ok"}, lines
    return {name: line["value"] for name, line in lines.items()}


def test_every_step_s_figures_are_read_from_the_recorded_output(out):
    # the numbers of the recorded logs (tests/data/gpu_checks/out/*.log)
    assert values(figures("jpeg_folder", out)) == {"jpeg_images": "48"}
    assert values(figures("throughput_gpu_aug", out)) == {
        "tensors": "39.4", "jpeg_gpu_aug": "36.1", "gpu_aug_over_tensors": "0.917"}
    assert values(figures("throughput_cpu_aug", out)) == {"jpeg_cpu_aug": "40.3"}
    assert values(figures("step_overhead", out)) == {"densecl_over_mocov2": "1.869"}
    assert values(figures("mini_paper_gpu", out, 0, "--jobs", "3")) == {"sweep_seconds": "12.3", "jobs_done": "3"}
    # one metric in the tiny table (the probe), where the order does not hold
    report = figures("mini_paper_gpu_report", out)
    assert values(report) == {"claim_met": "0"}
    assert report["claim_met"]["unit"] == "of_1_metrics" and report["claim_met"]["target"] == "==1"
    assert "probe/mIoU: densecl 1.34 > mocov2 1.34 > random_init 2.43 does not hold" in report["claim_met"]["detail"]


def test_the_chain_reports_each_stage_s_first_headline_metric_from_the_registry(out):
    chain = figures("chain", out)
    assert set(chain) == {f"{stage}{suffix}" for stage in CHAIN for suffix in ("", "_seconds")}
    for stage in CHAIN:
        record = json.loads(next((out / "chain").glob(f"runs/*/*/{stage}/DONE.json")).read_text())
        metric = STAGES[stage].headline[0]
        assert chain[stage]["status"] == "ok" and chain[stage]["unit"] == metric.replace(" ", "_")
        assert float(chain[stage]["value"]) == pytest.approx(record["metrics"][metric], rel=1e-3)
        assert float(chain[f"{stage}_seconds"]["value"]) == pytest.approx(record["seconds"], rel=1e-3)
    assert chain["det_voc"]["unit"] == "AP"  # det_voc's headline is (AP, AP50)


def test_a_stage_missing_from_the_chain_s_output_is_a_failed_figure(out):
    shutil.rmtree(next((out / "chain").glob("runs/*/*/det_coco")))
    # and a stage that finished without its headline metric
    seg = next((out / "chain").glob("runs/*/*/seg_voc/DONE.json"))
    record = json.loads(seg.read_text())
    del record["metrics"]["mIoU"]
    seg.write_text(json.dumps(record))
    chain = figures("chain", out)
    for name in ("det_coco", "det_coco_seconds", "seg_voc"):
        assert (chain[name]["status"], chain[name]["value"]) == ("failed", "nan"), (name, chain[name])
        assert chain[name]["detail"].startswith("no figure: see chain.log")
    assert chain["det_coco"]["detail"].endswith("no DONE.json")
    assert chain["seg_voc_seconds"]["status"] == "ok"  # its DONE.json is there, with its wall time
    assert {chain[s]["status"] for s in ("pretrain", "convert", "det_voc")} == {"ok"}


def test_a_failed_or_timed_out_step_keeps_its_status(out):
    (out / "step_overhead.log").write_text("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    assert figures("step_overhead", out, 1)["densecl_over_mocov2"] | {"detail": ""} == {
        "status": "failed", "value": "nan", "unit": "ratio", "target": "<=1.02", "met": "n/a", "detail": ""}
    (out / "throughput_gpu_aug.log").write_text("throughput tensors: 2848.1 images/s (...)\n")  # killed after
    gpu = figures("throughput_gpu_aug", out, 124)
    assert {name: line["status"] for name, line in gpu.items()} == {
        "tensors": "timeout", "jpeg_gpu_aug": "timeout", "gpu_aug_over_tensors": "timeout"}
    assert gpu["tensors"]["value"] == "2848" and gpu["jpeg_gpu_aug"]["value"] == "nan"
    # a step that exits 0 without its figure is failed too
    (out / "jpeg_folder.log").write_text("")
    assert figures("jpeg_folder", out)["jpeg_images"]["status"] == "failed"
    shutil.rmtree(out / "mini_paper_gpu_report")
    report = figures("mini_paper_gpu_report", out, 137)["claim_met"]
    assert (report["status"], report["value"]) == ("timeout", "nan") and "table.csv missing" in report["detail"]


def test_targets_are_judged_outside_the_tiny_mode(out):
    """met=yes / no against each target; a sweep with one job short does not meet `jobs_done`, and the claim
    counts the metrics whose order holds."""
    assert figures("step_overhead", out)["densecl_over_mocov2"]["met"] == "no"  # 1.869 > 1.02
    assert figures("step_overhead", out, 0, "--tiny")["densecl_over_mocov2"]["met"] == "n/a"
    sweep = figures("mini_paper_gpu", out, 0, "--jobs", "3")
    assert (sweep["jobs_done"]["met"], sweep["sweep_seconds"]["met"]) == ("yes", "yes")
    shutil.rmtree(next((out / "mini_paper_gpu").glob("multirun/*/*/probe")))
    jobs = figures("mini_paper_gpu", out, 0, "--jobs", "3")["jobs_done"]
    assert (jobs["value"], jobs["met"], jobs["detail"]) == ("2", "no", "2 of 3 job folders")

    table = out / "mini_paper_gpu_report" / "table.csv"
    text = table.read_text()
    table.write_text(text.replace("random_init,1,2.4335255311242374,", "random_init,1,0.5,"))
    report = figures("mini_paper_gpu_report", out)["claim_met"]
    assert (report["value"], report["met"]) == ("1", "yes"), report


def test_the_parser_refuses_a_chain_without_its_stages_or_with_an_unknown_one(out):
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu_checks_figures.py"), "chain", str(out), "--rc", "0",
              "--seconds", "1", "--limit", "1"]
    for extra in ([], ["--stages", "pretrain,det_vco"]):
        done = subprocess.run(script + extra, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 2 and "--stages" in done.stderr, done.stderr


@pytest.mark.slow
def test_the_script_records_a_failed_step_and_runs_the_next_one(tmp_path):
    """A step that fails (here: the image folder cannot be made, a file is in its place) is a `failed` line
    without a value, and the script goes on to the next step; machine.txt is written first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "jpeg_folder").write_text("a file where the folder should be")
    env = {**os.environ, "GPU_CHECKS_TINY": "1", "GPU_CHECKS_STEPS": "jpeg_folder step_overhead"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [LINE.fullmatch(line) for line in (out / "summary.txt").read_text().splitlines()
             if not line.startswith("#")]
    assert all(lines), (out / "summary.txt").read_text()
    steps = {m.group(1): m for m in lines}
    assert set(steps) == {"jpeg_folder", "step_overhead"}
    assert steps["jpeg_folder"].group(2, 4) == ("failed", "nan"), steps["jpeg_folder"].group(0)
    assert steps["step_overhead"].group(2) == "ok", steps["step_overhead"].group(0)
    assert (out / "summary.txt").read_text().splitlines()[-1] == "# 1 of 2 figures ok"
    machine = (out / "machine.txt").read_text()
    for key in ("date", "mode", "code", "gpu", "torch", "cpus", "data workers"):
        assert re.search(rf"^{key}: \S", machine, re.MULTILINE), (key, machine)
    assert "mode: tiny" in machine


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
