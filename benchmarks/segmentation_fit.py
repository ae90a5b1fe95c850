"""Can the FCN stage fit its own training set? Train it from random init on a synthetic set and evaluate on
that same training set: the train-set mIoU separates a stage that cannot learn (misaligned labels, wrong
classes, a broken schedule: low on every set) from a task that is hard (low on the textured set, high on the
colour-cue set, rising with more iterations).

Each run is the `synthetic` downstream group's seg_voc stage (conf/downstream/synthetic.yaml: the synthetic
preset at batch 4, lr 0.04) on one set, for a given number of iterations, optionally without the photometric
distortion. Prints one table row per run: set, iterations, train-set mIoU, per-class IoU.
Usage: python benchmarks/segmentation_fit.py [--quick] [--runs texture:300 colour-large:300 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import yaml

from densecl.data.synthetic import CLASS_NAMES
from densecl.transfer.settings import SegmentationConfig, SyntheticSet

CONF = Path(__file__).resolve().parents[1] / "conf" / "downstream"
# name -> SyntheticSet options beyond conf/downstream/synthetic.yaml's set (96 train scenes, 160 px, seed 0)
SETS = {
    "texture": {},  # the `synthetic` group's set: classes told apart by texture family, objects 10-25% of the side
    "colour-large": {"class_cue": "colour", "object_size": (0.2, 0.45)},  # the default run's (first_run.yaml)
    "colour": {"class_cue": "colour"},  # one colour per class, the textured set's object sizes
}
DEFAULT_RUNS = ("texture:300", "colour-large:300", "colour:300", "texture:300:nophoto", "texture:900")
QUICK_RUNS = ("texture:20", "colour-large:20")


@dataclasses.dataclass
class Run:
    set_name: str
    iterations: int
    photometric: bool = True

    @classmethod
    def parse(cls, text: str) -> Run:
        """SET:ITERATIONS[:nophoto]"""
        parts = text.split(":")
        if len(parts) not in (2, 3) or parts[0] not in SETS or (len(parts) == 3 and parts[2] != "nophoto"):
            raise ValueError(f"run {text!r}: expected SET:ITERATIONS[:nophoto] with SET one of {', '.join(SETS)}")
        return cls(parts[0], int(parts[1]), len(parts) == 2)

    def label(self) -> str:
        return self.set_name + ("" if self.photometric else ", no photometric")


def stage_config(run: Run, cache_dir: str, num_train: int | None = None) -> SegmentationConfig:
    """The `synthetic` group's seg_voc stage for `run`, evaluated on its own training set."""
    group = yaml.safe_load((CONF / "synthetic.yaml").read_text())
    synthetic = SyntheticSet(**{**group["synthetic"], **SETS[run.set_name]})
    if num_train is not None:
        synthetic = dataclasses.replace(synthetic, num_train=num_train, num_val=1)
    section = {**group["seg_voc"], "max_iter": run.iterations, "photometric": run.photometric,
               "test_dataset": "synthetic_seg_train", "progress": False}
    return SegmentationConfig.from_section(section, arch="resnet18", device="cpu", seed=0, synthetic=synthetic,
                                           cache_dir=cache_dir)


def fit(run: Run, work_dir: str, num_train: int | None = None) -> dict[str, float]:
    """Train the stage for `run` in work_dir and return its train-set metrics (mIoU, IoU-<class>, ...)."""
    from densecl.transfer.segmentation import run_semantic_segmentation

    cfg = stage_config(run, str(Path(work_dir) / "cache"), num_train)
    name = f"{run.set_name}-{run.iterations}{'' if run.photometric else '-nophoto'}"
    return run_semantic_segmentation(cfg, None, str(Path(work_dir) / name))


def table(rows: list[tuple[Run, dict[str, float], float]]) -> str:
    classes = ["background", *CLASS_NAMES]
    lines = ["| set | iterations | train mIoU | " + " | ".join(classes) + " | time (s) |",
             "|---|---|---|" + "---|" * len(classes) + "---|"]
    for run, metrics, seconds in rows:
        ious = [f"{metrics[f'IoU-{c}']:.1f}" if f"IoU-{c}" in metrics else "-" for c in classes]
        lines.append(f"| {run.label()} | {run.iterations} | {metrics['mIoU']:.2f} | " + " | ".join(ious)
                     + f" | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", help=f"SET:ITERATIONS[:nophoto]; default {' '.join(DEFAULT_RUNS)}")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {' '.join(QUICK_RUNS)} on 8 scenes")
    parser.add_argument("--work-dir", help="where sets and runs are written (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [Run.parse(r) for r in (args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS))]
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or tmp
        rows = []
        for run in runs:
            start = time.perf_counter()
            metrics = fit(run, work_dir, num_train=8 if args.quick else None)
            rows.append((run, metrics, time.perf_counter() - start))
            print(f"{run.label()}, {run.iterations} it: train mIoU {metrics['mIoU']:.2f}", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
