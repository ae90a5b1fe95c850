"""conf/: every experiment composes and passes the value checks; bad configs fail with the promised messages
(naming the key and the allowed values) before any job starts; job folders depend only on overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from densecl.data.settings import DataConfig, DataKind
from densecl.method.settings import BackboneConfig, Matching, MatchingConfig, ModelConfig
from densecl.training.settings import PretrainConfig, TrainingConfig
from densecl.typed_settings import changes_results
from pipelines import schema
from pipelines.callbacks import SweepError, check_jobs, sweep_jobs
from pipelines.registry import STAGES

# conf/hydra/launcher/submitit_*.yaml shadow the plugin's configs on purpose (pipelines/schema.py)
pytestmark = pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_:UserWarning")

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
ABLATIONS = {
    "ablation_matching": ("matching", ["backbone", "projection", "random", "geometric"]),
    "ablation_regions": ("model.num_regions", ["1", "3", "5", "7", "9"]),
    "ablation_lambda": ("model.loss_lambda", ["0.0", "0.1", "0.3", "0.5", "0.7", "0.9", "1.0"]),
    "baselines": ("model", ["random_init", "mocov2", "densecl"]),
}


def compose_cfg(*overrides: str):
    return schema.compose(overrides)


def test_experiment_files_exist():
    assert set(ABLATIONS) | {"paper_coco_800ep", "paper_imagenet_200ep"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_cfg(*([f"+experiment={experiment}"] if experiment else []))
    schema.validate(cfg, check_paths=False)
    assert cfg.name == (experiment or "default")
    for stage in cfg.stages:
        if STAGES[stage].settings is not None:
            assert schema.settings(cfg).stage_config(stage).arch == cfg.backbone.arch


@pytest.mark.parametrize("experiment", sorted(ABLATIONS))
def test_ablation_grids_expand_to_distinct_validated_jobs(experiment):
    key, values = ABLATIONS[experiment]
    schema.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # check_jobs composes each job
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
        jobs, swept = sweep_jobs(cfg)
        assert list(swept) == [key, "seed"]
        assert swept[key] == values
        assert len(jobs) == len(values) * len(swept["seed"])
        check_jobs(cfg, jobs)  # composes and validates each; raises on shared folders


def test_paper_presets_carry_the_published_protocol():
    coco = compose_cfg("+experiment=paper_coco_800ep")
    imnet = compose_cfg("+experiment=paper_imagenet_200ep")
    for cfg in (coco, imnet):
        assert cfg.backbone.arch == "resnet50"
        assert (cfg.pretrain.crop_size, cfg.pretrain.batch_size, cfg.pretrain.queue_len) == (224, 32, 65536)
        assert (cfg.model.loss_lambda, cfg.model.temperature, cfg.model.momentum) == (0.5, 0.2, 0.999)
        voc = schema.settings(cfg).stage_config("det_voc")
        assert (voc.max_iter, voc.ims_per_batch, voc.base_lr, voc.steps) == (24000, 16, 0.02, (18000, 22000))
        seg = schema.settings(cfg).stage_config("seg_cityscapes")
        assert (seg.dataset, seg.crop_size, seg.max_iter) == ("cityscapes", 769, 40000)
        assert cfg.pretrain.lr_schedule == "epoch"  # the official configs' cosine moves per epoch
    assert (coco.pretrain.epochs, coco.pretrain.base_lr, coco.data.root.endswith("coco/train2017")) == (
        800,
        0.3,
        True,
    )
    assert (imnet.pretrain.epochs, imnet.pretrain.base_lr) == (200, 0.03)


def test_lambda_ablation_warms_up_only_the_pure_dense_loss():
    assert compose_cfg("+experiment=ablation_lambda", "model.loss_lambda=1.0").model.lambda_warmup_iters > 0
    assert compose_cfg("+experiment=ablation_lambda", "model.loss_lambda=0.9").model.lambda_warmup_iters == 0


def test_default_is_the_small_cpu_chain_with_local_tracking():
    cfg = compose_cfg("paths.output_dir=/tmp/x")
    assert list(cfg.stages) == ["pretrain", "convert", "det_voc", "seg_voc"]
    assert cfg.backbone.arch == "resnet18" and cfg.data.kind == DataKind.synthetic
    assert cfg.pretrain.crop_size <= 128 and cfg.pretrain.iters <= 500
    assert cfg.pretrain.queue_len % cfg.pretrain.batch_size == 0
    assert cfg.tracking.uri == "sqlite:////tmp/x/mlflow.db"
    assert cfg.hydra.run.dir == "/tmp/x/runs/default/base"
    assert cfg.hydra.sweep.dir == "/tmp/x/multirun/default"


def test_launchers_requeue_and_expose_the_cluster_keys():
    cfg = compose_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.max_num_timeout > 0
    for key in ("partition", "account", "qos", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                "mem_gb", "timeout_min", "setup", "signal_delay_s"):  # fmt: skip
        assert key in launcher, key
    assert launcher.partition == "gpu"
    assert launcher.signal_delay_s < launcher.timeout_min * 60
    local = compose_cfg("hydra/launcher=submitit_local").hydra.launcher
    assert local._target_.endswith("LocalLauncher")
    with pytest.raises(ConfigCompositionException):  # still typed by the plugin's schema
        compose_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.nodes=two")


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (["model.num_regions=0"], "model.num_regions", "1..16"),
        (["model.loss_lambda=1.5"], "model.loss_lambda", "[0, 1]"),
        (["model.loss_lambda=-0.1"], "model.loss_lambda", "[0, 1]"),
        (["model=mocov2", "model.loss_lambda=0.5"], "model.loss_lambda", "lambda = 0"),
        (["data=image_folder"], "data.root", "data.root=/path/to/images"),
        (["data=image_folder", "data.root=/no/such/dir"], "data.root", "does not exist"),
        (["data=imagenet", "paths.data_dir=/no/such/dir"], "data.root", "does not exist"),
        (["stages=[pretrain,detect]"], "stages", "det_voc"),
        (["stages=[pretrain,pretrain]"], "stages", "once"),
        (["pretrain.queue_len=100"], "pretrain.queue_len", "divisible"),
        (["pretrain.epochs=10"], "pretrain.iters", "exactly one"),
        (["backbone.arch=vgg16"], "backbone.arch", "resnet50"),
        (["pretrain.weights=/no/such.pth", "stages=[det_voc]"], "pretrain.weights", "existing"),
        (["pretrain.weights=/no/such.pth"], "stages", "must not run"),
        (["+downstream.det_voc.max_iters=5"], "downstream.det_voc.max_iters", "max_iter"),
        (["downstream.det_voc.preset=tiny"], "downstream.det_voc.preset", "synthetic"),
        (
            ["downstream=paper", "stages=[det_voc]", "paths.data_dir=/no/such/dir"],
            "downstream.det_voc",
            "VOC",
        ),
        (["tracking=server"], "tracking.uri", "tracking=disabled"),
        (["downstream.synthetic.num_val=0"], "downstream.synthetic.num_val=0", "an integer >= 1"),
    ],
)
def test_invalid_values_name_the_key_and_the_allowed_values(overrides, key, allowed):
    cfg = compose_cfg(*overrides)
    with pytest.raises(schema.ConfigValueError) as err:
        schema.validate(cfg)
    assert key in str(err.value) and allowed in str(err.value)


def test_unknown_names_fail_at_composition_with_the_choices():
    with pytest.raises(MissingConfigException) as err:
        compose_cfg("matching=hungarian")
    assert "matching" in str(err.value)
    assert all(name in str(err.value) for name in ("backbone", "projection", "random", "geometric"))
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("matching.name=hungarian")
    cause = str(err.value.__cause__)
    assert "matching.name" in cause and "backbone, projection, random, geometric" in cause
    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.num_regions=seven")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("pretrain.batch_sise=8")  # typo: no such key


def test_the_schema_is_the_librarys_dataclasses():
    cfg = compose_cfg()
    sections = {"backbone": BackboneConfig, "model": ModelConfig, "matching": MatchingConfig, "data": DataConfig,
                "pretrain": TrainingConfig}
    for section, cls in sections.items():
        assert OmegaConf.get_type(cfg[section]) is cls, section
    assert isinstance(cfg.matching.name, Matching)  # the library's one list of choices types the config


def test_settings_carry_every_composed_value_to_the_engine():
    cfg = compose_cfg("matching=geometric", "model.num_regions=3", "seed=4", "pretrain.bn_splits=2")
    pcfg = schema.settings(cfg).pretrain_config()
    assert type(pcfg) is PretrainConfig
    pcfg.validate()
    chosen = (pcfg.matching.name, pcfg.model.num_regions, pcfg.seed, pcfg.backbone.arch)
    assert chosen == ("geometric", 3, 4, "resnet18")
    saved = pcfg.to_dict()
    for section in PretrainConfig.SECTIONS:
        composed = OmegaConf.to_container(cfg[section], resolve=True, enum_to_str=True)
        if section == "pretrain":  # the one value settings() resolves: which labelled set the signals use
            assert composed["eval_data"] == "auto" and saved[section]["eval_data"] == "scenes"
            composed["eval_data"] = "scenes"
        assert saved[section] == composed, section
    assert (saved["seed"], saved["device"]) == (cfg.seed, cfg.device)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], "base"),
        (["seed=1", "++model.loss_lambda=0.3"], "model.loss_lambda=0.3,seed=1"),  # sorted, no '+' prefix
        (["pretrain.weights=/a/b.pth", "tracking.uri=x", "stages=[det_voc]"], "pretrain.weights=%a%b.pth"),
        (["downstream.seg_voc.num_workers=0", "downstream.seg_voc.max_iter=9"], "downstream.seg_voc.max_iter=9"),
        (["pretrain.figure.threshold=0.5", "device=cpu", "pretrain.log_every=5", "+experiment=mini_paper"], "base"),
    ],
)
def test_job_dirname_depends_only_on_overrides(overrides, expected):
    assert schema.job_dirname(overrides) == expected
    assert schema.job_dirname(overrides[::-1]) == expected


# the settings that change no result: each declared so on its field (densecl.typed_settings.neutral)
NEUTRAL = ["device", "data.cache_dir", "pretrain.num_workers", "pretrain.progress", "pretrain.log_every",
           "pretrain.ckpt_every", "pretrain.compile", "pretrain.figure.threshold", "pretrain.figure.enabled",
           "downstream.det_voc.device", "downstream.det_voc.num_workers", "downstream.det_voc.progress",
           "downstream.det_voc.log_period", "downstream.det_voc.checkpoint_period", "downstream.det_voc.eval_period",
           "downstream.probe.device", "downstream.probe.progress", "downstream.classify.device",
           "name", "stages", "verbose", "plan", "paths.output_dir", "tracking.uri", "report.metrics"]  # fmt: skip


@pytest.mark.parametrize("key", NEUTRAL)
def test_keys_that_change_no_result_stay_out_of_folder_names(key):
    """The role declared on a field serves both: what a rerun may change freely (densecl.resume) names no
    folder."""
    assert not changes_results(schema.pipeline_schema(), key)
    assert schema.job_dirname([f"{key}=1", "seed=2"]) == "seed=2"


def test_keys_that_change_results_name_the_folder():
    keys = ["seed", "model.loss_lambda", "pretrain.iters", "data.num_images", "downstream.det_voc.max_iter",
            "downstream.synthetic.num_train", "downstream.seg_voc.custom.root", "model", "downstream"]
    for key in keys:
        assert changes_results(schema.pipeline_schema(), key)
        assert schema.job_dirname([f"{key}=1", "pretrain.num_workers=2"]) == f"{key}=1"


def test_long_job_dirnames_stay_distinct():
    a, b = [f"data.root={'a' * 300}1"], [f"data.root={'a' * 300}2"]
    assert len(schema.job_dirname(a)) <= 120 and schema.job_dirname(a) != schema.job_dirname(b)


def test_job_folders_follow_the_overrides():
    assert compose_cfg("paths.output_dir=/o").hydra.run.dir == "/o/runs/default/base"
    cfg = compose_cfg("paths.output_dir=/o", "+experiment=baselines", "seed=2", "tracking=disabled")
    assert cfg.hydra.run.dir == "/o/runs/baselines/seed=2"


def test_jobs_that_share_a_folder_are_refused():
    schema.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        jobs = [
            ["seed=1", "stages=[pretrain]"],
            ["seed=1", "stages=[pretrain,convert]"],
        ]  # stages: not in names
        with pytest.raises(SweepError, match="share the job folder"):
            check_jobs(cfg, jobs)


def _run_cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.run", *args, f"paths.output_dir={tmp_path}"],  # -m first or last
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_refuses_a_bad_run_before_any_work(tmp_path):
    result = _run_cli(tmp_path, "model.num_regions=0")
    assert result.returncode != 0
    assert "model.num_regions=0 is invalid" in result.stderr and "1..16" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_refuses_a_sweep_with_one_bad_job_before_launching_any(tmp_path):
    result = _run_cli(tmp_path, "-m", "model.loss_lambda=0.5,2")
    assert result.returncode != 0
    assert "no job was launched" in result.stderr and "model.loss_lambda=2" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    sweep = tmp_path / "multirun" / "default"
    assert not sweep.exists() or not any(p.is_dir() for p in sweep.iterdir())
