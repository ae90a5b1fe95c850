"""`python -m pipelines.run [overrides] [-m]`: pre-training and transfer stages for one job, or a sweep.

    python -m pipelines.run                                   # the whole chain on synthetic data (CPU)
    python -m pipelines.run +experiment=ablation_matching -m  # a sweep from conf/experiment/
    python -m pipelines.run pretrain.weights=PATH stages=[det_voc]
    python -m pipelines.run +experiment=baselines hydra/launcher=submitit_slurm hydra.launcher.qos=high -m

Config: conf/ (schema and checks in pipelines/schema.py). The job runs in
<paths.output_dir>/runs/<name>/<overrides> (or multirun/<name>/<overrides> for sweeps), see docs/pipeline.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipelines import schema
from pipelines.callbacks import tracker_for
from pipelines.launching import apply_cpu_allocation, export_distributed_env, is_global_rank_zero
from pipelines.stages import run_stages
from pipelines.tracking import CHILD_FILE, RunLogger, read_run_id

log = logging.getLogger(__name__)


def job_logger(cfg: DictConfig, job_dir: Path) -> RunLogger:
    """The child run opened for this job by the callback (rank 0 with tracking on), else a no-op."""
    if not cfg.tracking.enabled or not is_global_rank_zero():
        return RunLogger()
    run_id = read_run_id(job_dir / CHILD_FILE)
    if not run_id:
        raise RuntimeError(
            f"tracking is on but no mlflow run was opened for {job_dir} (see the callback's warning above): "
            f"fix tracking.uri or run with tracking=disabled"
        )
    return RunLogger(tracker_for(cfg), run_id)


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


if __name__ == "__main__":
    schema.register()
    main()
