"""The figures of one step of benchmarks/gpu_checks.sh, read from what the step left in OUT, as summary lines:

    python benchmarks/gpu_checks_figures.py STEP OUT --rc RC --seconds S --limit L [--tiny] [--stages A,B,...]

One line per figure, `key=value` fields, then ` | ` and a free-text detail:
    step=step_overhead status=ok figure=densecl_over_mocov2 value=1.045 unit=ratio target=<=1.02 met=no \
        seconds=61 limit=300 | median step times, alternated
(one line in the file).
status: ok (the step exited 0 and left the figure), failed (it exited non-zero, or left no figure) or timeout
(killed at its limit: exit 124 or 137); value: the figure, or nan when there is none. met: yes / no against
the target (n/a without a target, and in the tiny mode, whose sizes mean nothing).
chain: --stages names the stages the chain ran; each one's figure is its first headline metric in
pipelines/registry.py (`Stage.headline`), read from the stage's DONE.json, with the stage's wall time beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path

from pipelines.registry import STAGES

THROUGHPUT = r"^throughput {mode}: (\d+(?:\.\d+)?) images/s"
CLAIM_METRICS = ("det_voc/AP", "seg_voc/mIoU", "probe/mIoU")
CLAIM_ORDER = ("densecl", "mocov2", "random_init")


class Figure:
    def __init__(self, name, value=None, unit="", target=None, detail=""):
        self.name, self.value, self.unit, self.target, self.detail = name, value, unit, target, detail


def grep(log: Path, pattern: str, flags=re.MULTILINE) -> re.Match | None:
    text = log.read_text(errors="replace") if log.is_file() else ""
    matches = list(re.finditer(pattern, text, flags))
    return matches[-1] if matches else None


def number(match: re.Match | None, group: int = 1) -> float | None:
    return float(match.group(group)) if match else None


def jpeg_folder(out: Path, log: Path, args) -> list[Figure]:
    m = grep(log, r"^jpeg folder: (\d+) images, mean (\d+)x(\d+), mean ([\d.]+) KiB, ([\d.]+) s")
    detail = f"mean {m.group(2)}x{m.group(3)} px, {m.group(4)} KiB per image, written in {m.group(5)} s" if m else ""
    return [Figure("jpeg_images", number(m), "images", detail=detail)]


def throughput_gpu_aug(out: Path, log: Path, args) -> list[Figure]:
    tensors = number(grep(log, THROUGHPUT.format(mode="tensors")))
    gpu = number(grep(log, THROUGHPUT.format(mode="pipeline")))
    ratio = number(grep(log, r"^pipeline/tensors: (\d+\.\d+)"))
    return [
        Figure("tensors", tensors, "images/s", detail="views resident on the GPU"),
        Figure("jpeg_gpu_aug", gpu, "images/s", (">=", 3200), "JPEG folder, data.augment_on=gpu"),
        Figure("gpu_aug_over_tensors", ratio, "ratio", (">=", 0.95), "the two rates, side by side in one process"),
    ]


def throughput_cpu_aug(out: Path, log: Path, args) -> list[Figure]:
    rate = number(grep(log, THROUGHPUT.format(mode="pipeline")))
    return [Figure("jpeg_cpu_aug", rate, "images/s", detail="JPEG folder, PIL augmentation in the data workers")]


def step_overhead(out: Path, log: Path, args) -> list[Figure]:
    ratio = number(grep(log, r"^densecl/mocov2 step-time ratio: (\d+\.\d+)"))
    return [Figure("densecl_over_mocov2", ratio, "ratio", ("<=", 1.02), "median step times, alternated")]


def chain(out: Path, log: Path, args) -> list[Figure]:
    figures = []
    for stage in args.stages:
        metric = STAGES[stage].headline[0]
        done = sorted((out / "chain").glob(f"runs/*/*/{stage}/DONE.json"))
        record = json.loads(done[-1].read_text()) if done else {"metrics": {}}
        value = record["metrics"].get(metric)
        figures.append(Figure(stage, value, metric, detail=str(done[-1].parent) if done else "no DONE.json"))
        figures.append(Figure(f"{stage}_seconds", record.get("seconds"), "s", detail="the stage's wall time"))
    return figures


def mini_paper_gpu(out: Path, log: Path, args) -> list[Figure]:
    jobs = [p for p in (out / "mini_paper_gpu").glob("multirun/*/*") if (p / "mlflow_run.json").exists()]
    done = [p for p in jobs if (p / "probe" / "DONE.json").is_file()]  # the last stage of every job
    return [
        Figure("sweep_seconds", args.seconds, "s", ("<=", 480), f"{args.jobs} jobs side by side, and the report"),
        Figure("jobs_done", len(done), "jobs", ("==", args.jobs), f"{len(done)} of {len(jobs)} job folders"),
    ]


def mini_paper_gpu_report(out: Path, log: Path, args) -> list[Figure]:
    table = out / "mini_paper_gpu_report" / "table.csv"
    if not table.is_file():
        return [Figure("claim_met", None, "metrics", detail=f"{table} missing")]
    rows = {row["model"]: row for row in csv.DictReader(table.open())}
    held, lines = 0, []
    checked = [m for m in CLAIM_METRICS if all(rows.get(k, {}).get(f"{m} mean") for k in CLAIM_ORDER)]
    for metric in checked:
        means = [float(rows[k][f"{metric} mean"]) for k in CLAIM_ORDER]
        ok = means[0] > means[1] > means[2]
        held += ok
        lines.append(f"{metric}: " + " > ".join(f"{k} {v:.2f}" for k, v in zip(CLAIM_ORDER, means))
                     + (" holds" if ok else " does not hold"))
    value = held if checked else None
    return [Figure("claim_met", value, f"of {len(checked)} metrics", ("==", len(checked)), "; ".join(lines))]


STEPS = {f.__name__: f for f in (jpeg_folder, throughput_gpu_aug, throughput_cpu_aug, step_overhead, chain,
                                 mini_paper_gpu, mini_paper_gpu_report)}


def met(figure: Figure, tiny: bool) -> str:
    if figure.target is None or tiny or figure.value is None:
        return "n/a"
    op, bound = figure.target
    value = float(figure.value)
    return "yes" if {">=": value >= bound, "<=": value <= bound, "==": value == bound}[op] else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--rc", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--limit", type=int, required=True)
    parser.add_argument("--jobs", type=int, default=9, help="mini_paper_gpu: the jobs the sweep should finish")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--stages", type=lambda s: s.split(","), default=[],
                        help="chain: the stages it ran, comma-separated (pipelines/registry.py names)")
    args = parser.parse_args()
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or (args.step == "chain" and not args.stages):
        parser.error(f"--stages: {', '.join(unknown) or 'none given'} (stages: {', '.join(STAGES.names())})")
    log = args.out / f"{args.step}.log"
    status = "ok" if args.rc == 0 else "timeout" if args.rc in (124, 137) else "failed"
    for figure in STEPS[args.step](args.out, log, args):
        value = figure.value
        good = value is not None and not (isinstance(value, float) and math.isnan(value))
        shown = f"{value:.4g}" if isinstance(value, float) else str(value) if good else "nan"
        target = "".join(map(str, figure.target)) if figure.target else "none"
        detail = figure.detail if good else f"no figure: see {log.name}" + (f"; {figure.detail}" * bool(figure.detail))
        print(f"step={args.step} status={status if good else 'failed' if status == 'ok' else status} "
              f"figure={figure.name} value={shown} unit={figure.unit.replace(' ', '_') or '-'} target={target} "
              f"met={met(figure, args.tiny)} seconds={args.seconds:.0f} limit={args.limit} | {detail}")


if __name__ == "__main__":
    main()
