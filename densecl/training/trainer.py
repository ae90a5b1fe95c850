"""The pre-training loop: one SGD step, and hooks that act after it (log, evaluate, checkpoint, stop for
preemption, show progress), after detectron2's TrainerBase and its hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from densecl.distributed import DistEnv
from densecl.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from densecl.training.optim import lambda_at
from densecl.training.settings import Amp, PretrainConfig

OnStep = Callable[[int, dict[str, float]], None]
# a loader batch, the device and the step -> (views, boxes, flips) on the device (sampling.SeededBatchAugmentation)
BatchAugment = Callable[[Any, torch.device, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    pass


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on any device, fp16 on CUDA only (CPU has no fast fp16 kernels and needs no grad scaler)."""
    if cfg.pretrain.amp == Amp.bf16:
        return torch.bfloat16
    if cfg.pretrain.amp == Amp.fp16 and device.type == "cuda":
        return torch.float16
    return None


def uses_channels_last(cfg: PretrainConfig, device: torch.device) -> bool:
    return cfg.pretrain.channels_last and (device.type == "cuda" or autocast_dtype(cfg, device) == torch.bfloat16)


class Hook:
    """What runs around the loop: before the first step, after each step, after the last (also on error)."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """Steps DenseCL over a loader from `step` to `total_steps`; the hooks see it after every step."""

    def __init__(self, model, optimizer, scheduler, scaler, cfg: PretrainConfig, device: torch.device,
                 env: DistEnv, total_steps: int, checkpoint_path: Path, augment: BatchAugment | None = None):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.augment = augment  # None: the loader yields (views, boxes, flips); else raw batches, augmented here
        self.cfg, self.device, self.env = cfg, device, env
        self.total_steps = total_steps
        self.checkpoint_path = checkpoint_path
        self.step = 0  # iterations done
        self.metrics: dict[str, float] = {}  # the last logged ones: checkpoints carry them
        self.outputs: dict[str, torch.Tensor] = {}  # the last step's losses and statistics
        self.loss_lambda = cfg.model.loss_lambda  # the last step's λ
        self.batch_images = 0  # images in the last step, over all processes
        self.stopped = False  # set by a hook: the loop ends after this step
        self.hooks: list[Hook] = []

    def train(self, loader: Iterable, hooks: Sequence[Hook] = ()) -> bool:
        """Run to the end of the loader or until a hook stops it; True when it ran to the end."""
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.before_train(self)
        try:
            for batch in loader:
                views, boxes, flips = batch if self.augment is None else self.augment(batch, self.device, self.step)
                self.run_step(views, boxes, flips)
                for hook in self.hooks:
                    hook.after_step(self)
                if self.stopped:
                    break
        finally:
            for hook in self.hooks:
                hook.after_train(self)
        return not self.stopped

    def run_step(self, views: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> None:
        """One SGD step on a batch of two-view pairs. Raises NonFiniteLossError before touching the weights."""
        device, lam = self.device, lambda_at(self.cfg, self.step)
        im_q, im_k = views.to(device, non_blocking=True).unbind(1)
        if uses_channels_last(self.cfg, device):
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(self.cfg, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = self.model(im_q, im_k, boxes.to(device), flips.to(device), loss_lambda=lam)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(f"non-finite loss {loss.item()} at iteration {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.outputs = {k: v.detach() for k, v in out.items()}
        self.loss_lambda = lam
        self.batch_images = views.shape[0] * self.env.world_size

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "metrics": self.metrics,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where a checkpoint left off; each rank takes its own RNG stream back."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rank = self.env.rank
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        self.step, self.metrics = state["step"], dict(state.get("metrics", {}))

    def save_checkpoint(self) -> None:
        """On rank 0, with every rank's RNG state, so that each resumes its own stream."""
        states = [rng_state()]
        if self.env.world_size > 1:
            states = [None] * self.env.world_size
            dist.all_gather_object(states, rng_state())
        if self.env.rank == 0:
            save_checkpoint(self.checkpoint_path, {**self.state_dict(), "rng": states})
        if self.env.world_size > 1:
            dist.barrier()
