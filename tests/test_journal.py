"""pipelines.journal: what a run logs waits in its folder while the tracking store does not answer and is sent
later, in order and once: through an outage, a lost acknowledgement, a lost run creation, two senders at once,
and `python -m pipelines.sync` after the job has ended."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipelines import sync
from pipelines.journal import Journal, StoreUnavailable
from pipelines.tracking import CHILD_FILE, PARENT_FILE, RunLogger, Tracker


class FlakyStore(Tracker):
    """A real SQLite store whose requests fail as a stopped server's do while `down` is set; `lose_answer`
    makes the next request of that name reach the store and then fail, as when the answer is lost."""

    def __init__(self, uri: str):
        self.down = False
        self.lose_answer: set[str] = set()
        self.slow: dict[str, float] = {}  # request name -> seconds it takes
        self.requests: list[str] = []
        super().__init__(uri, retries=1)
        self.requests.clear()

    def call(self, fn, *args, **kwargs):
        name = getattr(fn, "__name__", str(fn))
        self.requests.append(name)
        if self.down:
            raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded "
                                  "(Connection refused)")
        time.sleep(self.slow.get(name, 0))
        result = super().call(fn, *args, **kwargs)
        if name in self.lose_answer:
            self.lose_answer.discard(name)
            raise ConnectionError("Read timed out")
        return result


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    Tracker(uri)  # made once: its tables take seconds
    return uri


@pytest.fixture
def store(database, request):
    flaky = FlakyStore(database)
    flaky.experiment = request.node.name  # each test its own experiment
    return flaky


def job_journal(store, folder, parent=None) -> Journal:
    journal = Journal(folder / CHILD_FILE, lambda: store)
    journal.open_run(store.uri, store.experiment, None, "job", {"densecl.job_dir": str(folder)},
                     parent_run_id=parent)
    return journal


def curve(store, run_id, name="pretrain/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.client.get_metric_history(run_id, name))


def test_logging_asks_the_store_nothing_and_sends_in_order_once(store, tmp_path):
    journal = job_journal(store, tmp_path)
    logger = RunLogger(journal)
    logger.params({"seed": "1"})
    for step in (10, 20):
        logger.journal.metrics([(step, {"pretrain/loss": 1.0 / step})])
    logger.final_metrics("det_voc", {"AP": 4.0})
    logger.status("FINISHED")
    assert store.requests == []  # a job's logging is a write to its own folder
    assert journal.send_pending() and journal.sent_count() == 6
    run = store.client.get_run(journal.run_id())
    assert run.data.params == {"seed": "1"} and run.info.status == "FINISHED"
    assert curve(store, journal.run_id()) == [(10, 0.1), (20, 0.05)]
    assert journal.send_pending() and store.client.get_metric_history(journal.run_id(), "det_voc/AP")[0].value == 4.0
    assert len(store.client.get_metric_history(journal.run_id(), "det_voc/AP")) == 1


def test_an_outage_keeps_entries_and_says_so_once_then_catches_up(store, tmp_path, caplog):
    journal = job_journal(store, tmp_path)
    assert journal.send_pending()
    store.down = True
    for step in range(1, 6):
        journal.metrics([(step, {"pretrain/loss": float(step)})])
        assert not journal.send_pending()  # the job goes on: nothing raised, nothing lost
    assert len(journal.pending()) == 5
    store.down = False
    assert journal.send_pending() and journal.pending() == []
    assert curve(store, journal.run_id()) == [(s, float(s)) for s in range(1, 6)]
    said = [r.getMessage() for r in caplog.records if r.name == "pipelines.journal"]
    assert sum("does not answer" in m for m in said) == 1 and sum("caught up" in m for m in said) == 1


def test_a_lost_answer_is_not_sent_twice(store, tmp_path):
    """The store took the batch but its answer was lost: the next attempt leaves out the points it holds."""
    journal = job_journal(store, tmp_path)
    assert journal.send_pending()
    journal.metrics([(1, {"pretrain/loss": 0.5, "pretrain/lr": 0.1})])
    store.lose_answer.add("log_batch")
    assert not journal.send_pending() and len(journal.pending()) == 1
    journal.metrics([(2, {"pretrain/loss": 0.25})])
    assert journal.send_pending()
    assert curve(store, journal.run_id()) == [(1, 0.5), (2, 0.25)]
    assert curve(store, journal.run_id(), "pretrain/lr") == [(1, 0.1)]


def test_a_run_whose_creation_answer_was_lost_is_found_not_made_twice(store, tmp_path):
    journal = job_journal(store, tmp_path)
    store.lose_answer.add("create_run")
    assert not journal.send_pending() and journal.run_id() is None
    assert journal.send_pending()
    experiment = store.experiment_id(store.experiment)
    assert len(store.client.search_runs([experiment])) == 1
    assert store.client.search_runs([experiment])[0].info.run_id == journal.run_id()


def test_two_senders_of_one_journal_take_turns(store, tmp_path):
    first = job_journal(store, tmp_path)
    assert first.send_pending()
    for step in range(1, 41):
        first.metrics([(step, {"pretrain/loss": float(step)})])
    second = Journal(tmp_path / CHILD_FILE, lambda: store)  # another process's view of the same files
    store.slow["log_batch"] = 0.3  # the senders overlap
    store.requests.clear()
    threads = [threading.Thread(target=j.send_pending) for j in (first, second, first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.requests.count("log_batch") == 1  # one sender sent the 40 entries, the others waited their turn
    assert first.send_pending() and second.pending() == []
    assert curve(store, first.run_id()) == [(s, float(s)) for s in range(1, 41)]


def test_the_background_sender_and_a_flush_that_gives_up(store, tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.journal.BACKOFF_S", (0.01,))
    journal = job_journal(store, tmp_path).start()
    journal.metrics([(1, {"pretrain/loss": 1.0})])
    assert journal.flush(10) and curve(store, journal.run_id()) == [(1, 1.0)]
    store.down = True
    journal.metrics([(2, {"pretrain/loss": 2.0})])
    assert not journal.flush(0.05) and len(journal.pending()) == 1  # waits for the next sender


def test_sync_sends_jobs_before_their_parent(store, tmp_path, monkeypatch):
    """A sweep whose store stayed down until its jobs ended: `pipelines.sync` sends the jobs' runs, then the
    parent's status (its report, when it holds one, needs the jobs' runs)."""
    monkeypatch.setattr(sync, "Tracker", lambda uri: store)
    experiment = store.experiment_id(store.experiment)
    parent_id, _ = store.open_run(tmp_path / PARENT_FILE, experiment, "sweep")
    store.down = True
    jobs = [tmp_path / f"seed={seed}" for seed in (0, 1)]
    for seed, folder in enumerate(jobs):
        journal = job_journal(store, folder, parent=parent_id)
        journal.metrics([(1, {"pretrain/loss": float(seed)})])
        journal.append("status", status="FINISHED")
        assert not journal.send_pending()
    parent = Journal(tmp_path / PARENT_FILE, lambda: store)
    parent.append("status", status="FINISHED")
    assert [p.parent.name for p in sync.journals_under(tmp_path)] == ["seed=0", "seed=1", tmp_path.name]
    assert sync.sync(tmp_path) == (0, 3)  # still down: nothing sent, every journal waits
    store.down = False
    sent, waiting = sync.sync(tmp_path)
    assert (sent, waiting) == (2 * 3 + 1, 0)
    children = store.client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.data.metrics["pretrain/loss"] for r in children) == [0.0, 1.0]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert store.client.get_run(parent_id).info.status == "FINISHED"
    assert sync.sync(tmp_path) == (0, 0)  # idempotent


def test_an_entry_the_store_refuses_is_skipped_not_retried_forever(store, tmp_path, caplog):
    journal = job_journal(store, tmp_path)
    journal.append("params", params={"k": "1"})
    journal.append("tags", tags={"what?": "x"})  # a name mlflow refuses: it would be refused again
    journal.metrics([(1, {"pretrain/loss": 1.0})])
    with caplog.at_level(logging.WARNING):
        assert journal.send_pending()
    assert any("refused an entry" in r.getMessage() for r in caplog.records)
    assert curve(store, journal.run_id()) == [(1, 1.0)]


def test_an_unavailable_store_is_told_from_a_refused_entry():
    from pipelines.journal import is_unavailable

    assert is_unavailable(ConnectionError("Connection refused"))
    assert is_unavailable(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert not is_unavailable(ValueError("Param value too long"))
    assert issubclass(StoreUnavailable, RuntimeError)
