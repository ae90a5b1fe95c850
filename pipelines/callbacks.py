"""Hydra callbacks: check every job's config before anything starts, and open the mlflow runs.

- `on_run_start` / `on_multirun_start` (the launching process): compose and `schema.validate` every job of
  the run or sweep (a bad value fails here, before any job is launched), check that the jobs' folders are
  distinct, create the mlflow experiment once (before concurrent jobs could race to create it) and open
  the parent run. Its id is kept in `<group folder>/mlflow_parent.json` (the sweep folder, or
  `runs/<name>/` for single runs), so rerunning the same sweep reuses it. The experiment's runs table is
  stored as an mlflow shared view (`runs_view`), so the printed link opens it with the right columns.
- `on_job_start` (in the job's own process, on every SLURM task): export the distributed environment;
  on global rank 0 open the child run, whose id is kept in `<job folder>/mlflow_run.json` (a resubmitted
  or rerun job reuses it), named after its swept keys and tagged with its `group` (the swept keys but the
  seeds) and its overrides; log the resolved config and the swept keys as params (once: mlflow params are
  immutable) and the config as an artifact.
- `on_job_end` / `on_run_end` / `on_multirun_end`: mark the runs FINISHED or FAILED (a job killed by
  preemption never gets here: its run stays RUNNING until the requeued job finishes it); at the end of a
  sweep, make its report on the parent run (pipelines.report); then print the summary of every job's stages
  with the mlflow command and link.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipelines import plan, schema
from pipelines.console import summary_table
from pipelines.credentials import mask, masked
from pipelines.journal import Journal, journal_path
from pipelines.launching import export_distributed_env, is_global_rank_zero
from pipelines.registry import STAGES
from pipelines.stages import DONE
from pipelines.tracking import (
    CHILD_FILE,
    OVERRIDE_TAG,
    PARENT_FILE,
    TAG_EXPERIMENT,
    TAG_GROUP,
    TAG_GROUP_DIR,
    TAG_JOB_DIR,
    TAG_KIND,
    TAG_SWEPT,
    TAG_SWEPT_VALUES,
    Tracker,
    as_params,
    normalise_uri,
    read_run_id,
    write_run_id,
)

log = logging.getLogger(__name__)


_trackers: dict[str, Tracker] = {}  # per process, never pickled with the callback


def tracker_for(cfg: DictConfig) -> Tracker:
    t = cfg.tracking
    if t.uri not in _trackers:
        _trackers[t.uri] = Tracker(t.uri, retries=t.retries, retry_wait_s=t.retry_wait_s)
    return _trackers[t.uri]


_journals: dict[Path, Journal] = {}


def journal_for(cfg: DictConfig, id_file: Path) -> Journal:
    """The journal of the run `id_file` names (pipelines.journal), one object per process and run."""
    id_file = Path(id_file).absolute()
    if id_file not in _journals:
        _journals[id_file] = Journal(id_file, lambda: tracker_for(cfg))
    return _journals[id_file]


def group_dir(config: DictConfig) -> Path:
    """The folder a sweep's (or a run group's) jobs live in; it holds the parent run's id."""
    if config.hydra.mode == RunMode.MULTIRUN:
        return Path(config.hydra.sweep.dir).absolute()
    return Path(config.hydra.run.dir).absolute().parent


def parse_overrides(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def override_tags(overrides: list[str]) -> dict[str, str]:
    """{"override.matching": "random", "override.seed": "1", ...}: the job's overrides as written."""
    return {
        f"{OVERRIDE_TAG}{o.key_or_group}": o.get_value_element_as_str() for o in parse_overrides(overrides)
    }


def swept_keys(group: Path) -> list[str]:
    """The keys the sweep varies, as the launching process recorded them beside the parent run's id (a job
    reads them without asking the tracking store); none for a single run."""
    try:
        return list(json.loads((group / PARENT_FILE).read_text()).get("swept_keys", []))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def swept_values(overrides: list[str], keys: list[str]) -> dict[str, str]:
    """{key: value as written} of the job's overrides of the swept `keys`, sorted by key."""
    given = {o.key_or_group: o.get_value_element_as_str() for o in parse_overrides(overrides)}
    return {key: given[key] for key in sorted(keys) if key in given}


def join_values(values: dict[str, str]) -> str:
    """{"matching": "random", "seed": "1"} -> "matching=random,seed=1": a child run's name and group."""
    return ",".join(f"{k}={v}" for k, v in values.items())


def sweep_jobs(config: DictConfig) -> tuple[list[list[str]], dict[str, list[str]]]:
    """The overrides of every job the basic sweeper will launch, and the swept keys with their values in
    sweep order (grid of `hydra.sweeper.params` plus sweeps on the command line), as the sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = parse_overrides(arguments)
    swept: dict[str, list[str] | None] = {}
    for o in parsed:  # a later plain override of a key ends its sweep
        swept[o.key_or_group] = list(o.sweep_string_iterator()) if o.is_sweep_override() else None
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return jobs, {k: values for k, values in swept.items() if values is not None}


def composed_jobs(config: DictConfig, jobs: list[list[str]], swept: list[str]) -> list[tuple[str, Path, DictConfig]]:
    """(name, folder, composed config) of every job of a basic sweep."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    sweep_dir = group_dir(config)
    found = []
    for overrides in jobs:
        job_cfg = loader.load_sweep_config(master_config=config, sweep_overrides=list(overrides))
        name = join_values(swept_values(overrides, swept)) or "base"
        found.append((name, sweep_dir / str(job_cfg.hydra.sweep.subdir), job_cfg))
    return found


def show_plan(config: DictConfig, jobs: Callable[[], list[tuple[str, Path, DictConfig]]], what: str) -> None:
    """Print the plan (pipelines.plan) of every job `jobs()` gives (name, folder, config) and exit: nothing is
    run, made or tracked. Any error ends the launch too (Hydra would turn it into a warning and run the jobs)."""
    try:
        text = plan_text(config, jobs(), what)
    except (Exception, SystemExit) as err:
        raise SystemExit(f"plan=true: no plan, and nothing ran: {err}") from err
    print(text, flush=True)
    raise SystemExit(0)


def plan_text(config: DictConfig, jobs: list[tuple[str, Path, DictConfig]], what: str) -> str:
    world_size = plan.launcher_world_size(config)
    texts = []
    for name, job_dir, job_cfg in jobs:
        try:
            schema.validate(job_cfg, check_paths=False)
        except schema.ConfigValueError as err:
            raise SystemExit(f"invalid config, job [{name}]: {err}") from None
        texts.append(plan.format_job(name, job_dir, plan.plan_job(job_cfg, job_dir, world_size)))
        try:
            schema.validate(job_cfg)
        except schema.ConfigValueError as err:
            texts.append(f"  this job would stop before it starts: {err}")
    launcher = config.hydra.runtime.choices.get("hydra/launcher", "basic")
    header = f"plan of the {what} {config.name!r} (launcher {launcher}, {world_size} process(es) a job); nothing ran"
    return "\n\n".join([header, *texts])


class SweepError(ValueError):
    """A sweep that cannot run as a whole: a bad job, or two jobs that would share a folder."""


def check_jobs(config: DictConfig, jobs: list[list[str]]) -> None:
    """Compose and validate every job of a sweep; distinct jobs must get distinct folders."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    folders: dict[str, list[str]] = {}
    for overrides in jobs:
        job_cfg = loader.load_sweep_config(master_config=config, sweep_overrides=list(overrides))
        try:
            schema.validate(job_cfg)
        except schema.ConfigValueError as err:
            raise SweepError(f"job [{' '.join(overrides)}]: {err}") from None
        folder = str(job_cfg.hydra.sweep.subdir)
        if folder in folders:
            raise SweepError(
                f"jobs [{' '.join(folders[folder])}] and [{' '.join(overrides)}] would share the job folder "
                f"{folder!r}: they differ only in keys left out of job folder names (pipelines.schema.job_dirname)"
            )
        folders[folder] = list(overrides)


def runs_view(config: DictConfig, swept: list[str]) -> tuple[list[str], str]:
    """The runs table's columns for this run or sweep (the swept keys, the group, each planned stage's headline
    figures) and its order (the first swept key, else the seed: every child has one, the parent not)."""
    point = [key for key in swept if key not in config.report.seed_keys]
    stages = [s for s in STAGES if s.name in config.stages and s.name != "convert"]
    columns = [f"params.`{key}`" for key in swept] + ([f"tags.`{TAG_GROUP}`"] if point else [])
    columns += [f"metrics.`{stage.name}/{name}`" for stage in stages for name in stage.headline]
    return columns, f"params.`{(swept or ['seed'])[0]}`"


def print_summary(config: DictConfig, jobs: dict[str, Path]) -> None:
    """Every job's stages with their headline figures, where they are, and how to see them in mlflow."""
    lines = ["", summary_table(jobs, STAGES.names(), DONE), "", f"folders: {group_dir(config)}"]
    if config.tracking.enabled:
        tracker = tracker_for(config)
        experiment_id = tracker.experiment_id(config.tracking.experiment_name, config.tracking.artifact_location)
        lines.append(f"mlflow: experiment {config.tracking.experiment_name!r}: {tracker.ui_hint(experiment_id)}")
    print("\n".join(lines), flush=True)


def _status_code(err: BaseException) -> int | None:
    """The HTTP status of an mlflow request that failed, when it had one."""
    code = getattr(err, "get_http_status_code", lambda: None)()
    if isinstance(code, int) and code != 500:
        return code
    for status in (401, 403):
        if f"{status}" in str(err) and ("unauthorized" in str(err).lower() or "forbidden" in str(err).lower()):
            return status
    return code


class PipelineCallback(Callback):
    """Registered in conf/hydra/densecl.yaml (hydra.callbacks.densecl)."""

    # ---------------------------------------------------------------------------------- launching process

    # Hydra turns an exception raised by a callback into a warning and carries on, so a bad config or an
    # unreachable tracking store ends the launch with SystemExit (its message is printed, exit status 1).

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.plan:
            job_dir = Path(config.hydra.run.dir).absolute()
            show_plan(config, lambda: [(job_dir.name, job_dir, config)], "run")
        try:
            schema.validate(config)
        except schema.ConfigValueError as err:
            raise SystemExit(f"invalid config: {err}") from None
        self._open_parent(config, kind="run", swept={}, num_jobs=1)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            jobs, swept = sweep_jobs(config)
            if config.plan:
                show_plan(config, lambda: composed_jobs(config, jobs, list(swept)), f"sweep of {len(jobs)} jobs")
            try:
                check_jobs(config, jobs)
            except SweepError as err:
                raise SystemExit(f"invalid config, no job was launched: {err}") from None
            log.info("sweep of %d jobs over %s validated", len(jobs), ", ".join(swept) or "nothing")
        else:  # another sweeper picks jobs as it goes: each job validates its config when it starts
            if config.plan:
                raise SystemExit(f"plan=true needs Hydra's basic sweeper, which knows every job in advance; "
                                 f"{config.hydra.sweeper._target_} chooses them as it goes")
            jobs, swept = [], {str(k): [] for k in config.hydra.sweeper.get("params") or {}}
        self._open_parent(config, kind="sweep", swept=swept, num_jobs=len(jobs))

    def on_run_end(self, config: DictConfig, job_return: JobReturn | None = None, **kwargs: Any) -> None:
        ok = job_return is None or job_return.status == JobStatus.COMPLETED
        self._finish_parent(config, "FINISHED" if ok else "FAILED")
        if is_global_rank_zero():
            job = Path(config.hydra.run.dir).absolute()
            print_summary(config, {job.name: job})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's report on its parent run (no second command), then the summary in the terminal."""
        if not is_global_rank_zero():
            return
        sweep_dir = group_dir(config)
        if str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            overrides, swept = sweep_jobs(config)
            jobs = {join_values(swept_values(o, list(swept))) or "base": sweep_dir / schema.job_dirname(o)
                    for o in overrides}
        else:
            jobs = {p.name: p for p in sorted(sweep_dir.iterdir()) if (p / ".hydra").is_dir()}
        if config.tracking.enabled:
            deadline = time.monotonic() + config.tracking.flush_timeout_s
            for job in jobs.values():  # what a job could not send before it ended: the report needs it
                if journal_path(job / CHILD_FILE).is_file():
                    journal_for(config, job / CHILD_FILE).flush(max(0.0, deadline - time.monotonic()))
            parent = journal_for(config, sweep_dir / PARENT_FILE)
            parent.append("report", config=str(sweep_dir / "sweep_config.yaml"))
            parent.append("status", status="FINISHED")
            parent.flush(max(0.0, deadline - time.monotonic()))
        print_summary(config, jobs)

    def _open_parent(self, config: DictConfig, kind: str, swept: dict[str, list[str]], num_jobs: int) -> None:
        if not config.tracking.enabled or not is_global_rank_zero():
            return
        try:
            self._open_parent_run(config, kind, swept, num_jobs)
        except Exception as err:
            uri = mask(str(config.tracking.uri))
            if _status_code(err) in (401, 403):
                raise SystemExit(
                    f"mlflow at {uri} refused the credentials (HTTP {_status_code(err)}): set "
                    f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or a user:password in tracking.uri) "
                    f"to an account of the server. No job was launched."
                ) from None
            raise SystemExit(
                f"mlflow: cannot open the parent run at {uri}: {mask(repr(err))}. "
                f"Fix tracking.uri, or run with tracking=disabled. No job was launched."
            ) from None

    def _open_parent_run(
        self, config: DictConfig, kind: str, swept: dict[str, list[str]], num_jobs: int
    ) -> None:
        tracker = tracker_for(config)
        experiment_id = tracker.experiment_id(
            config.tracking.experiment_name, config.tracking.artifact_location
        )
        folder = group_dir(config)
        choices = config.hydra.runtime.choices
        tags = {
            TAG_KIND: kind,
            TAG_GROUP_DIR: str(folder),
            TAG_SWEPT: json.dumps(list(swept)),
            TAG_SWEPT_VALUES: json.dumps(swept)[:5000],
            TAG_EXPERIMENT: choices.get("experiment") or "",
            "densecl.num_jobs": str(num_jobs),
            "densecl.command": " ".join(sys.argv)[:5000],
        }
        run_id, created = tracker.open_run(
            folder / PARENT_FILE, experiment_id, run_name=config.name, tags=masked(tags)
        )
        write_run_id(folder / PARENT_FILE, run_id, experiment_id=experiment_id, tracking_uri=tracker.uri,
                     swept_keys=list(swept))
        tracker.set_runs_view(experiment_id, *runs_view(config, list(swept)))
        snapshot = folder / f"{kind}_config.yaml"
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(mask(OmegaConf.to_yaml(config)))
        tracker.log_artifact(run_id, snapshot, "config")
        log.info(
            "mlflow: %s parent run %s (%s) in experiment %r at %s",
            "new" if created else "reusing",
            run_id,
            folder,
            config.tracking.experiment_name,
            tracker.uri,
        )

    def _finish_parent(self, config: DictConfig, status: str) -> None:
        if not config.tracking.enabled or not is_global_rank_zero():
            return
        parent = journal_for(config, group_dir(config) / PARENT_FILE)
        parent.append("status", status=status)
        parent.flush(config.tracking.flush_timeout_s)

    # ----------------------------------------------------------------------------------------- job process

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The job's child run, through its journal: no request waits here, so a tracking store that does not
        answer delays nothing (the journal sends when it does)."""
        export_distributed_env()
        if not config.tracking.enabled or not is_global_rank_zero():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        group = group_dir(config)
        overrides = list(config.hydra.overrides.task)
        swept = swept_values(overrides, swept_keys(group))
        point = {k: v for k, v in swept.items() if k not in config.report.seed_keys}
        tags = {TAG_JOB_DIR: str(job_dir), TAG_GROUP: join_values(point) or "all", **override_tags(overrides)}
        run_name = join_values(swept) or job_dir.name
        journal = journal_for(config, job_dir / CHILD_FILE)
        parent_id = read_run_id(group / PARENT_FILE)
        journal.open_run(normalise_uri(config.tracking.uri), config.tracking.experiment_name,
                         config.tracking.artifact_location, run_name, masked(tags), parent_run_id=parent_id)
        task_cfg = OmegaConf.to_container(config, resolve=True, enum_to_str=True)
        task_cfg.pop("hydra", None)
        for section in task_cfg["downstream"].values():  # a key left None keeps its preset's value: see plan.*
            for key in [k for k, v in (section or {}).items() if v is None]:
                del section[key]
        job_plan = plan.plan_job(config, job_dir, int(os.environ.get("WORLD_SIZE", 1)))
        journal.append("params", params=masked({**as_params(task_cfg), **swept, **plan.params(job_plan)}))
        saved = job_dir / ".hydra" / "config.yaml"
        if saved.exists():
            journal.append("artifact", path=str(saved), artifact_path="config")
        journal.start()
        log.info("mlflow: run %s of this job, logged through %s", run_name, journal.path)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not config.tracking.enabled or not is_global_rank_zero():
            return
        journal = journal_for(config, Path(config.hydra.runtime.output_dir) / CHILD_FILE)
        if job_return.status != JobStatus.COMPLETED:
            journal.append("tags", tags={"densecl.error": repr(job_return._return_value)[:5000]})
        journal.append("status", status="FINISHED" if job_return.status == JobStatus.COMPLETED else "FAILED")
        journal.flush(config.tracking.flush_timeout_s)
