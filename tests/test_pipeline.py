"""The pipeline end to end, tiny: a sweep leaves parent and child runs with params, curves, final metrics and
artifacts in the mlflow store; a rerun redoes nothing and adds no run; the report reads the runs; downstream
stages run on user weights; an interrupted pre-training resumes; submitit_local runs a two-job sweep.

The sweep (matching x seed, every stage) is made once per session by tests/conftest.py's `pipeline_sweep`,
which the browser tests of the mlflow UI (tests/test_mlflow_ui.py) read too."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from densecl.resume import SettingsChangedError
from pipelines import report, schema
from pipelines.preemption import GracefulStop
from pipelines.stages import DONE, planned_stages, run_stages, stage_settings
from pipelines.tracking import PARENT_TAG, RunLogger, Tracker
from tests.conftest import HAVE_DETECTRON2, TINY, Sweep, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_:UserWarning")


def runs_of(out: Path, experiment: str = "default") -> list:
    tracker = Tracker(f"sqlite:///{out}/mlflow.db")
    exp = tracker.client.get_experiment_by_name(experiment)
    return tracker, tracker.client.search_runs([exp.experiment_id], max_results=1000)


def job_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "multirun" / "default").iterdir() if (p / "mlflow_run.json").exists())


def names(sweep: Sweep) -> set[str]:
    """The child runs' names: the swept keys only."""
    return {f"matching={m},seed={s}" for m in sweep.matchings for s in sweep.seeds}


@pytest.mark.slow
def test_sweep_leaves_parent_and_child_runs_with_params_metrics_and_artifacts(pipeline_sweep):
    sweep = pipeline_sweep
    tracker, runs = runs_of(sweep.out)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and len(children) == len(sweep.matchings) * len(sweep.seeds) == 4
    parent = parents[0]
    assert parent.data.tags["densecl.kind"] == "sweep" and json.loads(
        parent.data.tags["densecl.swept_keys"]
    ) == ["matching", "seed"]
    assert parent.info.status == "FINISHED"
    assert {(c.data.params["matching.name"], c.data.params["seed"]) for c in children} == {
        (m, str(s)) for m in sweep.matchings for s in sweep.seeds
    }
    assert {c.info.run_name for c in children} == names(sweep)  # the swept keys only
    for child in children:  # the group: the swept keys but the seed (a seed-only sweep: test_submitit_local_...)
        assert child.data.tags["group"] == f"matching={child.data.params['matching.name']}"
    experiment = tracker.client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the sweep's end made the report on the parent: the table mlflow renders, and the plots as images
    parent_artifacts = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/table.json", "report/table.md", "report/table.csv"} <= parent_artifacts
    for child in children:
        assert child.data.tags[PARENT_TAG] == parent.info.run_id and child.info.status == "FINISHED"
        params, metrics = child.data.params, child.data.metrics
        assert params["model.loss_lambda"] == "0.5" and params["matching"] == params["matching.name"]
        assert params["pretrain.iters"] == "4" and params["backbone.arch"] == "resnet18"
        assert child.data.tags["override.seed"] == params["seed"]
        assert child.data.tags["override.matching"] == params["matching"]
        # what each stage resolved to, as plan=true prints it (pipelines.plan), recorded on the run
        assert params["plan.pretrain.lr"] == str(0.24 * 4 / 256) and params["plan.pretrain.iterations"] == "4"
        assert params["plan.probe.epochs"] == "1" and params["plan.probe.features"] == "c4"
        if HAVE_DETECTRON2:
            assert params["plan.det_voc.total_batch"] == "2" and params["plan.det_voc.protocol"] == "synthetic"
            assert params["plan.det_voc.data.synthetic_voc_train"] == "8 images"
        assert not any(k.startswith("downstream.det_voc.") and v == "None" for k, v in params.items())
        for name in ("pretrain/loss", "pretrain/loss_dense", "pretrain/corr_acc", "convert/num_tensors", "probe/mIoU"):
            assert name in metrics, name
        if HAVE_DETECTRON2:
            assert {"det_voc/AP", "det_voc/AP50", "det_voc/AP75", "seg_voc/mIoU"} <= set(metrics)
        curve = tracker.client.get_metric_history(child.info.run_id, "pretrain/loss_dense")
        assert sorted(m.step for m in curve) == [2, 4]  # every log_every iterations, final not repeated
        for name in ("pretrain/probe_mIoU", "pretrain/knn_acc"):  # the feature-quality curves, from step 0
            assert sorted(m.step for m in tracker.client.get_metric_history(child.info.run_id, name)) == [0, 2, 4]
        if HAVE_DETECTRON2:  # each stage's protocol: the synthetic presets are their own
            assert child.data.tags["densecl.protocol.det_voc"] == "synthetic"
        artifacts = {a.path for a in tracker.client.list_artifacts(child.info.run_id, "pretrain")}
        assert {"pretrain/metrics.json", "pretrain/backbone.pth", "pretrain/correspondence.png"} <= artifacts
        assert [a.path for a in tracker.client.list_artifacts(child.info.run_id, "config")] == [
            "config/config.yaml"
        ]
    assert len(job_dirs(sweep.out)) == 4
    for job in job_dirs(sweep.out):
        for stage in sweep.stages:
            done = json.loads((job / stage / DONE).read_text())
            assert done["metrics"] == json.loads((job / stage / "metrics.json").read_text())


@pytest.mark.slow
def test_the_terminal_shows_headlines_and_a_summary_and_detectron2_details_go_to_the_stage_logs(pipeline_sweep):
    sweep = pipeline_sweep
    console = sweep.console
    assert "stage pretrain: done in" in console and "| matching=backbone,seed=0 | pretrain | loss " in console
    assert "then open http://127.0.0.1:5000/#/experiments/" in console
    if HAVE_DETECTRON2:
        assert "(trivial: " in console  # segmentation's floor beside its mIoU
        for detail in ("Starting training from iteration", "GeneralizedRCNN("):  # detectron2's own log: model dump
            assert detail not in console, detail
            assert all(detail in (job / "det_voc" / "log.txt").read_text() for job in job_dirs(sweep.out)), detail


@pytest.mark.slow
def test_rerunning_the_sweep_does_no_work_and_adds_no_run(pipeline_sweep):
    sweep = pipeline_sweep
    _, before = runs_of(sweep.out)
    files = [p for job in job_dirs(sweep.out) for stage in sweep.stages for p in (job / stage).rglob("*")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    result = run_cli(sweep.out, *sweep.args)
    _, after = runs_of(sweep.out)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    jobs = len(sweep.matchings) * len(sweep.seeds)
    assert result.stdout.count("already done") + result.stderr.count("already done") == jobs * len(sweep.stages)


@pytest.mark.slow
def test_report_builds_its_table_from_the_sweep(pipeline_sweep):
    sweep = pipeline_sweep
    _, runs = runs_of(sweep.out)
    table, written = report.report([f"paths.output_dir={sweep.out}"])
    assert table.row_keys == ["matching"] and list(table.summary["n"]) == [2, 2]  # a row per matching, 2 seeds
    for matching in sweep.matchings:  # mean over the seeds (a seed-only sweep's one row: tests/test_report.py)
        values = [r.data.metrics["pretrain/loss_dense"] for r in runs
                  if PARENT_TAG in r.data.tags and r.data.params["matching"] == matching]  # fmt: skip
        row = table.summary[table.summary["matching"] == matching]
        assert row["pretrain/loss_dense mean"].iloc[0] == pytest.approx(sum(values) / 2)
    assert (sweep.out / "multirun" / "default" / "report" / "table.md") in written


@pytest.mark.slow
def test_downstream_stages_run_on_user_weights(pipeline_sweep, tmp_path):
    """In-process (the command line is the sweep's test): the stages take a .pth given as pretrain.weights."""
    weights = tmp_path / "my_backbone.pth"  # job folder names hold '=' and ',': they would need quoting
    shutil.copy(job_dirs(pipeline_sweep.out)[0] / "pretrain" / "backbone.pth", weights)
    stages = ["det_voc"] if HAVE_DETECTRON2 else ["convert"]  # det_voc converts the .pth itself
    cfg = compose_cfg(*TINY, f"pretrain.weights={weights}", f"stages=[{','.join(stages)}]", "tracking=disabled",
                      f"paths.output_dir={tmp_path}")  # fmt: skip
    job = tmp_path / "job"
    assert planned_stages(cfg) == stages
    run_stages(cfg, job, RunLogger())
    assert not (job / "pretrain").exists()
    for stage in stages:
        assert (job / stage / DONE).is_file()
    if HAVE_DETECTRON2:
        used = json.loads((job / "det_voc" / "stage_config.json").read_text())["weights"]
        assert Path(used) == weights
    else:
        assert json.loads((job / "convert" / "metrics.json").read_text())["num_tensors"] > 60


def compose_cfg(*overrides):
    return schema.compose(overrides, return_hydra_config=False)


class Recorder(RunLogger):
    """A RunLogger that remembers the curve steps it was given instead of logging them: those of the loss and
    those of the feature-quality signals."""

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []
        self.quality_steps: list[int] = []

    def curve(self, prefix):
        recorder = self

        class Curve:
            def __call__(self, step, metrics):
                if "loss" in metrics:
                    recorder.steps.append(step)
                if "knn_acc" in metrics:
                    recorder.quality_steps.append(step)

            def flush(self):
                pass

        return Curve()


@pytest.mark.slow
def test_an_interrupted_pretraining_resumes_from_its_checkpoint(tmp_path):
    from densecl.training.pretrain import pretrain

    cfg = compose_cfg(*TINY, "pretrain.log_every=1", "pretrain.figure.enabled=false", "stages=[pretrain]")
    partial = pretrain(schema.settings(cfg).pretrain_config(), tmp_path / "pretrain", should_stop=lambda: True)
    assert not partial.completed and partial.iterations == 1 and partial.checkpoint_path.is_file()
    assert not (tmp_path / "pretrain" / DONE).exists()
    recorder = Recorder()
    results = run_stages(cfg, tmp_path, recorder)
    assert results["pretrain"]["iterations"] == cfg.pretrain.iters
    assert recorder.steps == list(range(2, cfg.pretrain.iters + 1))  # continued after step 1
    assert recorder.quality_steps == [2, 4]  # every pretrain.eval_every=2, not again at 0
    assert (tmp_path / "pretrain" / DONE).is_file()


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    """The launcher under test, not the training: two 2-step pre-trainings, without the evaluations."""
    run_cli(
        tmp_path, "-m", "hydra/launcher=submitit_local", "seed=0,1", "stages=[pretrain]", "pretrain.iters=2",
        "pretrain.eval_every=0", "pretrain.corr_eval_crop=null", "pretrain.figure.enabled=false",
        "tracking.log_backbone=false",
    )  # fmt: skip
    sweep_dir = tmp_path / "multirun" / "default"
    assert (sweep_dir / ".submitit").is_dir()
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 2 and all((job / "pretrain" / DONE).is_file() for job in jobs)
    _, runs = runs_of(tmp_path)
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert json.loads(parent.data.tags["densecl.swept_keys"]) == ["seed"]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert {c.info.run_name for c in children} == {"seed=0", "seed=1"}  # the swept keys only
    assert {c.data.tags["group"] for c in children} == {"all"}  # nothing swept but the seed
    assert all("pretrain/loss" in r.data.metrics for r in children)


def test_random_init_skips_pretraining_and_conversion():
    cfg = compose_cfg("model=random_init", "stages=[pretrain,convert,det_voc,seg_voc]")
    assert planned_stages(cfg) == ["det_voc", "seg_voc"]
    cfg = compose_cfg("stages=[seg_voc,pretrain]")
    assert planned_stages(cfg) == ["pretrain", "seg_voc"]  # always in pipeline order


def test_preemption_signal_checkpoints_first_then_hands_over(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    handed = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handed.append(signum))
    try:
        with GracefulStop(enabled=True) as stop:
            assert not stop.requested()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested() and handed == []  # recorded only: the engine checkpoints first
            with pytest.raises(SystemExit):
                stop.hand_over()
            assert handed == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is not stop._record  # the original handler is back
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_without_submitit_the_signal_is_left_alone(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGUSR2) is before and not stop.requested()


def test_an_image_folder_reaches_the_engine_and_the_figure(tmp_path):
    from PIL import Image

    from densecl.data.sources import first_images

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (48, 40), (60 * i, 20, 20)).save(tmp_path / "imgs" / "sub" / f"{i}.jpg")
    (tmp_path / "imgs" / "broken.png").write_text("not an image")
    cfg = compose_cfg("data=image_folder", f"data.root={tmp_path / 'imgs'}")
    data = schema.settings(cfg).data
    assert (data.kind, data.root) == ("image_folder", str(tmp_path / "imgs"))
    with pytest.warns(UserWarning, match="skipping broken.png"):
        images = first_images(data, 2)
    assert [im.size for im in images] == [(48, 40), (48, 40)]


def test_stage_settings_hold_what_the_result_depends_on():
    cfg = compose_cfg("stages=[pretrain,probe]")
    probe = stage_settings(cfg, "probe")
    assert probe["downstream.probe.epochs"] == str(cfg.downstream.probe.epochs)
    assert probe["pretrain.base_lr"] == str(cfg.pretrain.base_lr)  # the probed backbone's own settings
    assert "pretrain.num_workers" not in probe and "pretrain.figure.threshold" not in probe
    assert not any(k.startswith("downstream.seg_voc") for k in probe)
    assert "downstream.probe.epochs" not in stage_settings(cfg, "pretrain")
    random_init = stage_settings(compose_cfg("model=random_init"), "probe")
    assert "pretrain.base_lr" not in random_init and "downstream.probe.epochs" in random_init


def test_a_finished_stage_with_other_settings_stops_the_rerun_instead_of_being_skipped(tmp_path):
    tiny = [*TINY, "model=random_init", "stages=[probe]", "tracking=disabled", f"paths.output_dir={tmp_path}"]
    job = tmp_path / "job"
    first = run_stages(compose_cfg(*tiny), job, RunLogger())
    done = json.loads((job / "probe" / DONE).read_text())
    assert done["settings"]["downstream.probe.epochs"] == "1"
    # random init has no pre-training: its settings are not among the probe's, so the stage is skipped
    assert run_stages(compose_cfg(*tiny, "pretrain.base_lr=0.5"), job, RunLogger()) == first
    with pytest.raises(SettingsChangedError, match=r"downstream\.probe\.epochs: '1' then, '2' now.*another name="):
        run_stages(compose_cfg(*tiny, "downstream.probe.epochs=2"), job, RunLogger())
    assert json.loads((job / "probe" / DONE).read_text()) == done  # nothing overwritten
    # a marker from before settings were saved cannot be checked: skipped, as it always was
    (job / "probe" / DONE).write_text(json.dumps({k: v for k, v in done.items() if k != "settings"}))
    assert run_stages(compose_cfg(*tiny, "downstream.probe.epochs=2"), job, RunLogger()) == first
