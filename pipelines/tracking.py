"""mlflow bookkeeping for the pipeline: one experiment per Hydra experiment, a parent run per sweep (or per
single-run group) and a child run per job, each reused when its folder already names it.

Only the explicit `MlflowClient` API is used: no fluent "active run" state that a second job in the same
process, or a stray environment variable, could redirect. `MLFLOW_RUN_ID` in particular is removed from the
environment before any run is opened: mlflow's fluent `start_run` resumes the run it names and prefers it to
`parent_run_id`, so a value leaked from an outer script would pull every job (and the sweep's parent) into
that one run. Callers decide who tracks (global rank 0, see pipelines.callbacks).

SQLite stores serialise writers; with many jobs on one store (or on NFS) a write can fail with
"database is locked": every call is retried with exponential back-off. Clusters should use a tracking server
(`tracking=server tracking.uri=http://HOST:5000`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from densecl.files import write_json
from densecl.typed_settings import flatten
from pipelines.journal import Journal

log = logging.getLogger(__name__)

T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"
PARENT_FILE = "mlflow_parent.json"  # in a sweep's (or a run group's) folder: its parent run
CHILD_FILE = "mlflow_run.json"  # in a job's folder: its child run
TAG_KIND = "densecl.kind"  # a parent's kind: sweep or run
TAG_SWEPT = "densecl.swept_keys"
PROTOCOL_TAG = "densecl.protocol."  # + stage: paper, deviates, or the preset that is its own protocol
PROTOCOL_PARAM = "protocol_deviations."  # + stage: the deviations, key=value (protocol's)
DATASET_TAG = "densecl.dataset."  # + stage: the user's own labelled set the stage ran on, and its classes
TAG_SWEPT_VALUES = "densecl.swept_values"
TAG_GROUP_DIR = "densecl.group_dir"
TAG_JOB_DIR = "densecl.job_dir"
TAG_EXPERIMENT = "densecl.experiment"
TAG_GROUP = "group"  # a child's swept keys but the seeds: the UI's Group-by gives mean and spread over seeds
OVERRIDE_TAG = "override."  # + key: a child's overrides as written
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"  # mlflow 3's UI: open on the runs table, not on traces
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a runs-table view the UI loads from ?viewStateShareKey=key
RUNS_VIEW = "densecl"
MAX_PARAM_VALUE = 6000  # mlflow's limit on a param value's length
PARAMS_PER_BATCH = 100  # mlflow's limit per log_batch call
METRICS_PER_BATCH = 1000
LOCKED_MESSAGES = ("database is locked", "database table is locked")


def forget_mlflow_run_env() -> str | None:
    """Remove MLFLOW_RUN_ID from the environment (see the module doc); returns the value it had."""
    value = os.environ.pop("MLFLOW_RUN_ID", None)
    if value:
        log.warning("ignoring MLFLOW_RUN_ID=%s: the pipeline opens its own parent and child runs", value)
    return value


def normalise_uri(uri: str) -> str:
    """Absolute path for `sqlite:///relative.db` (jobs may start elsewhere) and its folder created."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).absolute()
        uri = prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_uri(location: str | None) -> str | None:
    """A local folder as a file:// URI (absolute), anything with a scheme unchanged."""
    if not location or "://" in location:
        return location
    return Path(location).absolute().as_uri()


def is_locked_error(err: BaseException) -> bool:
    text = str(err).lower()
    return any(message in text for message in LOCKED_MESSAGES)


def as_params(tree: Mapping[str, Any]) -> dict[str, str]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": "1", "c": "[1, 2]"}: a config as mlflow params, lists and
    mappings as JSON, the rest as str, each cut to mlflow's limit."""
    return {key: _param_text(value) for key, value in flatten(tree).items()}


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def read_run_id(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["run_id"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def write_run_id(path: Path, run_id: str, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"run_id": run_id, **extra})


class Tracker:
    """An mlflow store with retries; every method takes explicit run ids."""

    def __init__(self, uri: str, retries: int = 8, retry_wait_s: float = 0.5):
        from mlflow.tracking import MlflowClient  # lazy: mlflow takes seconds to import

        forget_mlflow_run_env()
        self.uri = normalise_uri(uri)
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.client = self.call(MlflowClient, tracking_uri=self.uri)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs), retried with exponential back-off while the store reports it is locked."""
        wait = self.retry_wait_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if attempt == self.retries or not is_locked_error(err):
                    raise
                log.warning(
                    "mlflow store locked (attempt %d/%d), retrying in %.1fs", attempt, self.retries, wait
                )
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------- experiments

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        """The experiment's id, created if needed (a concurrent creation is tolerated), marked as model
        development: mlflow 3's UI then opens it on its runs table, not on its GenAI overview."""
        from mlflow.exceptions import MlflowException

        experiment = self.call(self.client.get_experiment_by_name, name)
        if experiment is None:
            try:
                experiment_id = self.call(
                    self.client.create_experiment, name, artifact_location=artifact_uri(artifact_location),
                    tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT},
                )  # fmt: skip
                return experiment_id
            except MlflowException:
                experiment = self.call(self.client.get_experiment_by_name, name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.call(self.client.restore_experiment, experiment.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
            self.call(self.client.set_experiment_tag, experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return experiment.experiment_id

    # -------------------------------------------------------------------------------------------- runs

    def run_exists(self, run_id: str, experiment_id: str | None = None) -> bool:
        """Whether the run is there (not deleted, in the experiment); a store that does not answer raises."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.call(self.client.get_run, run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        if run.info.lifecycle_stage == "deleted":
            return False
        return experiment_id is None or run.info.experiment_id == experiment_id

    def open_run(
        self,
        id_file: Path,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        run_key: str | None = None,
    ) -> tuple[str, bool]:
        """Reuse the run `id_file` names (if it still exists in this experiment), else the run created with
        `run_key` (an earlier attempt whose answer was lost), else create one; record its id in `id_file`.
        Returns (run_id, created). A reused run is marked RUNNING again."""
        from pipelines.journal import RUN_KEY_TAG

        run_id = read_run_id(id_file)
        if not (run_id and self.run_exists(run_id, experiment_id)) and run_key:
            found = self.call(self.client.search_runs, [experiment_id],
                              filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
            run_id = found[0].info.run_id if found else None
            if run_id:
                write_run_id(id_file, run_id, experiment_id=experiment_id, tracking_uri=self.uri)
        if run_id and self.run_exists(run_id, experiment_id):
            self.call(self.client.update_run, run_id, status="RUNNING")
            if tags:
                self.set_tags(run_id, tags)
            return run_id, False
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        if run_key:
            all_tags[RUN_KEY_TAG] = run_key
        run = self.call(self.client.create_run, experiment_id, run_name=run_name, tags=all_tags)
        write_run_id(id_file, run.info.run_id, experiment_id=experiment_id, tracking_uri=self.uri)
        return run.info.run_id, True

    def finish(self, run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.call(self.client.set_terminated, run_id, status=status, end_time=end_time)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.call(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, run_id: str, params: Mapping[str, str]) -> list[str]:
        """Log the params the run does not have yet. Params are immutable in mlflow: a key it already holds
        with another value is left as it is and returned (the caller decides whether that matters)."""
        from mlflow.entities import Param

        existing = self.call(self.client.get_run, run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != str(v))
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), PARAMS_PER_BATCH):
            self.call(self.client.log_batch, run_id, params=new[start : start + PARAMS_PER_BATCH])
        return changed

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_points(run_id, [(step, metrics)])

    def log_metric_points(self, run_id: str, points: Iterable[tuple]) -> None:
        """Many (step, {name: value}[, timestamp ms]) points in as few transactions as mlflow allows. Non-finite
        values are dropped (NaN would poison the report's means)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), point[2] if len(point) > 2 else now, int(point[0]))
            for point in points
            for k, v in point[1].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for start in range(0, len(items), METRICS_PER_BATCH):
            self.call(self.client.log_batch, run_id, metrics=items[start : start + METRICS_PER_BATCH])

    def logged_metric_keys(self, run_id: str) -> set[str]:
        return set(self.call(self.client.get_run, run_id).data.metrics)

    def set_runs_view(self, experiment_id: str, columns: list[str], order_by: str) -> None:
        """The runs table the UI shows at `runs_url`: these columns (`params.`seed``, `metrics.`probe/mIoU``,
        ...), ordered by `order_by`, which also lists child runs flat instead of folded under their parent.
        Stored as an mlflow shared view (an experiment tag), so any browser opening the link gets it."""
        state = {"selectedColumns": columns, "orderByKey": order_by, "orderByAsc": True}
        self.call(self.client.set_experiment_tag, experiment_id, SHARED_VIEW_TAG + RUNS_VIEW, json.dumps(state))

    def runs_url(self, experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
        """The experiment's runs table in the UI, with the view `set_runs_view` stored, in the UI's model
        training mode (mlflow 3 opens an experiment on its GenAI overview otherwise)."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else host
        query = f"workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}"
        return f"{base}/#/experiments/{experiment_id}/runs?{query}"

    def ui_hint(self, experiment_id: str) -> str:
        """How to see an experiment's runs table: the command that serves a local store, and the link."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.runs_url(experiment_id)}"
        return f"mlflow ui --backend-store-uri {self.uri}  then open {self.runs_url(experiment_id)}"

    def log_image(self, run_id: str, path: str | os.PathLike, key: str, step: int = 0) -> None:
        """A PNG as an mlflow image under `key`: the UI shows it inline on the run's page and in its charts."""
        with Image.open(path) as image:
            self.call(self.client.log_image, run_id, image.convert("RGB"), key=key, step=step, synchronous=True)

    def has_image(self, run_id: str, key: str, step: int = 0) -> bool:
        """Whether the run holds an image logged under `key` at `step` (mlflow names its file after both)."""
        prefix = f"images/{key.replace('/', '~')}+step+{step}+"
        return any(a.path.startswith(prefix) for a in self.call(self.client.list_artifacts, run_id, "images"))

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.call(self.client.log_artifacts, run_id, str(path), artifact_path)
        elif path.exists():
            self.call(self.client.log_artifact, run_id, str(path), artifact_path)
        else:
            log.warning("not logging missing artifact %s", path)


class MetricBuffer:
    """Collects per-step metrics and hands them to the run's journal in batches (at most every `interval_s`), so
    that a pre-training curve costs a few entries and requests, not one per logged step."""

    def __init__(self, journal: Journal, prefix: str, interval_s: float = 10.0):
        self.journal, self.prefix, self.interval_s = journal, prefix, interval_s
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.last_flush = time.monotonic()
        self.last_points: dict[str, tuple[int, float]] = {}  # name -> (step, value) of its newest point

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        named = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        self.pending.append((step, named))
        self.last_points.update({k: (step, v) for k, v in named.items()})
        if time.monotonic() - self.last_flush >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        self.journal.metrics(pending)


def iter_final_metrics(stage: str, metrics: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    """A stage's final metrics under stable names: det_voc/AP50, det_coco/bbox/AP, seg_voc/mIoU, ..."""
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{stage}/{key}", float(value)


class RunLogger:
    """What a job's stages log to its child run, through the run's journal (pipelines.journal: kept in the job's
    folder first, sent in the background). Without a journal (tracking disabled, or not global rank 0) every
    method does nothing, so stage code never branches on tracking."""

    def __init__(self, journal: Journal | None = None):
        self.journal = journal
        self._curves: list[MetricBuffer] = []

    @property
    def active(self) -> bool:
        return self.journal is not None

    def curve(self, prefix: str) -> MetricBuffer | _NullCurve:
        if not self.active:
            return _NullCurve()
        self._curves.append(MetricBuffer(self.journal, prefix))
        return self._curves[-1]

    def final_metrics(self, stage: str, metrics: Mapping[str, Any], only_missing: bool = False) -> None:
        """Log a stage's final metrics as `<stage>/<name>` (at the last iteration for curves, skipping the
        values a curve already logged there), or only those the run's journal lacks (a rerun that skips a
        finished stage heals a run whose earlier attempt died before logging them)."""
        if not self.active:
            return
        step = int(metrics.get("iterations", 0))
        named = dict(iter_final_metrics(stage, metrics))
        curve_points = {k: p for curve in self._curves for k, p in curve.last_points.items()}
        named = {k: v for k, v in named.items() if curve_points.get(k) != (step, v)}
        if only_missing:
            have = self.journal.logged_metric_names()
            named = {k: v for k, v in named.items() if k not in have}
        self.journal.metrics([(step, named)])

    def tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            self.journal.append("tags", tags={k: str(v) for k, v in tags.items()})

    def params(self, params: Mapping[str, str]) -> None:
        if self.active:
            self.journal.append("params", params={k: str(v) for k, v in params.items()})

    def image(self, path: str | os.PathLike, key: str) -> None:
        if self.active and Path(path).is_file():
            self.journal.append("image", path=str(Path(path).absolute()), key=key, step=0)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self.journal.append("artifact", path=str(Path(path).absolute()), artifact_path=artifact_path)

    def status(self, status: str) -> None:
        """FINISHED, FAILED, KILLED (preempted, to be requeued), or RUNNING again."""
        if self.active:
            self.journal.append("status", status=status)

    def flush(self, timeout_s: float) -> bool:
        """Send what waits, for at most `timeout_s` (the curves' last points first); True when all was sent."""
        if not self.active:
            return True
        for curve in self._curves:
            curve.flush()
        return self.journal.flush(timeout_s)


class _NullCurve:
    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass
