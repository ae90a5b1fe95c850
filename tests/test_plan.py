"""`plan=true` (pipelines.plan): every job's resolved stage settings, protocol status, folder and new / resumes /
done, printed before anything runs, with nothing run, made or tracked; and the entry point's arguments (overrides
on both sides of `-m`, a misspelt section key named with the section's keys)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import plan, schema
from pipelines.run import split_arguments
from pipelines.stages import DONE, stage_settings

ROOT = Path(__file__).resolve().parent.parent


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipelines.run", *args, f"paths.output_dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def made_nothing(folder: Path) -> bool:
    return not any(p.name in ("runs", "multirun", "mlflow.db", "mlartifacts", "cache") for p in folder.iterdir())


def test_the_plan_of_a_sweep_shows_every_job_and_runs_nothing(tmp_path):
    """The README's sweep, with an override after `-m` (Hydra 1.3.8's parser alone refuses it)."""
    result = run_cli(tmp_path, "+experiment=ablation_matching", "-m", "pretrain.iters=6", "plan=true")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "plan of the sweep of 12 jobs 'ablation_matching'" in out and "nothing ran" in out
    jobs = re.findall(r"^job (matching=\w+,seed=\d): (\S+)$", out, flags=re.M)
    assert [name for name, _ in jobs] == [f"matching={m},seed={s}" for m in
                                          ("backbone", "projection", "random", "geometric") for s in (0, 1, 2)]
    for name, folder in jobs:  # the folder of each job: its overrides, sorted
        assert folder == str(tmp_path / "multirun" / "ablation_matching" / schema.job_dirname(
            [*name.split(","), "pretrain.iters=6"]))
    blocks = out.split("\njob ")[1:]
    for block in blocks:
        assert "  pretrain: new, 6 iterations to run" in block  # the override after -m reached every job
        assert re.search(r"^    lr +0\.03$", block, flags=re.M)  # base lr 0.24 per 256, total batch 32
        assert "  convert: new" in block
        assert "  det_voc: new, 120 iterations to run" in block and "    protocol              synthetic" in block
        assert re.search(r"^    lr +0\.005$", block, flags=re.M)  # the preset's 0.01 at batch 8, rescaled to 4
        assert "synthetic_voc_train: 96 images" in block and "synthetic_voc_val: 32 images" in block
    assert "matching backbone" in blocks[0] and "matching geometric" in blocks[-1]
    assert made_nothing(tmp_path)


def test_the_plan_of_a_paper_stage_shows_its_deviations(tmp_path):
    """A protocol key set without `+` under downstream=paper, and the deviation it makes, before any work."""
    result = run_cli(tmp_path, "downstream=paper", "stages=[det_voc]", "backbone=resnet50",
                     "downstream.det_voc.ims_per_batch=8", "plan=true")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "  det_voc: new, 48000 iterations to run" in out
    for line in ("    protocol              deviates", "    lr                    0.01",
                 "    total_batch           8", "    lr_steps              [36000, 44000]",
                 "    norm                  SyncBN over 8 GPUs"):
        assert line in out, line
    assert "- ims_per_batch=8 (protocol: 16): a total batch under 16" in out
    assert "- arch=" not in out  # ResNet-50, the protocol's
    assert "voc_2007_trainval: not readable: data set file or folder missing" in out
    assert "this job would stop before it starts: downstream.det_voc.data_root" in out
    assert made_nothing(tmp_path)


def test_a_misspelt_section_key_names_the_sections_keys(tmp_path):
    result = run_cli(tmp_path, "downstream.det_voc.ims_per_bach=8")
    assert result.returncode != 0
    assert ("invalid override: downstream.det_voc.ims_per_bach: downstream.det_voc has no key 'ims_per_bach'; did "
            "you mean downstream.det_voc.ims_per_batch? its keys: preset, arch,") in result.stderr
    assert made_nothing(tmp_path)


@pytest.mark.parametrize(
    ("argv", "options", "overrides"),
    [
        (["+experiment=x", "-m", "a=1"], ["-m"], ["+experiment=x", "a=1"]),
        (["a=1", "--cfg", "job", "b=2", "--resolve"], ["--cfg", "job", "--resolve"], ["a=1", "b=2"]),
        (["-cn", "other", "a=1", "--info", "config", "b=2"], ["-cn", "other", "--info", "config"], ["a=1", "b=2"]),
        (["--info", "a=1"], ["--info"], ["a=1"]),  # --info's value is optional
    ],
)
def test_options_are_told_from_overrides_on_both_sides(argv, options, overrides):
    assert split_arguments(argv) == (options, overrides)


# ----------------------------------------------------------------------------------- a job's status
def tiny_cfg(tmp_path, *overrides):
    return schema.compose([f"paths.output_dir={tmp_path}", "tracking=disabled", "pretrain.iters=40", *overrides])


def test_each_stage_is_new_resumes_or_is_done_with_the_iterations_left(tmp_path):
    cfg = tiny_cfg(tmp_path, "stages=[pretrain,convert,det_voc,probe]")
    job = tmp_path / "job"
    (job / "pretrain").mkdir(parents=True)
    torch.save({"step": 30, "config": {}}, job / "pretrain" / "checkpoint.pt")
    (job / "det_voc").mkdir()
    (job / "det_voc" / "last_checkpoint").write_text("model_0000049.pth")
    (job / "probe").mkdir()
    (job / "probe" / DONE).write_text(json.dumps({"metrics": {}, "settings": stage_settings(cfg, "probe")}))
    plans = {p.stage: p for p in plan.plan_job(cfg, job)}
    assert (plans["pretrain"].status, plans["pretrain"].iterations_to_run) == ("resumes at iteration 30", 10)
    assert (plans["convert"].status, plans["convert"].iterations_to_run) == ("new", None)
    assert (plans["det_voc"].status, plans["det_voc"].iterations_to_run) == ("resumes at iteration 50", 70)
    assert (plans["probe"].status, plans["probe"].iterations_to_run) == ("done", 0)
    assert not any((job / stage / DONE).exists() for stage in ("pretrain", "convert", "det_voc"))

    other = tiny_cfg(tmp_path, "stages=[probe]", "downstream.probe.epochs=3")
    refused = plan.plan_job(other, job)[0]
    assert refused.status.startswith("refused: done with other settings (downstream.probe.epochs: ")


def test_the_resolved_settings_become_params():
    plans = [plan.StagePlan("det_voc", "new", 5, {"lr": 0.01, "data": {"synthetic_voc_train": "96 images"}},
                            protocol="synthetic")]
    assert plan.params(plans) == {"plan.det_voc.lr": "0.01", "plan.det_voc.data.synthetic_voc_train": "96 images",
                                  "plan.det_voc.protocol": "synthetic"}


def test_a_plan_that_fails_ends_the_launch_instead_of_running_the_jobs():
    """Hydra turns an exception raised by a callback into a warning and launches the jobs: every error of the plan
    must end the launch itself."""
    from pipelines.callbacks import show_plan

    cfg = schema.compose(["plan=true"])

    def broken():
        raise KeyError("no such stage")

    with pytest.raises(SystemExit, match="plan=true: no plan, and nothing ran: 'no such stage'") as err:
        show_plan(cfg, broken, "run")
    assert err.value.code != 0
