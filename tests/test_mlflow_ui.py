"""The results where users read them: mlflow's UI on the store a tiny sweep leaves, driven in a real browser
(Debian's Chromium through Playwright). The link the sweep prints must open the runs table with the child
runs, a swept param and a stage metric as columns; the parent's report table must render with the sweep's
numbers. Skipped without Chromium, except under CI=true (.ci/run installs it), where it must run.

The sweep (matching x seed) is the pipeline tests' own (tests/conftest.py's `pipeline_sweep`, made once):
this module only reads its store."""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.tracking import PARENT_TAG, Tracker
from tests.conftest import Sweep, skip_or_fail_in_ci

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        skip_or_fail_in_ci("Chromium is missing (Debian: apt-get install chromium; .ci/run installs it)")
    return path


@dataclass(frozen=True)
class UI:
    base: str  # `mlflow ui`'s base URL
    sweep: Sweep


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Looked for before the sweep is made (the first session fixture the tests ask for): without Chromium,
    the tests skip locally before any work."""
    return chromium()


@pytest.fixture(scope="module")
def ui(chromium_path, pipeline_sweep):
    """`mlflow ui` on the shared sweep's store, on a free port."""
    sweep = pipeline_sweep
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{sweep.out}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=sweep.out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(base, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"mlflow ui did not answer on {base}")
            time.sleep(1)
    yield UI(base, sweep)
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(chromium_path):
    """One headless Chromium for the module's pages."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    # a fresh context (no state shared); wide enough that the grid renders every column of the sweep's view:
    # it renders only those in sight, and the tags (`group`) come after the params and every stage's metrics
    context = browser.new_context(viewport={"width": 3000, "height": 1000})
    yield context.new_page()
    context.close()


def printed_link(stdout: str, base: str) -> str:
    """The runs-table link the sweep printed at its end, served by `base` instead of the default port."""
    link = r"then open http://127\.0\.0\.1:5000(/#/experiments/\d+/runs\?\S*viewStateShareKey=\S+)"
    match = re.search(link, stdout)
    assert match, f"the sweep printed no link to its runs table:\n{stdout[-2000:]}"
    return base + match.group(1)


def child_runs(out: Path) -> list:
    tracker = Tracker(f"sqlite:///{out}/mlflow.db")
    runs = tracker.client.search_runs([tracker.experiment_id("default")])
    return [r for r in runs if PARENT_TAG in r.data.tags]


def test_the_printed_link_opens_the_runs_table_with_the_children_a_swept_param_and_a_metric(ui, page, tmp_path):
    sweep = ui.sweep
    page.goto(printed_link(sweep.stdout, ui.base))
    names = [f"matching={m},seed={s}" for m in sweep.matchings for s in sweep.seeds]
    page.get_by_text(names[0], exact=True).wait_for(timeout=60_000)
    page.screenshot(path=tmp_path / "runs_table.png", full_page=True)
    for name in names:  # every child is a row of its own, not folded under the parent
        assert page.get_by_text(name, exact=True).is_visible(), name
    headers = {h.strip() for h in page.locator('[role="columnheader"]').all_inner_texts()}
    assert {"matching", "seed", "group", "probe/mIoU", "pretrain/loss"} <= headers, headers
    assert {r.info.run_name for r in child_runs(sweep.out)} == set(names)


def test_the_parents_report_table_renders_with_the_sweeps_numbers(ui, page, tmp_path):
    sweep = ui.sweep
    children = child_runs(sweep.out)
    parent = children[0].data.tags[PARENT_TAG]
    page.goto(f"{ui.base}/#/experiments/{children[0].info.experiment_id}/runs/{parent}/artifacts/report/table.json")
    page.locator('[role="row"]', has_text="backbone").first.wait_for(timeout=60_000)
    page.screenshot(path=tmp_path / "report_table.png", full_page=True)
    rows = [row.split("\n") for row in page.locator('[role="row"]').all_inner_texts()]
    header, body = rows[0], {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert header[:2] == ["matching", "n"] and set(body) == set(sweep.matchings)
    for matching in sweep.matchings:  # mean ± sample std over the seeds, from the child runs themselves
        values = [r.data.metrics["probe/mIoU"] for r in children if r.data.params["matching"] == matching]
        expected = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert body[matching]["n"] == "2" and body[matching]["probe/mIoU"] == expected, body[matching]


@pytest.mark.slurm
def test_the_ui_of_a_tracking_server_shows_the_sweep_and_its_report(server_sweep, browser, chromium_path, tmp_path):
    """The same, served by the tracking server on PostgreSQL behind basic auth that the SLURM sweep logged to
    through its outage (tests/conftest.py's `server_sweep`): the link the sweep printed, then the report."""
    server = server_sweep.server
    context = browser.new_context(viewport={"width": 3000, "height": 1000},
                                  http_credentials={"username": "admin", "password": server.password})
    page = context.new_page()
    try:
        match = re.search(r"open (http://127\.0\.0\.1:\d+/#/experiments/(\d+)/runs\?\S*viewStateShareKey=\S+)",
                          server_sweep.console)
        assert match and match.group(1).startswith(server.uri), server_sweep.console[-2000:]
        page.goto(match.group(1))
        names = [f"model.loss_lambda={value}" for value in server_sweep.lambdas]
        page.get_by_role("link", name=names[0], exact=True).wait_for(timeout=60_000)
        page.screenshot(path=tmp_path / "server_runs_table.png", full_page=True)
        for name in names:  # a row each, named by its run's swept key
            assert page.get_by_role("link", name=name, exact=True).count() == 1, name
        headers = {h.strip() for h in page.locator('[role="columnheader"]').all_inner_texts()}
        assert {"model.loss_lambda", "pretrain/loss"} <= headers, headers

        os.environ.update(server.client_environment())
        try:
            tracker = Tracker(server.uri)
            runs = tracker.client.search_runs([match.group(2)])
        finally:
            for name in server.client_environment():
                os.environ.pop(name)
        children = [r for r in runs if PARENT_TAG in r.data.tags]
        parent = children[0].data.tags[PARENT_TAG]
        page = context.new_page()  # a page of its own: the runs table's hidden rows stay in the first one
        page.goto(f"{server.uri}/#/experiments/{match.group(2)}/runs/{parent}/artifacts/report/table.json")
        page.locator('[role="row"]', has_text=server_sweep.lambdas[0]).first.wait_for(timeout=60_000)
        page.screenshot(path=tmp_path / "server_report_table.png", full_page=True)
        rows = [row.split("\n") for row in page.locator('[role="row"]').all_inner_texts()]
        header, body = rows[0], {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
        # a swept key's dots are one-dot leaders there (pipelines.report: the table viewer would show no value)
        assert header[:2] == ["model\u2024loss_lambda", "n"] and set(body) == set(server_sweep.lambdas)
        for run in children:  # one seed: the mean is the run's own value
            shown = body[run.data.params["model.loss_lambda"]]["pretrain/loss"]
            assert shown == f"{run.data.metrics['pretrain/loss']:.2f}", shown
    finally:
        context.close()
