"""`python -m pipelines.sync FOLDER`: send to mlflow what waits in the journals under FOLDER (a job, a sweep, or
a whole output folder), for jobs that ended while the tracking store was down (pipelines.journal).

Each run's entries are sent in order and only once; the jobs' runs first, then the sweeps' parent runs, whose
journals may hold the sweep's report, made from the jobs' runs. The store is the one each run was opened with
(its id file), or `--tracking-uri`; credentials come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
Exits 1 when something is still waiting (the store did not answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines import credentials
from pipelines.journal import SUFFIX, Journal
from pipelines.tracking import PARENT_FILE, Tracker

log = logging.getLogger("pipelines.sync")


def journals_under(folder: Path) -> list[Path]:
    """The id files of the runs whose journals lie under `folder`: jobs' runs, then parents'."""
    found = sorted(p.with_name(p.name[: -len(SUFFIX)] + ".json") for p in Path(folder).rglob(f"*{SUFFIX}"))
    return sorted(found, key=lambda id_file: id_file.name == PARENT_FILE)


def tracking_uri(id_file: Path, journal: Journal, default: str | None) -> str | None:
    """Where the run lives: `default` when given, else its id file's or its journal's record."""
    if default:
        return default
    try:
        return json.loads(id_file.read_text())["tracking_uri"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        opened = next((e for e in journal.entries() if e["op"] == "open"), {})
        return opened.get("tracking_uri")


def sync(folder: Path, uri: str | None = None) -> tuple[int, int]:
    """Send every journal under `folder`; returns (entries sent, journals still waiting)."""
    sent, waiting = 0, 0
    trackers: dict[str, Tracker] = {}
    for id_file in journals_under(folder):
        journal = Journal(id_file, lambda: None)
        store = tracking_uri(id_file, journal, uri)
        before = journal.sent_count()
        if store is None:
            log.warning("%s: no tracking URI recorded: pass --tracking-uri", journal.path)
            waiting += 1
            continue
        journal = Journal(id_file, lambda store=store: trackers.setdefault(store, Tracker(store)))
        done = journal.send_pending()
        sent += journal.sent_count() - before
        waiting += not done
        log.info("%s: %s", journal.path, "sent" if done else f"{len(journal.pending())} entries still wait")
    return sent, waiting


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a job folder, a sweep folder or an output folder")
    parser.add_argument("--tracking-uri", help="the mlflow store (default: the one each run was opened with)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder}: not a folder")
    # a password in the URI: into the environment, where mlflow's client reads it
    uri = credentials.uri_to_environment(args.tracking_uri) if args.tracking_uri else None
    sent, waiting = sync(args.folder, uri)
    print(f"sent {sent} entries; {waiting} journals still waiting" if waiting else f"sent {sent} entries; all sent")
    sys.exit(1 if waiting else 0)


if __name__ == "__main__":
    main()
