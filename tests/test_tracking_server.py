"""Jobs tracked through a real mlflow server on PostgreSQL with basic auth: a server down until the jobs have
ended costs them nothing and `python -m pipelines.sync` sends what waited, each point once; a password given in
the URI and a token in the environment reach nothing a run writes; a wrong password stops the launch before any
job. (The SLURM sweep through the same kind of server, stopped for a minute while it runs: tests/test_slurm.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.journal import Journal
from pipelines.tracking import CHILD_FILE, PARENT_FILE, Tracker
from tests.servers import assert_stored_once

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-7f3c2a91e0"  # an MLFLOW_TRACKING_TOKEN the run must not write anywhere
PRETRAIN = [  # a tiny pre-training whose curve spans several hand-overs
    "stages=[pretrain]", "pretrain.iters=8", "pretrain.batch_size=4", "pretrain.queue_len=16",
    "pretrain.crop_size=64", "pretrain.log_every=1", "pretrain.ckpt_every=100", "pretrain.eval_every=0",
    "pretrain.corr_eval_crop=null", "data.num_images=32", "pretrain.figure.enabled=false", "tracking=server",
]  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tracking_server")]


@pytest.fixture
def server(tracking_server):
    return tracking_server


def launch(out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        environ.pop(name, None)
    environ.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "pipelines.run", *PRETRAIN, *args, f"paths.output_dir={out}"],
                            cwd=out, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pattern: str, folder: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(folder.glob(pattern)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{folder / pattern} never appeared"
        time.sleep(0.2)


def stored_once(tracker: Tracker, job_dir: Path) -> None:
    """Every metric point the job's journal holds is in the store exactly once, the loss at each of the 8 steps."""
    assert len(assert_stored_once(tracker, job_dir)["pretrain/loss"]) == 8


def test_jobs_tracked_while_the_server_is_down_are_sent_by_sync_once(server, tmp_path, monkeypatch):
    """The server stops once the sweep's job has started and comes back after the sweep has ended: the job
    finishes, says once that tracking is behind, and `pipelines.sync` sends its run, then the parent's report."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    process = launch(tmp_path, "-m", "seed=1", "name=outage", f"tracking.uri={server.uri}",
                     "tracking.flush_timeout_s=2", env=server.client_environment())
    sweep = tmp_path / "multirun" / "outage"
    wait_for("*/mlflow_run.journal.jsonl", sweep, process)  # the launch has opened the parent run: a job started
    server.stop()
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        server.start()
    assert process.returncode == 0, stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/mlflow_run.journal.jsonl"))
    assert len(jobs) == 1
    said = [line.split(" waits in ")[1].split()[0] for line in (stdout + stderr).splitlines()
            if "mlflow does not answer" in line]
    assert sorted(path for path in said if path.endswith("mlflow_run.journal.jsonl")) == [
        str(job / "mlflow_run.journal.jsonl") for job in jobs]  # once per job, naming its journal
    # the job ended with what it logged since the outage waiting in its journal, its final status last (whether
    # its run was created before the server stopped is a race: the job's sender starts with the job)
    waiting = Journal(jobs[0] / CHILD_FILE, lambda: None).pending()
    assert waiting and (waiting[-1]["op"], waiting[-1].get("status")) == ("status", "FINISHED")

    done = subprocess.run([sys.executable, "-m", "pipelines.sync", str(sweep)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all sent" in done.stdout
    tracker = Tracker(server.uri)
    names = []
    for job in jobs:
        stored_once(tracker, job)
        run = tracker.client.get_run(json.loads((job / CHILD_FILE).read_text())["run_id"])
        assert run.info.status == "FINISHED"
        names.append(run.info.run_name)
    assert names == [jobs[0].name]  # no swept key: the run is named after its folder
    parent = tracker.client.get_run(json.loads((sweep / PARENT_FILE).read_text())["run_id"])
    assert parent.info.status == "FINISHED"
    report = [a.path for a in tracker.client.list_artifacts(parent.info.run_id, "report")]
    assert "report/table.md" in report
    sent_again = subprocess.run([sys.executable, "-m", "pipelines.sync", str(sweep)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert "sent 0 entries; all sent" in sent_again.stdout
    for job in jobs:
        stored_once(tracker, job)


def test_a_password_in_the_uri_and_a_token_reach_nothing_a_run_writes(server, tmp_path):
    process = launch(tmp_path, "name=secrets", f"tracking.uri={server.uri_with(server.password)}",
                     env={"MLFLOW_TRACKING_TOKEN": TOKEN})
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file()] + [p for p in server.folder.rglob("artifacts/**/*")
                                                                  if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.name.endswith(".journal.jsonl") for p in written)
    for secret in (server.password, TOKEN):
        assert secret not in stdout + stderr
        assert [p for p in written if secret.encode() in p.read_bytes()] == []
    os.environ.update(server.client_environment())
    try:
        tracker = Tracker(server.uri)
        experiment = tracker.experiment_id("secrets")
        for run in tracker.client.search_runs([experiment]):
            record = json.dumps({**run.data.params, **run.data.tags})
            assert server.password not in record and TOKEN not in record
            assert run.info.status == "FINISHED"
    finally:
        for name in server.client_environment():
            os.environ.pop(name)


def test_a_wrong_password_stops_the_launch_before_any_job(server, tmp_path):
    process = launch(tmp_path, "name=refused", f"tracking.uri={server.uri_with('not-the-password')}")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"mlflow at {server.uri} refused the credentials (HTTP 401)" in stderr
    assert "No job was launched" in stderr and "not-the-password" not in stdout + stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()
