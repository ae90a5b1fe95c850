"""How many jobs one mlflow tracking server carries: N processes log metric points to it through their journals
(pipelines.journal), as a sweep's jobs do; the values per second it stored, and a check that each was stored once.

    python benchmarks/tracking_load.py --serve postgresql://USER:PASSWORD@127.0.0.1:5432/mlflow --processes 32
    python benchmarks/tracking_load.py --uri http://HOST:5000 --processes 32      # a server already running

Two phases, each process with its own run:
  burst     every process journals --steps steps of --keys metrics at once, then sends them: the server's rate
            (values stored per second, from the first request to the last answer);
  sweep     every process logs --keys metrics every --interval seconds for --seconds, handing them over every
            10 s as the pipeline's curves do, at a real sweep's rate or faster (a lower --interval): whether the
            server keeps up (how long after the last hand-over everything is stored).
Then every run's history is read back: each value must be there exactly once. The last line:
    tracking server: R values/s; carries J jobs at K values/s each
(J = R / K, K = the sweep phase's rate per job).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.journal import Journal  # noqa: E402
from pipelines.tracking import CHILD_FILE, Tracker  # noqa: E402

CURVE_FLUSH_S = 10.0  # pipelines.tracking.MetricBuffer's interval


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(backend: str, folder: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on `backend` with artifacts served from `folder`; returns it once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"),  # noqa: SIM115
        start_new_session=True,  # its workers and job consumers in its own process group, stopped with it
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return server, uri
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"mlflow server exited: see {folder / 'server.log'}") from None
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGTERM)
    raise SystemExit(f"mlflow server did not answer within 2 minutes: see {folder / 'server.log'}")


def job(args: tuple) -> dict:
    """One process's run: the phase's values journaled and sent; returns its timings."""
    uri, folder, phase, index, steps, keys, interval, seconds = args
    tracker = Tracker(uri)
    journal = Journal(Path(folder) / f"{phase}-{index}" / CHILD_FILE, lambda: tracker)
    journal.open_run(uri, f"load-{Path(folder).name}", None, f"{phase}-{index}", {"densecl.load": phase})
    journal.send_pending()
    if phase == "burst":
        for start in range(0, steps, 10):  # entries of 10 steps, as a curve hands them over
            journal.metrics([(s, {f"k{k}": s + k / 100 for k in range(keys)}) for s in range(start, start + 10)])
        began = time.time()
        assert journal.flush(600), "the server did not take the burst"
        return {"began": began, "ended": time.time(), "values": steps * keys, "steps": steps, "run": journal.run_id()}
    journal.start()
    began, step, pending, last_flush = time.time(), 0, [], time.monotonic()
    while time.time() - began < seconds:
        pending.append((step, {f"k{k}": step + k / 100 for k in range(keys)}))
        step += 1
        if time.monotonic() - last_flush >= CURVE_FLUSH_S:
            journal.metrics(pending)
            pending, last_flush = [], time.monotonic()
        time.sleep(interval)
    journal.metrics(pending)
    ended = time.time()
    assert journal.flush(600), "the server did not catch up"
    return {"began": began, "ended": ended, "values": step * keys, "steps": step, "behind": time.time() - ended,
            "run": journal.run_id()}


def check_stored(uri: str, results: list[dict], keys: int) -> None:
    """Every run holds each of its values exactly once."""
    tracker = Tracker(uri)
    for result in results:
        for k in range(keys):
            points = sorted(p.step for p in tracker.client.get_metric_history(result["run"], f"k{k}"))
            assert points == list(range(result["steps"])), f"{result['run']} k{k}: {len(points)} of {result['steps']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uri", help="a running tracking server, http://HOST:PORT")
    where.add_argument("--serve", metavar="BACKEND_URI", help="start `mlflow server` on this backend store")
    parser.add_argument("--workers", type=int, default=4, help="the started server's worker processes")
    parser.add_argument("--processes", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="burst: steps per process")
    parser.add_argument("--keys", type=int, default=12, help="metrics per step (a pre-training step logs ~12)")
    parser.add_argument("--interval", type=float, default=2.0, help="sweep: seconds between a job's steps")
    parser.add_argument("--seconds", type=float, default=60.0, help="sweep: how long each job logs")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="tracking_load-"))
    server, uri = serve(args.serve, folder, args.workers) if args.serve else (None, args.uri)
    try:
        results = {}
        for phase in ("burst", "sweep"):
            work = [(uri, str(folder), phase, i, args.steps, args.keys, args.interval, args.seconds)
                    for i in range(args.processes)]
            with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
                results[phase] = pool.map(job, work)
            check_stored(uri, results[phase], args.keys)
        burst = results["burst"]
        seconds = max(r["ended"] for r in burst) - min(r["began"] for r in burst)
        rate = sum(r["values"] for r in burst) / seconds
        sweep = results["sweep"]
        per_job = statistics.mean(r["values"] / (r["ended"] - r["began"]) for r in sweep)
        behind = max(r["behind"] for r in sweep)
        print(f"burst: {args.processes} processes x {args.steps} steps x {args.keys} values in {seconds:.1f} s, "
              f"every value stored once")
        print(f"sweep: {args.processes} jobs at {per_job:.1f} values/s each for {args.seconds:.0f} s, every value "
              f"stored once; the last hand-over stored within {behind:.1f} s")
        print(f"tracking server: {rate:.0f} values/s; carries {rate / per_job:.0f} jobs at {per_job:.1f} values/s each")
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


if __name__ == "__main__":
    main()
