"""The SLURM path for real: `python -m pipelines.run hydra/launcher=submitit_slurm` against a running cluster.

No mocks: these tests submit tiny pre-training jobs to the SLURM controller on this machine (CI starts one
with `.ci/slurm_up.sh`) and check what the jobs left behind: metrics in mlflow, both DDP ranks in the
checkpoint, a requeue after preemption that resumes and ends with the weights of an uninterrupted run.

Without a SLURM controller they skip, except under CI=true, where a missing cluster is a failure (CI must not
pass by skipping them). Every wait has a timeout; leftover jobs are cancelled by their unique job name.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.conftest import skip_or_fail_in_ci
from tests.servers import SLURM_TINY as TINY
from tests.servers import slurm_unavailable_reason

RUN_TIMEOUT_S = 300  # one pipeline invocation (submission + jobs + requeue); normally 30-90 s



# ------------------------------------------------------------------------------------------------ cluster


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = slurm_unavailable_reason()
    if reason is not None:
        skip_or_fail_in_ci(f"the SLURM tests cannot run: {reason}")


@pytest.fixture
def job_name(slurm):
    """A unique SLURM job name for this test's jobs; whatever is left of them is cancelled afterwards."""
    name = f"densecl-test-{uuid.uuid4().hex[:10]}"
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, timeout=30)


def job_id_of(sweep_dir: Path) -> str:
    """The SLURM id of a one-job sweep (12, or 12_0 for an array task), from submitit's folder for it."""
    ids = [p.parent.name for p in (sweep_dir / ".submitit").glob("*/*_submitted.pkl")]
    assert len(ids) == 1, f"expected one submitted job in {sweep_dir / '.submitit'}, found {ids}"
    return ids[0]


def restarts(job_id: str) -> int | None:
    """SLURM's restart count of a job (None once the controller has forgotten it)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    match = re.search(r"\bRestarts=(\d+)", out.stdout)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------------ pipeline


def pipeline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_pipeline(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`python -m pipelines.run ARGS` in its own process group (so a timeout can kill it all)."""
    handle = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.run", *args],
        cwd=cwd,
        env=pipeline_env(),
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    """Wait for the submitting process; fail with its log when it times out or exits non-zero."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        pytest.fail(f"pipeline did not finish in {timeout:.0f} s; log tail:\n{tail(log)}")
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"pipeline exited with {proc.returncode}; log tail:\n{tail(log)}"
    return text


def run_pipeline(args: list[str], cwd: Path, log: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    return finish(start_pipeline(args, cwd, log), log, timeout)


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return "(no log)"
    kept = [line for line in path.read_text(errors="replace").splitlines() if "sacct" not in line]
    return "\n".join(kept[-lines:])


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders (each holds the job's .hydra/ config)."""
    return sorted(p.parent for p in sweep_dir.glob("*/.hydra"))


def submitit_logs(sweep_dir: Path, pattern: str = "*_log.out") -> list[Path]:
    return sorted((sweep_dir / ".submitit").glob(f"*/{pattern}"))


def all_job_logs(sweep_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{tail(p, 30)}" for p in submitit_logs(sweep_dir, "*_log.*"))


def mlflow_client(output_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")


def child_runs(output_dir: Path, experiment: str, sweep_dir: Path) -> list:
    """The sweep's child runs in mlflow, found through the parent run id the sweep recorded."""
    client = mlflow_client(output_dir)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no mlflow experiment {experiment!r} in {output_dir / 'mlflow.db'}"
    parent_id = json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"]
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return runs


def load_state_dict(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------- config (no SLURM)


def test_slurm_launcher_config_exposes_cluster_keys_and_requeues():
    """`hydra/launcher=submitit_slurm` composes with the cluster keys and a retry budget (max_num_timeout > 0)."""
    from pipelines import schema

    cfg = schema.compose(["hydra/launcher=submitit_slurm"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    for key in (
        "partition",
        "account",
        "qos",
        "nodes",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "mem_gb",
        "timeout_min",
        "setup",
        "signal_delay_s",
    ):
        assert key in launcher, f"hydra.launcher.{key} missing"
    assert launcher.max_num_timeout > 0
    assert launcher.signal_delay_s < launcher.timeout_min * 60


# ------------------------------------------------------------------------------------------------- SLURM


@pytest.mark.slurm
def test_a_sweep_on_slurm_logs_through_a_tracking_server_that_stops_for_a_minute(server_sweep):
    """(a) A two-job sweep goes through SLURM, tracked by an mlflow server on PostgreSQL that stops for a minute
    while the jobs run: each job finishes and its run holds every point its journal holds, exactly once; the
    parent holds the sweep's report, made from its children; the password given in tracking.uri is nowhere."""
    from pipelines.tracking import CHILD_FILE, Tracker
    from tests.servers import assert_stored_once

    sweep, server = server_sweep, server_sweep.server
    assert server_sweep.outage_s >= 60
    results = submitit_logs(sweep.sweep_dir, "*_result.pkl")
    assert len(results) == 2, f"expected 2 SLURM job results, found {results}"
    jobs = job_dirs(sweep.sweep_dir)
    assert len(jobs) == 2
    job_logs = all_job_logs(sweep.sweep_dir)
    os.environ.update(server.client_environment())
    try:
        tracker = Tracker(server.uri)
        losses = {}
        for job in jobs:
            points = assert_stored_once(tracker, job, context=job_logs)
            assert len(points["pretrain/loss"]) == sweep.iterations  # every step (the final value is the last)
            run = tracker.client.get_run(json.loads((job / CHILD_FILE).read_text())["run_id"])
            assert run.info.status == "FINISHED" and Path(run.data.tags["densecl.job_dir"]).parent == sweep.sweep_dir
            losses[run.data.params["model.loss_lambda"]] = run.data.metrics["pretrain/loss"]
        assert sorted(losses) == sorted(sweep.lambdas) and len(set(losses.values())) == 2
        # the jobs said once that tracking was behind, and once that it caught up (their SLURM logs)
        assert job_logs.count("mlflow does not answer") == 2 and job_logs.count("mlflow caught up") == 2, job_logs
        parent = tracker.client.get_run(json.loads((sweep.sweep_dir / "mlflow_parent.json").read_text())["run_id"])
        assert parent.info.status == "FINISHED"
        table = Path(tracker.client.download_artifacts(parent.info.run_id, "report/table.csv"))
        rows = {row["model.loss_lambda"]: row for row in csv.DictReader(table.read_text().splitlines())}
        assert sorted(rows) == sorted(losses)  # a row per loss weight, from the children the store holds
        for value, row in rows.items():
            assert row["n"] == "1" and float(row["pretrain/loss mean"]) == pytest.approx(losses[value])
    finally:
        for name in server.client_environment():
            os.environ.pop(name)
    written = [p for p in sweep.out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in written)  # submitit's pickles too
    assert [p for p in written if server.password.encode() in p.read_bytes()] == []
    assert server.password not in sweep.console


@pytest.mark.slurm
def test_pretraining_with_two_tasks_per_node_runs_ddp(job_name, tmp_path):
    """(b) tasks_per_node=2: two SLURM tasks become ranks 0 and 1 of one gloo process group."""
    out = tmp_path / "out"
    iters = 4
    args = [
        "-m",
        *TINY,
        f"hydra.launcher.name={job_name}",
        f"paths.output_dir={out}",
        "name=ddp",
        "hydra.launcher.tasks_per_node=2",
        f"pretrain.iters={iters}",
        "pretrain.log_every=2",
        "pretrain.ckpt_every=2",
    ]
    log = tmp_path / "ddp.log"
    run_pipeline(args, tmp_path, log)

    sweep_dir = out / "multirun" / "ddp"
    (job,) = job_dirs(sweep_dir)
    # one SLURM job, two tasks: submitit keeps one log per task
    task_logs = submitit_logs(sweep_dir, "*_log.out")
    assert len(task_logs) == 2, f"expected logs of tasks 0 and 1, found {task_logs}"

    ckpt = load_state_dict(job / "pretrain" / "checkpoint.pt")
    assert ckpt["step"] == iters
    # the engine gathers every rank's RNG state into the checkpoint: two entries = two ranks in one group
    assert len(ckpt["rng"]) == 2, "checkpoint holds the RNG state of 1 rank: the tasks did not form one group"
    # the learning rate is scaled with the global batch, i.e. with the world size the engine saw
    group = ckpt["optimizer"]["param_groups"][0]
    base_lr, batch = ckpt["config"]["pretrain"]["base_lr"], ckpt["config"]["pretrain"]["batch_size"]
    assert group["initial_lr"] == pytest.approx(base_lr * batch * 2 / 256)
    assert (job / "pretrain" / "backbone.pth").is_file()

    runs = child_runs(out, "ddp", sweep_dir)
    assert len(runs) == 1, "only global rank 0 may open a child run"
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["pretrain/iterations"] == iters


@pytest.mark.slurm
def test_preempted_pretraining_requeues_resumes_and_matches_uninterrupted(job_name, tmp_path):
    """(c) Preempt a running job: it checkpoints, SLURM requeues it, it resumes from the checkpoint and ends
    with exactly the weights of the same job run without interruption (run alongside, on the same cluster)."""
    iters, log_every = 32, 4
    common = [
        "-m",
        *TINY,
        f"hydra.launcher.name={job_name}",
        "name=preempt",
        f"pretrain.iters={iters}",
        f"pretrain.log_every={log_every}",
        "pretrain.ckpt_every=4",
    ]
    out, ref_out = tmp_path / "out", tmp_path / "reference"
    log, ref_log = tmp_path / "preempted.log", tmp_path / "reference.log"
    ref = start_pipeline([*common, f"paths.output_dir={ref_out}"], tmp_path, ref_log)
    proc = start_pipeline([*common, f"paths.output_dir={out}"], tmp_path, log)
    sweep_dir = out / "multirun" / "preempt"

    try:
        # wait until the job trains: its first periodic checkpoint exists
        deadline = time.monotonic() + RUN_TIMEOUT_S
        ckpt = None
        while ckpt is None:
            found = list(sweep_dir.glob("*/pretrain/checkpoint.pt"))
            if found:
                ckpt = found[0]
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"no checkpoint appeared before the job ended or timed out\n{tail(log)}\n{all_job_logs(sweep_dir)}"
                )
            time.sleep(0.2)
        # what SLURM/submitit do on preemption (submitit's Job._interrupt): SIGTERM, then the USR2 signal
        job_id = job_id_of(sweep_dir)
        subprocess.run(["scancel", job_id, "--signal", "SIGTERM"], check=True, timeout=30)
        subprocess.run(["scancel", job_id, "--signal", "USR2"], check=True, timeout=30)
        step_seen = load_state_dict(ckpt)["step"]
        assert step_seen < iters, "the job had finished before it was preempted: make it longer"

        finish(proc, log)
        finish(ref, ref_log)
    finally:
        for p in (proc, ref):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    job_log = "\n".join(p.read_text(errors="replace") for p in submitit_logs(sweep_dir, "*_log.*"))
    # checkpointed on the signal, then requeued by submitit
    assert "received SIGUSR2: checkpointing" in job_log, all_job_logs(sweep_dir)
    assert "this job is preempted" in job_log, all_job_logs(sweep_dir)
    assert "Requeued job" in job_log, all_job_logs(sweep_dir)
    count = restarts(job_id)
    assert count is None or count >= 1, f"SLURM reports Restarts={count} for {job_id}"

    (job,) = job_dirs(sweep_dir)
    final = load_state_dict(job / "pretrain" / "checkpoint.pt")
    assert final["step"] == iters

    # resumed, not restarted: every logged step of the curve appears exactly once across both attempts
    runs = child_runs(out, "preempt", sweep_dir)
    assert len(runs) == 1, "the requeued job must reuse its child run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = mlflow_client(out).get_metric_history(run.info.run_id, "pretrain/loss")
    steps = sorted(m.step for m in history if m.step < iters)
    assert steps == list(range(log_every, iters, log_every)), (
        f"loss curve steps {steps}: a step logged twice means the requeued job started over"
    )

    # and ends exactly where the uninterrupted run ends
    (ref_job,) = job_dirs(ref_out / "multirun" / "preempt")
    ours = load_state_dict(job / "pretrain" / "backbone.pth")["state_dict"]
    theirs = load_state_dict(ref_job / "pretrain" / "backbone.pth")["state_dict"]
    assert ours.keys() == theirs.keys()
    differing = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differing, f"weights differ from the uninterrupted run in {len(differing)} tensors: {differing[:5]}"
