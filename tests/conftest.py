"""Fixtures and rules shared by several test modules: the skip-or-fail rule for missing tools, one thread per
torch process when pytest-xdist runs tests side by side, and the tiny pipeline sweep that the pipeline tests
(tests/test_pipeline.py) and the browser tests of the mlflow UI (tests/test_mlflow_ui.py) both read."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HAVE_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
SWEEP_USERS = pytest.StashKey[int]()  # tests left to run that read the pipeline sweep
SWEEP_MADE = pytest.StashKey[tuple[Path, int]]()  # its folder, and how many tests had failed when it was made


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """A tool a test needs is missing: on a developer's machine the test skips; under CI=true, where .ci/run
    installs every tool, it fails, so that no test silently stops running there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config):
    """In a pytest-xdist worker (`-n`, pyproject's addopts), the cores are shared with the other workers: torch
    gets its share of them, and so do the processes the tests start (pipeline runs, DDP ranks, submitit jobs),
    through OMP_NUM_THREADS. Left at a thread per core, each process spins its OpenMP threads against the
    others' and tiny training steps become many times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def uses_sweep(item) -> bool:
    return "pipeline_sweep" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook
def pytest_collection_modifyitems(config, items):
    """Counts the tests that read the pipeline sweep (the last one to finish removes it), and groups tests for
    pytest-xdist's `--dist loadgroup` (pyproject's addopts): the tests of one `xdist_group` run in one worker,
    one after the other. Grouped here: the tests that read the sweep (one worker makes it, once) and the SLURM
    tests (jobs on the test cluster's one node would wait for each other's CPUs); test_ddp.py groups its own
    (one spawn of two ranks for the module).

    xdist tells the scheduler an item's group through its node id (`...::test@group`), which it rewrites in
    its own hook; from pytest 9.2 on, that rewrite no longer takes (pytest-xdist#1386), so it is done here
    when missing, through the structured id that pytest 9.2 keeps."""
    config.stash[SWEEP_USERS] = sum(map(uses_sweep, items))
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers only
        return
    for item in items:
        if uses_sweep(item):
            item.add_marker(pytest.mark.xdist_group("pipeline_sweep"))
        elif item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        marks = item.iter_markers("xdist_group")
        groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks}
        suffix = "@" + "_".join(sorted(groups))
        if not groups or item.nodeid.endswith(suffix):
            continue
        node_id = getattr(item, "_id", None)
        if node_id is not None and hasattr(type(node_id), "parse"):  # pytest >= 9.2: a NodeId
            item._id = type(node_id).parse(item.nodeid + suffix)
        else:
            item._nodeid = item.nodeid + suffix


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test that reads the sweep (its fixtures torn down), the sweep's ~1.8 GB goes, unless a
    test failed since it was made: the rest of the session does not carry it."""
    result = yield
    if uses_sweep(item):
        item.config.stash[SWEEP_USERS] -= 1
        made = item.config.stash.get(SWEEP_MADE, None)
        if item.config.stash[SWEEP_USERS] == 0 and made is not None:
            out, failed_before = made
            if item.session.testsfailed == failed_before:
                shutil.rmtree(out, ignore_errors=True)
    return result


def pytest_runtest_setup(item):
    if item.get_closest_marker("detectron2") and importlib.util.find_spec("detectron2") is None:
        skip_or_fail_in_ci("detectron2 is not installed (scripts/setup.sh installs it)")


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread, and much faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ the tiny pipeline

TINY = [  # seconds per job on 2 cores (mostly start-up)
    "pretrain.iters=4",
    "pretrain.batch_size=4",
    "pretrain.queue_len=16",
    "pretrain.crop_size=64",
    "pretrain.log_every=2",
    "pretrain.ckpt_every=100",  # the last checkpoint only: each holds ~140 MB (a resume test stops the run itself)
    "pretrain.eval_every=2",  # the feature-quality signals at 0, 2 and 4, on a few small scenes
    "pretrain.eval_num_train=8",
    "pretrain.eval_num_val=4",
    "pretrain.eval_size=64",
    "pretrain.corr_eval_pairs=4",  # the correspondence accuracy on 4 view pairs, not 64
    "data.num_images=16",
    "pretrain.figure.num_images=1",
    "pretrain.figure.crop_size=64",
    "downstream.synthetic.num_train=8",
    "downstream.synthetic.num_val=4",
    # every field of a stage's settings is a key of its section (pipelines.schema.section_schema)
    "downstream.det_voc.max_iter=1",
    "downstream.det_voc.ims_per_batch=2",
    "downstream.det_voc.precise_bn=false",
    "downstream.det_voc.num_workers=0",
    "downstream.det_voc.min_size_train=[96]",
    "downstream.det_voc.max_size_train=128",
    "downstream.det_voc.min_size_test=96",
    "downstream.det_voc.max_size_test=128",
    # a few proposals: the C4 head runs res5 on each (300 per image took 3 s of the stage's 4 s)
    "downstream.det_voc.rpn_pre_nms_topk_train=200",
    "downstream.det_voc.rpn_post_nms_topk_train=50",
    "downstream.det_voc.roi_batch_size_per_image=16",
    "downstream.det_voc.rpn_pre_nms_topk_test=100",
    "downstream.det_voc.rpn_post_nms_topk_test=20",
    "downstream.seg_voc.max_iter=1",
    "downstream.seg_voc.ims_per_batch=2",
    "downstream.seg_voc.num_workers=0",
    "downstream.seg_voc.crop_size=64",
    "downstream.seg_voc.img_scale=[320,80]",
    "downstream.probe.image_size=64",
    "downstream.probe.input_size=64",
    "downstream.probe.num_train=8",
    "downstream.probe.num_val=4",
    "downstream.probe.epochs=1",
    "downstream.probe.batch_size=4",
]


def run_cli(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipelines.run TINY ARGS paths.output_dir=OUT` in OUT: ARGS (-m among them, if any) override
    TINY's keys."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run", *TINY, *args, f"paths.output_dir={out}"],
        cwd=out, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@dataclass(frozen=True)
class Sweep:
    """What a sweep left: its output folder (mlflow.db, multirun/...), what it printed, how it was started."""

    out: Path
    stdout: str
    console: str  # stdout then stderr, as the terminal showed them
    args: tuple[str, ...]
    stages: tuple[str, ...]
    matchings: tuple[str, ...]
    seeds: tuple[int, ...]


SWEEP_STAGES = ("pretrain", "convert", *(("det_voc", "seg_voc") if HAVE_DETECTRON2 else ()), "probe")
SWEEP_MATCHINGS = ("backbone", "random")
SWEEP_SEEDS = (0, 1)


@pytest.fixture(scope="session")
def pipeline_sweep(tmp_path_factory, request) -> Sweep:
    """One tiny sweep, matching x seed (4 jobs) through every stage, made once for the pipeline tests and the
    browser tests of the mlflow UI: a swept key beside the seed gives the report a row per matching with a mean
    ± std over two seeds, and the runs table a group column. Its ~1.8 GB is removed after the last test that
    reads it (pytest_runtest_teardown), unless a test failed."""
    out = tmp_path_factory.mktemp("sweep")
    request.config.stash[SWEEP_MADE] = out, request.session.testsfailed
    args = ("-m", f"matching={','.join(SWEEP_MATCHINGS)}", f"seed={','.join(map(str, SWEEP_SEEDS))}",
            f"stages=[{','.join(SWEEP_STAGES)}]")  # fmt: skip
    result = run_cli(out, *args)
    (out / "console.txt").write_text(result.stdout + result.stderr)  # what the terminal showed
    return Sweep(out, result.stdout, result.stdout + result.stderr, args, SWEEP_STAGES, SWEEP_MATCHINGS, SWEEP_SEEDS)


# ------------------------------------------------------------------------- a tracking server, and a SLURM sweep


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real mlflow server on PostgreSQL with basic auth (tests/servers.py), for the session."""
    from tests.servers import MlflowServer, postgres_or_skip

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), postgres_or_skip()).start()
    yield server
    server.stop()


@dataclass(frozen=True)
class ServerSweep:
    """A SLURM sweep (two loss weights, one seed) that logged through `server`, stopped for `outage_s` while it
    ran, into its own mlflow experiment `name` (the store outlives a local test session)."""

    out: Path
    name: str
    sweep_dir: Path
    server: object  # tests.servers.MlflowServer
    console: str
    lambdas: tuple[str, ...]
    iterations: int
    outage_s: float


OUTAGE_S = 60  # how long the server is down while the SLURM sweep runs


@pytest.fixture(scope="session")
def server_sweep(tmp_path_factory, tracking_server) -> ServerSweep:
    """Two tiny pre-training jobs (model.loss_lambda 0.3, 0.7) through SLURM (`.ci/slurm_up.sh`'s cluster),
    tracked by `tracking_server`, the password in tracking.uri: once the first job has started, the server stops
    for OUTAGE_S seconds and starts again. Read by tests/test_slurm.py (what the store holds) and
    tests/test_mlflow_ui.py (the server's UI)."""
    import time
    import uuid

    from tests.servers import SLURM_TINY, slurm_unavailable_reason

    reason = slurm_unavailable_reason()
    if reason is not None:
        skip_or_fail_in_ci(f"the SLURM tests cannot run: {reason}")
    out, lambdas, iterations = tmp_path_factory.mktemp("server_sweep"), ("0.3", "0.7"), 12
    job_name, name = f"densecl-test-{uuid.uuid4().hex[:10]}", f"server-{uuid.uuid4().hex[:8]}"
    args = ["-m", *SLURM_TINY, f"hydra.launcher.name={job_name}", f"paths.output_dir={out}", f"name={name}",
            f"model.loss_lambda={','.join(lambdas)}", f"pretrain.iters={iterations}", "pretrain.log_every=1",
            "tracking=server", f"tracking.uri={tracking_server.uri_with(tracking_server.password)}",
            f"tracking.flush_timeout_s={3 * OUTAGE_S}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = out / "console.txt"
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "pipelines.run", *args], cwd=out, stdout=handle,
                                   stderr=subprocess.STDOUT, env={**env, "PYTHONPATH": str(ROOT)})
    sweep_dir = out / "multirun" / name
    try:
        deadline = time.monotonic() + 300
        while not list(sweep_dir.glob("*/mlflow_run.journal.jsonl")):  # a job runs: the parent run is open
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        tracking_server.stop()
        stopped = time.monotonic()
        time.sleep(OUTAGE_S)
        tracking_server.start()
        outage = time.monotonic() - stopped
        assert process.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        if process.poll() is None:
            process.kill()
        subprocess.run(["scancel", "--name", job_name], capture_output=True, timeout=30)
    return ServerSweep(out, name, sweep_dir, tracking_server, log.read_text(), lambdas, iterations, outage)
