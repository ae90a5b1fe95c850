"""`python -m pipelines.run [overrides] [-m]`: pre-training and transfer stages for one job, or a sweep.

    python -m pipelines.run                                   # the whole chain on synthetic data (CPU)
    python -m pipelines.run +experiment=ablation_matching -m  # a sweep from conf/experiment/
    python -m pipelines.run pretrain.weights=PATH stages=[det_voc]
    python -m pipelines.run +experiment=baselines hydra/launcher=submitit_slurm hydra.launcher.qos=high -m
    python -m pipelines.run +experiment=ablation_matching -m plan=true  # every job's settings, nothing run

Config: conf/ (schema and checks in pipelines/schema.py). The job runs in
<paths.output_dir>/runs/<name>/<overrides> (or multirun/<name>/<overrides> for sweeps), see docs/pipeline.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipelines import credentials, schema
from pipelines.callbacks import journal_for
from pipelines.launching import apply_cpu_allocation, export_distributed_env, is_global_rank_zero
from pipelines.stages import run_stages
from pipelines.tracking import CHILD_FILE, RunLogger

log = logging.getLogger(__name__)


def job_logger(cfg: DictConfig, job_dir: Path) -> RunLogger:
    """What the job's stages log to its child run, through the run's journal (opened by the callback), on rank 0
    with tracking on; else a no-op."""
    if not cfg.tracking.enabled or not is_global_rank_zero():
        return RunLogger()
    return RunLogger(journal_for(cfg, job_dir / CHILD_FILE))


def run_job(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """The task: every planned stage of this job, in its folder (validated again here for sweepers
    other than the basic one, whose jobs the launching process cannot know in advance)."""
    schema.validate(cfg)
    export_distributed_env()
    apply_cpu_allocation()
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    return run_stages(cfg, job_dir, job_logger(cfg, job_dir))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, dict[str, float]]:
    return run_job(cfg)


# Hydra's options that take a value (`--cfg job`); every other token that starts with '-' is a flag
VALUE_OPTIONS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                 "-cd", "--experimental-rerun")
INFO_OPTIONS, INFO_VALUES = ("--info", "-i"), ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's options with their values, the overrides), each in its order."""
    options, overrides, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-"):
            overrides.append(token)
            i += 1
            continue
        with_value = token in VALUE_OPTIONS or (token in INFO_OPTIONS and i + 1 < len(argv)
                                                and argv[i + 1] in INFO_VALUES)
        options += argv[i : i + 1 + with_value]
        i += 1 + with_value
    return options, overrides


if __name__ == "__main__":
    # Options first: Hydra 1.3.8's parser refuses an override after an option (`... -m pretrain.iters=6`;
    # hydra#3053, fixed after that release), and the documented commands put overrides on both sides of `-m`.
    options, overrides = split_arguments(sys.argv[1:])
    overrides = credentials.to_environment(overrides)  # a password in tracking.uri never reaches the config
    sys.argv[1:] = options + overrides
    try:
        schema.check_override_keys(overrides)
    except schema.UnknownKeyError as err:
        raise SystemExit(f"invalid override: {err}") from None
    schema.register()
    main()
