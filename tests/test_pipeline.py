"""The pipeline end to end, tiny: a sweep leaves parent and child runs with params, curves, final metrics and
artifacts in the mlflow store; a rerun redoes nothing and adds no run; the report reads the runs; downstream
stages run on user weights; an interrupted pre-training resumes; submitit_local runs a two-job sweep."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from densecl.resume import SettingsChangedError
from pipelines import report, schema
from pipelines.preemption import GracefulStop
from pipelines.stages import DONE, planned_stages, run_stages, stage_settings
from pipelines.tracking import PARENT_TAG, RunLogger, Tracker

pytestmark = pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_:UserWarning")

ROOT = Path(__file__).resolve().parent.parent
HAVE_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
STAGES = ["pretrain", "convert"] + (["det_voc", "seg_voc"] if HAVE_DETECTRON2 else []) + ["probe"]
TINY = [  # seconds per job on 2 cores (mostly start-up)
    "pretrain.iters=4",
    "pretrain.batch_size=4",
    "pretrain.queue_len=16",
    "pretrain.crop_size=64",
    "pretrain.log_every=2",
    "pretrain.ckpt_every=2",
    "pretrain.eval_every=2",  # the feature-quality signals at 0, 2 and 4, on a few small scenes
    "pretrain.eval_num_train=8",
    "pretrain.eval_num_val=4",
    "pretrain.eval_size=64",
    "data.num_images=16",
    "pretrain.figure.num_images=1",
    "pretrain.figure.crop_size=64",
    "downstream.synthetic.num_train=8",
    "downstream.synthetic.num_val=4",
    # `++`: keys the downstream sections may not list yet (they take any field of the stage's config class)
    "downstream.det_voc.max_iter=1",
    "downstream.det_voc.ims_per_batch=2",
    "++downstream.det_voc.precise_bn=false",
    "downstream.det_voc.num_workers=0",
    "++downstream.det_voc.min_size_train=[96]",
    "++downstream.det_voc.max_size_train=128",
    "++downstream.det_voc.min_size_test=96",
    "++downstream.det_voc.max_size_test=128",
    "downstream.seg_voc.max_iter=1",
    "downstream.seg_voc.ims_per_batch=2",
    "downstream.seg_voc.num_workers=0",
    "++downstream.seg_voc.crop_size=64",
    "++downstream.seg_voc.img_scale=[320,80]",
    "downstream.probe.image_size=64",
    "downstream.probe.input_size=64",
    "downstream.probe.num_train=8",
    "downstream.probe.num_val=4",
    "downstream.probe.epochs=1",
    "++downstream.probe.batch_size=4",
]


def run_cli(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipelines.run ARGS TINY paths.output_dir=OUT` in OUT (-m, if any, comes first in ARGS)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run", *args, *TINY, f"paths.output_dir={out}"],
        cwd=out, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def runs_of(out: Path, experiment: str = "default") -> list:
    tracker = Tracker(f"sqlite:///{out}/mlflow.db")
    exp = tracker.client.get_experiment_by_name(experiment)
    return tracker, tracker.client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, request):
    """A two-job sweep, shared by this module's tests; its ~1 GB is removed after them unless one failed."""
    out = tmp_path_factory.mktemp("sweep")
    failed_before = request.session.testsfailed
    result = run_cli(out, "-m", "seed=0,1", f"stages=[{','.join(STAGES)}]")
    (out / "console.txt").write_text(result.stdout + result.stderr)  # what the terminal showed
    yield out
    if request.session.testsfailed == failed_before:
        shutil.rmtree(out, ignore_errors=True)


def job_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "multirun" / "default").iterdir() if (p / "mlflow_run.json").exists())


@pytest.mark.slow
def test_sweep_leaves_parent_and_child_runs_with_params_metrics_and_artifacts(sweep):
    tracker, runs = runs_of(sweep)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.data.tags["densecl.kind"] == "sweep" and json.loads(
        parent.data.tags["densecl.swept_keys"]
    ) == ["seed"]
    assert parent.info.status == "FINISHED"
    assert {c.data.params["seed"] for c in children} == {"0", "1"}
    assert {c.info.run_name for c in children} == {"seed=0", "seed=1"}  # the swept keys only
    assert {c.data.tags["group"] for c in children} == {"all"}  # nothing swept but the seed
    experiment = tracker.client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the sweep's end made the report on the parent: the table mlflow renders, and the plots as images
    parent_artifacts = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/table.json", "report/table.md", "report/table.csv"} <= parent_artifacts
    for child in children:
        assert child.data.tags[PARENT_TAG] == parent.info.run_id and child.info.status == "FINISHED"
        params, metrics = child.data.params, child.data.metrics
        assert params["model.loss_lambda"] == "0.5" and params["matching.name"] == "backbone"
        assert params["pretrain.iters"] == "4" and params["backbone.arch"] == "resnet18"
        assert child.data.tags["override.seed"] == params["seed"]
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
    for job in job_dirs(sweep):
        for stage in STAGES:
            done = json.loads((job / stage / DONE).read_text())
            assert done["metrics"] == json.loads((job / stage / "metrics.json").read_text())


@pytest.mark.slow
def test_the_terminal_shows_headlines_and_a_summary_and_detectron2_details_go_to_the_stage_logs(sweep):
    console = (sweep / "console.txt").read_text()
    assert "stage pretrain: done in" in console and "| seed=0 | pretrain | loss " in console
    assert "then open http://127.0.0.1:5000/#/experiments/" in console
    if HAVE_DETECTRON2:
        assert "(trivial: " in console  # segmentation's floor beside its mIoU
        for detail in ("Starting training from iteration", "GeneralizedRCNN("):  # detectron2's own log: model dump
            assert detail not in console, detail
            assert all(detail in (job / "det_voc" / "log.txt").read_text() for job in job_dirs(sweep)), detail


@pytest.mark.slow
def test_rerunning_the_sweep_does_no_work_and_adds_no_run(sweep):
    _, before = runs_of(sweep)
    files = [p for job in job_dirs(sweep) for stage in STAGES for p in (job / stage).rglob("*")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    result = run_cli(sweep, "-m", "seed=0,1", f"stages=[{','.join(STAGES)}]")
    _, after = runs_of(sweep)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert result.stdout.count("already done") + result.stderr.count("already done") == 2 * len(STAGES)


@pytest.mark.slow
def test_report_builds_its_table_from_the_sweep(sweep):
    _, runs = runs_of(sweep)
    table, written = report.report([f"paths.output_dir={sweep}"])
    assert table.row_keys == ["all"] and list(table.summary["n"]) == [2]
    values = [r.data.metrics["pretrain/loss_dense"] for r in runs if PARENT_TAG in r.data.tags]
    assert table.summary["pretrain/loss_dense mean"].iloc[0] == pytest.approx(sum(values) / 2)
    assert (sweep / "multirun" / "default" / "report" / "table.md") in written


@pytest.mark.slow
def test_downstream_stages_run_on_user_weights(sweep, tmp_path):
    weights = tmp_path / "my_backbone.pth"  # job folder names hold '=' and ',': they would need quoting
    shutil.copy(job_dirs(sweep)[0] / "pretrain" / "backbone.pth", weights)
    stages = ["det_voc"] if HAVE_DETECTRON2 else ["convert"]  # det_voc converts the .pth itself
    run_cli(sweep, f"pretrain.weights={weights}", f"stages=[{','.join(stages)}]")
    (job,) = [p for p in (sweep / "runs" / "default").iterdir() if p.is_dir()]
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
    run_cli(
        tmp_path, "-m", "hydra/launcher=submitit_local", "seed=0,1", "stages=[pretrain]",
        "pretrain.figure.enabled=false", "tracking.log_backbone=false",
    )  # fmt: skip
    sweep_dir = tmp_path / "multirun" / "default"
    assert (sweep_dir / ".submitit").is_dir()
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 2 and all((job / "pretrain" / DONE).is_file() for job in jobs)
    _, runs = runs_of(tmp_path)
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
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
