"""What the terminal shows: a line per finished stage with its headline figures beside the trivial baseline
(so that a newcomer sees whether anything was learnt), and a summary table of every job at the end, with
where the results are and the command that shows them in mlflow. detectron2's own detailed log goes to each
stage's log.txt unless `verbose=true`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipelines.registry import STAGES

DETAILED_LOGGERS = ("detectron2", "fvcore", "densecl.transfer")
# libraries' deprecation notices from inside the transfer stages (torch.jit.script, torch.meshgrid): not ours to act on
LIBRARY_WARNINGS = r"(torch|detectron2|fvcore)(\.|$)"


def headline(stage: str, metrics: Mapping[str, float]) -> str:
    """'AP 1.19, AP50 4.86 (trivial: 0)', 'mIoU 24.1 (trivial: 10.0)', 'loss 5.19': the stage's headline figures
    (pipelines.registry) beside the score of a trivial predictor, where the stage has one."""
    record = STAGES[stage] if stage in STAGES else None
    names = record.headline if record is not None else ()
    shown = ", ".join(f"{name} {metrics[name]:.4g}" for name in names if name in metrics)
    trivial = record.trivial(dict(metrics)) if record is not None else None
    if trivial is not None:
        shown += f" ({record.baseline_label}: {trivial:.4g})"
    return shown


@contextlib.contextmanager
def detailed_logs_to_file_only(enabled: bool) -> Iterator[None]:
    """detectron2's model dumps, data tables and per-iteration lines stay out of the terminal: those loggers
    stop propagating to the console (the stage's own file handler still gets them), and the libraries'
    warnings are not shown."""
    loggers = [logging.getLogger(name) for name in DETAILED_LOGGERS] if enabled else []
    before = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.propagate = False
    try:
        with warnings.catch_warnings():
            if enabled:
                warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)
            yield
    finally:
        for lg, propagate in zip(loggers, before):
            lg.propagate = propagate


def summary_table(jobs: Mapping[str, Path], stages: list[str], done_file: str) -> str:
    """A markdown table of every job's finished stages: the job's name, the stage, its headline figures and
    its time. `jobs`: {name: job folder}."""
    lines = ["| job | stage | result | time |", "|---|---|---|---|"]
    for name, job in jobs.items():
        for stage in stages:
            try:
                done = json.loads((job / stage / done_file).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            seconds = done.get("seconds")
            time = f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
            lines.append(f"| {name} | {stage} | {headline(stage, done['metrics'])} | {time} |")
    return "\n".join(lines)
