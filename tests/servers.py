"""The real servers some tests need: an mlflow tracking server (PostgreSQL behind it, the cluster `.ci/run`
starts; basic auth in front; artifacts served by it; stopped and started again to make an outage), and the
SLURM controller `.ci/slurm_up.sh` starts."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import skip_or_fail_in_ci

# .ci/run starts PostgreSQL with this user and database; DENSECL_TEST_POSTGRES_URI points elsewhere
POSTGRES_URI = os.environ.get("DENSECL_TEST_POSTGRES_URI", "postgresql://densecl:densecl@127.0.0.1:5432/mlflow")
ADMIN = "admin"


def postgres_or_skip() -> str:
    """The PostgreSQL database for the server's store; skip (fail under CI=true) when none answers."""
    try:
        import psycopg
    except ImportError:
        skip_or_fail_in_ci("psycopg is missing (pip install -e '.[dev]')")
    try:
        psycopg.connect(POSTGRES_URI, connect_timeout=5).close()
    except psycopg.OperationalError as err:
        skip_or_fail_in_ci(f"no PostgreSQL at {POSTGRES_URI} ({str(err).strip()[:200]}); .ci/run starts one")
    return POSTGRES_URI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_stored_once(tracker, job_dir: Path, context: str = "") -> dict[str, list[tuple[int, int, float]]]:
    """Every metric point the job's journal holds is in the store exactly once, with its step, time and value;
    returns those points by metric name. `context`: shown when something was left unsent."""
    from pipelines.journal import Journal
    from pipelines.tracking import CHILD_FILE

    journal = Journal(job_dir / CHILD_FILE, lambda: tracker)
    assert journal.pending() == [], f"{job_dir.name}: entries left unsent\n{context}"
    points: dict[str, list[tuple[int, int, float]]] = {}
    for entry in journal.entries():
        if entry["op"] == "metrics":
            for step, values in entry["points"]:
                for name, value in values.items():
                    points.setdefault(name, []).append((step, entry["time_ms"], value))
    for name, expected in points.items():
        history = tracker.client.get_metric_history(journal.run_id(), name)
        assert sorted((p.step, p.timestamp, p.value) for p in history) == sorted(expected), name
    return points


class MlflowServer:
    """`mlflow server --app-name basic-auth` on PostgreSQL, serving artifacts from `folder`."""

    def __init__(self, folder: Path, backend: str):
        self.folder, self.backend = folder, backend
        self.port = free_port()
        self.password = f"pw-{secrets.token_hex(8)}"  # unique: a test greps what runs wrote for it
        self.process: subprocess.Popen | None = None
        (folder / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = EDIT\n"
            f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri_with(self, password: str) -> str:
        return f"http://{ADMIN}:{password}@127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> MlflowServer:
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(self.folder / "auth.ini"),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "densecl-tests"}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 (the server's own lifetime)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
             self.backend, "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2"],
            env=env, stdout=log, stderr=log, start_new_session=True,  # its workers in its own process group
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s} s")

    def stop(self) -> None:
        """Down at once, as a crashed server or a lost network is: the whole process group killed (a graceful
        stop waits seconds for the clients' open connections, and leaves the server's job consumers behind)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def client_environment(self) -> dict[str, str]:
        """What a process needs to talk to the server (mlflow's client reads these)."""
        return {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": self.password}


# ------------------------------------------------------------------------------------------------ SLURM
# The tiny pre-training job: a few seconds of CPU per job. One thread per SLURM task (cpus_per_task=1):
# several torch processes spinning two threads each on two cores slow each other down by an order of magnitude.
SLURM_TINY = [
    "stages=[pretrain]",
    "device=cpu",
    "backbone=resnet18",
    "pretrain.crop_size=32",
    "pretrain.batch_size=4",
    "pretrain.queue_len=64",
    "pretrain.num_workers=0",
    "pretrain.deterministic=true",
    "pretrain.figure.enabled=false",
    "data.num_images=16",
    "data.image_size=64",
    "tracking.log_backbone=false",
    "hydra/launcher=submitit_slurm",
    # > 10 min: submitit counts any signal in a job of 10 min or less as a time-out (its guaranteed time is 0)
    "hydra.launcher.timeout_min=30",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.setup=['export OMP_NUM_THREADS=1']",
]

SLURM_TOOLS = ("sinfo", "scontrol", "sbatch", "squeue", "scancel")
USABLE_NODE_STATES = ("idle", "mix", "alloc", "comp")


def slurm_unavailable_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None when a controller answers and a node is usable."""
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"no SLURM client ({', '.join(missing)} not on PATH); CI starts a cluster with .ci/slurm_up.sh"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired as err:
        return f"SLURM does not answer: {' '.join(err.cmd)} timed out"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"no SLURM controller answers `scontrol ping`: {(ping.stdout + ping.stderr).strip()!r}"
    states = [line.split()[-1] for line in nodes.stdout.splitlines() if line.strip()]
    if not any(state in USABLE_NODE_STATES for state in states):
        return f"no usable SLURM node (sinfo node states: {states or 'none'})"
    return None
