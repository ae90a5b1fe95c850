"""What the feature-quality signals (densecl.evaluation.quality) cost: the default run's pre-training (or any overrides
of it) with the signals at their default, timing the signals themselves (the labelled scenes, then each
evaluation) against the whole pre-training. Timing the signals inside one run is immune to the machine's
drift between two runs, which on a shared VM is larger than the signals' cost.
Usage: python benchmarks/quality_cost.py [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import densecl.evaluation.quality
import densecl.training.pretrain
from densecl.training.pretrain import pretrain
from pipelines import schema


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="pipeline overrides, e.g. pretrain.iters=60")
    return parser.parse_args()


class Stopwatch:
    """Wraps a function and adds up the seconds spent in it."""

    def __init__(self, function):
        self.function, self.seconds, self.calls = function, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def main() -> None:
    args = parse_args()
    settings = schema.settings(schema.compose(["pretrain.progress=false", *args.overrides],
                                              return_hydra_config=False))
    cfg = settings.pretrain_config()
    evaluations = Stopwatch(densecl.evaluation.quality.evaluate_features)
    scenes = Stopwatch(densecl.evaluation.quality.QualitySet.scenes)
    densecl.evaluation.quality.evaluate_features = evaluations
    densecl.training.pretrain.QualitySet.scenes = scenes
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = pretrain(cfg, Path(tmp) / "pretrain")
        total = time.perf_counter() - start
    signals = evaluations.seconds + scenes.seconds
    print(f"pre-training: {result.iterations} iterations, eval_every={cfg.pretrain.eval_every}, {total:.1f} s")
    print(f"  labelled scenes: {scenes.seconds:.2f} s; {evaluations.calls} evaluations: {evaluations.seconds:.2f} s")
    print(f"  signals: {signals:.1f} s = {100 * signals / total:.1f}% of the pre-training "
          f"({100 * signals / (total - signals):.1f}% on top of it)")


if __name__ == "__main__":
    main()
