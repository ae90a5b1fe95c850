"""What runs around the pre-training loop's steps (densecl.training.trainer): log, evaluate the features,
checkpoint, stop for preemption, show progress."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from densecl.evaluation.correspondence import ViewPairs, evaluate_correspondence
from densecl.evaluation.quality import QualitySet, evaluate_features
from densecl.training.trainer import Hook, OnStep, Trainer

# averaged over the log window rather than taken at its last step: per-batch values are noisy fractions
WINDOW_MEAN_METRICS = ("corr_acc", "corr_acc_chance")


class LogMetrics(Hook):
    """Every `log_every` iterations and at the last: the step's losses, window means of the noisy per-batch
    fractions, lr, λ, throughput and, every `eval_every`, correspondence accuracy on fixed view pairs (also
    before the first step). Kept as `trainer.metrics`; handed to `on_step` on the main process."""

    def __init__(self, log_every: int, on_step: OnStep | None, eval_pairs: ViewPairs | None = None,
                 eval_every: int = 0):
        self.log_every, self.on_step = log_every, on_step
        self.eval_pairs, self.eval_every = eval_pairs, eval_every

    def before_train(self, trainer: Trainer) -> None:
        if self.eval_pairs is not None and trainer.step == 0 and self.on_step is not None:
            self.on_step(0, evaluate_correspondence(trainer.model, self.eval_pairs, trainer.device))
        self._new_window()

    def _new_window(self) -> None:
        self.start, self.images = time.perf_counter(), 0
        self.window: dict[str, list[float]] = {key: [] for key in WINDOW_MEAN_METRICS}

    def after_step(self, trainer: Trainer) -> None:
        self.images += trainer.batch_images
        for key, values in self.window.items():
            if key in trainer.outputs and not torch.isnan(trainer.outputs[key]):
                values.append(float(trainer.outputs[key]))
        step = trainer.step
        if step % self.log_every != 0 and step != trainer.total_steps:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {k: float(v) for k, v in trainer.outputs.items() if k not in self.window}
        metrics.update({k: float(np.mean(v)) for k, v in self.window.items() if v})
        metrics.update(lr=trainer.optimizer.param_groups[0]["lr"], images_per_sec=self.images / elapsed,
                       **{"lambda": trainer.loss_lambda})
        if self.eval_pairs is not None and (step % self.eval_every == 0 or step == trainer.total_steps):
            metrics.update(evaluate_correspondence(trainer.model, self.eval_pairs, trainer.device))
        trainer.metrics = metrics
        if self.on_step is not None and trainer.env.is_main:
            self.on_step(step, dict(metrics))
        self._new_window()


class PeriodicCheckpoint(Hook):
    def __init__(self, every: int):
        self.every = every

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0 and trainer.step < trainer.total_steps:
            trainer.save_checkpoint()


class StopWhenAsked(Hook):
    """Polls `should_stop` (preemption) after each step, on every rank: when it answers True, checkpoint and
    stop, so that the requeued run resumes there."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step < trainer.total_steps and self.should_stop():
            trainer.save_checkpoint()
            trainer.stopped = True


class ProgressBar(Hook):
    def before_train(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="pretrain", dynamic_ncols=True)

    def after_step(self, trainer: Trainer) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(trainer.outputs['loss']):.3f}", refresh=False)

    def after_train(self, trainer: Trainer) -> None:
        self.bar.close()


class FeatureQuality(Hook):
    """Scores the query backbone before the first step, every `every` steps and at the last (main process),
    logs the figures through `on_step` and adds them to `trainer.metrics`."""

    def __init__(self, data: QualitySet, every: int, on_step: Callable | None, seed: int = 0):
        self.data, self.every, self.on_step, self.seed = data, every, on_step, seed

    def before_train(self, trainer: Trainer) -> None:
        if trainer.step == 0:
            self._score(trainer, 0)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.total_steps:
            self._score(trainer, trainer.step)

    def _score(self, trainer: Trainer, step: int) -> None:
        metrics = evaluate_features(trainer.model.encoder_q.backbone, self.data, trainer.device, self.seed)
        if step == trainer.total_steps:
            trainer.metrics = {**trainer.metrics, **metrics}
        if self.on_step is not None:
            self.on_step(step, dict(metrics))
