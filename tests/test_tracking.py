"""pipelines.tracking: runs reused through id files, immutable params, locked-store retries, MLFLOW_RUN_ID."""

from __future__ import annotations

import json
import os

import pytest

from pipelines import tracking
from pipelines.journal import Journal
from pipelines.tracking import RunLogger, Tracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    tracker = Tracker(f"sqlite:///{root}/mlflow.db", retries=3, retry_wait_s=0.01)
    experiment = tracker.experiment_id("tests", str(root / "artifacts"))
    return tracker, experiment, root


def test_a_config_becomes_dotted_string_params():
    flat = tracking.as_params(
        {"model": {"name": "densecl", "S": None}, "stages": ["a", "b"], "lr": 0.5, "e": {}}
    )
    assert flat == {
        "model.name": "densecl",
        "model.S": "None",
        "stages": '["a", "b"]',
        "lr": "0.5",
        "e": "{}",
    }
    assert len(tracking.as_params({"x": "y" * 10000})["x"]) == tracking.MAX_PARAM_VALUE


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = tracking.normalise_uri("sqlite:///out/mlflow.db")
    assert uri == f"sqlite:///{tmp_path}/out/mlflow.db" and (tmp_path / "out").is_dir()
    assert tracking.normalise_uri("http://host:5000") == "http://host:5000"
    assert tracking.artifact_uri("art") == (tmp_path / "art").as_uri()


def test_locked_store_is_retried_then_given_up(store):
    tracker = store[0]
    calls = []

    def flaky(fail_times):
        calls.append(1)
        if len(calls) <= fail_times:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracker.call(flaky, 2) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(RuntimeError, match="locked"):
        tracker.call(flaky, 10)
    assert len(calls) == tracker.retries
    calls.clear()

    def broken():
        calls.append(1)
        raise ValueError("bad value")

    with pytest.raises(ValueError):  # other errors are not retried
        tracker.call(broken)
    assert len(calls) == 1


def test_open_run_reuses_the_id_file_and_recreates_deleted_runs(store, tmp_path):
    tracker, experiment, _ = store
    id_file = tmp_path / "job" / "mlflow_run.json"
    parent, created = tracker.open_run(tmp_path / "mlflow_parent.json", experiment, "sweep")
    assert created
    run_id, created = tracker.open_run(id_file, experiment, "job", tags={"a": "1"}, parent_run_id=parent)
    assert created and json.loads(id_file.read_text())["run_id"] == run_id
    again, created = tracker.open_run(id_file, experiment, "job", tags={"a": "1"}, parent_run_id=parent)
    assert (again, created) == (run_id, False)
    assert tracker.client.get_run(run_id).data.tags[tracking.PARENT_TAG] == parent
    children = tracker.client.search_runs([experiment], f"tags.`{tracking.PARENT_TAG}` = '{parent}'")
    assert [r.info.run_id for r in children] == [run_id]
    tracker.client.delete_run(run_id)
    fresh, created = tracker.open_run(id_file, experiment, "job", parent_run_id=parent)
    assert created and fresh != run_id


def test_params_are_logged_once_and_changes_reported(store, tmp_path):
    tracker, experiment, _ = store
    run_id, _ = tracker.open_run(tmp_path / "id.json", experiment, "params")
    params = {f"k{i}": str(i) for i in range(250)}  # more than one batch
    assert tracker.log_params(run_id, params) == []
    assert tracker.log_params(run_id, {**params, "k3": "3.0", "new": "x"}) == ["k3"]
    logged = tracker.client.get_run(run_id).data.params
    assert len(logged) == 251 and logged["k3"] == "3" and logged["new"] == "x"


def test_stray_mlflow_run_id_is_ignored(store, tmp_path, monkeypatch):
    tracker, experiment, _ = store
    other, _ = tracker.open_run(tmp_path / "other.json", experiment, "unrelated")
    monkeypatch.setenv("MLFLOW_RUN_ID", other)
    fresh = Tracker(tracker.uri)
    assert "MLFLOW_RUN_ID" not in os.environ
    parent, _ = fresh.open_run(tmp_path / "p.json", experiment, "parent")
    child, _ = fresh.open_run(tmp_path / "c.json", experiment, "child", parent_run_id=parent)
    assert len({other, parent, child}) == 3
    assert fresh.client.get_run(child).data.tags[tracking.PARENT_TAG] == parent


def logger_for(tracker, experiment, folder) -> RunLogger:
    """A RunLogger on a run opened in `folder` (its journal sends synchronously when flushed)."""
    tracker.open_run(folder / "mlflow_run.json", experiment, "logger")
    return RunLogger(Journal(folder / "mlflow_run.json", lambda: tracker))


def test_metric_points_are_batched_and_non_finite_dropped(store, tmp_path):
    tracker, experiment, _ = store
    logger = logger_for(tracker, experiment, tmp_path)
    buffer = logger.curve("pretrain/")
    buffer.interval_s = 3600
    for step in (10, 20, 30):
        buffer(step, {"loss": 1.0 / step, "corr_acc": float("nan")})
    assert logger.journal.entries() == []  # nothing handed over before the buffer's flush
    buffer.flush()
    assert len(logger.journal.entries()) == 1 and logger.flush(5)
    run_id = logger.journal.run_id()
    history = tracker.client.get_metric_history(run_id, "pretrain/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05), (30, 1.0 / 30)]
    assert "pretrain/corr_acc" not in tracker.logged_metric_keys(run_id)


def test_run_logger_final_metrics_and_artifacts(store, tmp_path):
    tracker, experiment, root = store
    logger = logger_for(tracker, experiment, tmp_path)
    logger.final_metrics("det_voc", {"AP": 40.0, "AP50": 70.0, "note": "text"})
    logger.final_metrics("det_voc", {"AP": 99.0, "AP75": 45.0}, only_missing=True)
    (tmp_path / "metrics.json").write_text("{}")
    logger.artifact(tmp_path / "metrics.json", "det_voc")
    assert logger.flush(5)
    run_id = logger.journal.run_id()
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics == {"det_voc/AP": 40.0, "det_voc/AP50": 70.0, "det_voc/AP75": 45.0}
    assert [a.path for a in tracker.client.list_artifacts(run_id, "det_voc")] == ["det_voc/metrics.json"]
    assert str(root / "artifacts") in tracker.client.get_run(run_id).info.artifact_uri
    silent = RunLogger()
    assert not silent.active
    silent.final_metrics("x", {"a": 1.0})
    silent.curve("p/")(1, {"a": 1.0})
