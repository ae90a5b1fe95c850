"""What a run tells mlflow is written first to an append-only journal in its folder and sent from there, in order,
by a background thread: a tracking server that is down or slow never fails a job nor blocks its training.

One journal per mlflow run: `<id file stem>.journal.jsonl` beside the run's id file (a job's `mlflow_run.json`,
a sweep's `mlflow_parent.json`), each line one entry (open the run, params, tags, metric points, an artifact, an
image, a status, the sweep's report). `<stem>.journal.sent` holds how many entries the store has acknowledged.
While the store does not answer, entries wait and the sender retries with back-off; the terminal says once that
tracking is behind and once that it caught up. What is still waiting when a job ends is sent by its next run
(a rerun, a requeued SLURM job), by the sweep's end in the launching process, or by `python -m pipelines.sync`.

Nothing is stored twice: an entry counts as sent when the store acknowledged it, and one whose first attempt
failed (or whose process died before the acknowledgement was recorded) is sent again so that the store keeps it
once: a run is found by the key it was created with; a metric point carries the time it was logged, so the
second copy is the same row, which mlflow's SQL stores (the server's PostgreSQL or MySQL, SQLite) keep once;
an image already there is left out. Senders of one journal (a job, the launching process, `pipelines.sync`) take
turns through a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from densecl.files import write_json

log = logging.getLogger(__name__)

SUFFIX, SENT_SUFFIX, LOCK_SUFFIX = ".journal.jsonl", ".journal.sent", ".journal.lock"
RUN_KEY_TAG = "densecl.run_key"  # the key a run was created with: a second attempt finds the run instead of a twin
BACKOFF_S = (1, 2, 5, 10, 30)  # waits between attempts while the store does not answer
METRICS_PER_REQUEST = 1000  # mlflow's limit per log_batch call
# mlflow's own HTTP client retries a failed request for about two minutes; the journal keeps the entry and
# retries on its own schedule instead, so that a request fails fast
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class StoreUnavailable(RuntimeError):
    """The tracking store did not answer (or refused the credentials): the entry waits in the journal."""


def journal_path(id_file: Path) -> Path:
    return id_file.with_name(id_file.stem + SUFFIX)


def is_unavailable(err: BaseException) -> bool:
    """A failure worth retrying later: no connection, a timeout, a server error or a busy store; not a
    request the store refuses for what it holds (a bad value), which would fail again."""
    status = getattr(err, "get_http_status_code", lambda: None)()
    if isinstance(status, int) and (status >= 500 or status in (401, 403, 408, 429)):
        return True
    text = f"{type(err).__name__}: {err}".lower()
    return any(s in text for s in ("connection", "timed out", "timeout", "max retries exceeded", "temporarily",
                                   "database is locked", "remote end closed", "unavailable", "bad gateway",
                                   "401", "403", "unauthorized", "permission denied"))


class Journal:
    """The journal of one mlflow run: `append` from the job (a local write), sent by `send_pending` (the
    background sender started by `start`, `flush` at the end, or `pipelines.sync` later)."""

    def __init__(self, id_file: str | os.PathLike, tracker_factory: Callable[[], Any]):
        self.id_file = Path(id_file)
        self.path = journal_path(self.id_file)
        self.sent_file = self.id_file.with_name(self.id_file.stem + SENT_SUFFIX)
        self.lock_file = self.id_file.with_name(self.id_file.stem + LOCK_SUFFIX)
        self._tracker_factory, self._tracker = tracker_factory, None
        self._uncertain = True  # the next entry may have reached the store already (images: check first)
        self._behind = False
        self._append_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)

    # -------------------------------------------------------------------------------------------- writing

    def append(self, op: str, **fields: Any) -> None:
        """One entry at the end of the journal (one write of one line: a crash leaves whole lines)."""
        line = json.dumps({"op": op, "time_ms": int(time.time() * 1000), **fields}, default=str) + "\n"
        with self._append_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        self._wake.set()

    def open_run(self, tracking_uri: str, experiment: str, artifact_location: str | None, run_name: str,
                 tags: Mapping[str, str], parent_run_id: str | None = None) -> None:
        """Create the run (or reuse the one the id file names) and mark it RUNNING; `tracking_uri` is recorded
        for `pipelines.sync`."""
        self.append("open", tracking_uri=tracking_uri, experiment=experiment, artifact_location=artifact_location,
                    run_name=run_name, tags=dict(tags), parent_run_id=parent_run_id, run_key=uuid.uuid4().hex)

    def metrics(self, points: list[tuple[int, Mapping[str, float]]]) -> None:
        """(step, {name: value}) points; non-finite values are dropped (NaN would poison the report's means)."""
        kept = [[int(step), {k: float(v) for k, v in values.items() if _finite(v)}] for step, values in points]
        kept = [p for p in kept if p[1]]
        if kept:
            self.append("metrics", points=kept)

    # -------------------------------------------------------------------------------------------- reading

    def entries(self) -> list[dict]:
        """Every whole entry written so far."""
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]

    def sent_count(self) -> int:
        try:
            return int(json.loads(self.sent_file.read_text())["sent"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def pending(self) -> list[dict]:
        return self.entries()[self.sent_count():]

    def run_id(self) -> str | None:
        try:
            return json.loads(self.id_file.read_text())["run_id"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            return None

    def logged_metric_names(self) -> set[str]:
        """Every metric name the journal holds, sent or waiting."""
        return {name for e in self.entries() if e["op"] == "metrics" for _, values in e["points"] for name in values}

    # -------------------------------------------------------------------------------------------- sending

    def send_pending(self) -> bool:
        """Send every waiting entry, in order, while the store answers; True when none is left waiting. Another
        sender of this journal holding the lock makes it return False at once."""
        with self._locked() as held:
            if not held:
                return False
            entries = self.entries()
            done = self.sent_count()
            try:
                while done < len(entries):
                    count = self._send(entries, done)
                    done += count
                    write_json(self.sent_file, {"sent": done})
                    self._uncertain = False
            except StoreUnavailable as err:
                self._uncertain = True
                if not self._behind:
                    self._behind = True
                    log.warning("mlflow does not answer (%s): the job goes on; what it logs waits in %s and is sent "
                                "when the store answers", _short(err), self.path)
                return False
        if self._behind:
            self._behind = False
            log.warning("mlflow caught up: %s is sent", self.path)
        return True

    def _send(self, entries: list[dict], index: int) -> int:
        """Send entries[index] (several consecutive metric entries in one request); returns how many."""
        entry = entries[index]
        tracker = self._tracker_or_raise()
        try:
            if entry["op"] == "metrics":
                batch = [entry]
                while (index + len(batch) < len(entries) and entries[index + len(batch)]["op"] == "metrics"
                       and sum(len(v) for e in batch for _, v in e["points"]) < METRICS_PER_REQUEST):
                    batch.append(entries[index + len(batch)])
                self._send_metrics(tracker, batch)
                return len(batch)
            getattr(self, f"_send_{entry['op']}")(tracker, entry)
            return 1
        except StoreUnavailable:
            raise
        except Exception as err:
            if is_unavailable(err):
                raise StoreUnavailable(err) from err
            log.warning("mlflow refused an entry of %s, skipped: %s: %s", self.path, entry["op"], _short(err))
            return 1

    def _tracker_or_raise(self):
        if self._tracker is None:
            try:
                self._tracker = self._tracker_factory()
            except Exception as err:
                raise StoreUnavailable(err) from err
        return self._tracker

    def _run(self) -> str:
        run_id = self.run_id()
        if run_id is None:
            raise RuntimeError(f"{self.path}: an entry before the run was opened")
        return run_id

    def _send_open(self, tracker, entry: dict) -> None:
        experiment_id = tracker.experiment_id(entry["experiment"], entry["artifact_location"])
        tracker.open_run(self.id_file, experiment_id, entry["run_name"], tags=entry["tags"],
                         parent_run_id=entry["parent_run_id"], run_key=entry["run_key"])

    def _send_params(self, tracker, entry: dict) -> None:
        changed = tracker.log_params(self._run(), entry["params"])
        if changed:  # only keys left out of folder names can differ (e.g. stages): the first values stay
            log.warning("mlflow params keep their first values for %s (params are immutable)", ", ".join(changed))

    def _send_tags(self, tracker, entry: dict) -> None:
        tracker.set_tags(self._run(), entry["tags"])

    def _send_metrics(self, tracker, batch: list[dict]) -> None:
        """Each point with the time it was logged: sent again, it is the row the store holds already."""
        tracker.log_metric_points(self._run(), [(step, values, e["time_ms"]) for e in batch
                                                for step, values in e["points"]])

    def _send_artifact(self, tracker, entry: dict) -> None:
        tracker.log_artifact(self._run(), entry["path"], entry.get("artifact_path"))

    def _send_image(self, tracker, entry: dict) -> None:
        if self._uncertain and tracker.has_image(self._run(), entry["key"], entry.get("step", 0)):
            return
        tracker.log_image(self._run(), entry["path"], entry["key"], entry.get("step", 0))

    def _send_status(self, tracker, entry: dict) -> None:
        if entry["status"] == "RUNNING":
            tracker.call(tracker.client.update_run, self._run(), status="RUNNING")
        else:
            tracker.finish(self._run(), entry["status"], end_time=entry["time_ms"])

    def _send_report(self, tracker, entry: dict) -> None:
        """The sweep's report on its parent run, made from the sweep's config snapshot once the children's
        journals are sent (pipelines.report)."""
        from omegaconf import OmegaConf

        from pipelines.report import report_sweep

        try:
            report_sweep(OmegaConf.load(entry["config"]), tracker, self._run())
        except SystemExit as err:  # the report's own refusal (no child run yet): not worth ending the process
            raise RuntimeError(f"the sweep's report (make it with python -m pipelines.report): {err}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------ background sender

    def start(self) -> Journal:
        """Send in a background thread from now on (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"journal {self.path.name}", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._wake.clear()
            caught_up = self.send_pending()
            attempt = 0 if caught_up else attempt + 1
            self._wake.wait(None if caught_up else BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1])

    def flush(self, timeout_s: float) -> bool:
        """Stop the background sender and send what waits, trying until `timeout_s` has passed; True when
        nothing is left waiting (else it stays in the journal for the next sender)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(timeout_s, 0))
            self._thread = None
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            if self.send_pending():
                return True
            wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            attempt += 1
            if time.monotonic() + wait > deadline:
                left = len(self.pending())
                if left:
                    log.warning("%d mlflow entries wait in %s: the next run of this job sends them, or "
                                "`python -m pipelines.sync %s`", left, self.path, self.path.parent)
                return not left
            time.sleep(wait)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + "..."
