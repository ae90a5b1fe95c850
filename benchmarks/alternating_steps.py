"""Train steps of several configurations, alternated step by step in one process.

step_overhead.py times DenseCL and MoCo v2 this way: machine noise then hits every configuration alike, so
the ratio of their medians means something on a shared, busy machine. pretrain_throughput.py builds its single
run with `build_run` too.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from densecl.distributed import DistEnv
from densecl.method.settings import BackboneConfig, ModelConfig
from densecl.training.optim import build_optimizer, build_scheduler
from densecl.training.pretrain import build_model
from densecl.training.settings import PretrainConfig, TrainingConfig
from densecl.training.trainer import Trainer, autocast_dtype


def bench_config(arch: str, size: int, batch: int, queue_len: int, loss_lambda: float = 0.5,
                 **pretrain) -> PretrainConfig:
    """A one-process run of `arch` at `size` px; keyword arguments are `pretrain` section fields."""
    train = {"iters": 1, "epochs": None, **pretrain}
    return PretrainConfig(
        backbone=BackboneConfig(arch=arch),
        model=ModelConfig(loss_lambda=loss_lambda),
        pretrain=TrainingConfig(crop_size=size, batch_size=batch, queue_len=queue_len, **train),
    )


def build_run(cfg: PretrainConfig, device: torch.device) -> Trainer:
    """A Trainer laid out as the engine lays it out, to step by hand with `run_step` (no loader, no hooks)."""
    env = DistEnv(rank=0, world_size=1, local_rank=0)
    model = build_model(cfg, env, device)
    optimizer = build_optimizer(cfg, model, world_size=1)
    scheduler = build_scheduler(cfg, optimizer, total_steps=cfg.pretrain.iters or 1, steps_per_epoch=1)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    model.train()
    return Trainer(model, optimizer, scheduler, scaler, cfg, device, env, cfg.pretrain.iters or 1, Path("unused"))


def time_alternately(runs: dict[str, Trainer], batch: int, size: int, device: torch.device, warmup: int,
                     iters: int) -> dict[str, list[float]]:
    """Seconds per step of each run after `warmup` untimed rounds, on one fixed batch of random views."""
    views = torch.randn(batch, 2, 3, size, size, device=device)
    boxes = torch.tensor([[0.0, 0.0, size, size]], device=device).expand(batch, 2, 4)
    flips = torch.zeros(batch, 2, dtype=torch.bool, device=device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + iters):
        for name, trainer in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.run_step(views, boxes, flips)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
