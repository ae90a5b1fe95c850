"""Train steps of several configurations, alternated step by step in one process.

Shared by the side-by-side benchmarks (step_overhead.py, amp_speedup.py): machine noise then hits every
configuration alike, so the ratio of their medians means something on a shared, busy machine.
pretrain_throughput.py builds its single run with `build_run` too.
"""

from __future__ import annotations

import time

import torch

from densecl.engine import PretrainConfig, autocast_dtype, build_model, build_optimizer, train_step, uses_channels_last


def build_run(cfg: PretrainConfig, device: torch.device) -> tuple:
    """(cfg, model, optimizer, grad scaler) ready for `train_step`, laid out as the engine lays them out."""
    model = build_model(cfg).to(device)
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, world_size=1)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    return cfg, model, optimizer, scaler


def time_alternately(runs: dict[str, tuple], batch: int, size: int, device: torch.device, warmup: int,
                     iters: int) -> dict[str, list[float]]:
    """Seconds per step of each run after `warmup` untimed rounds, on one fixed batch of random views."""
    views = torch.randn(batch, 2, 3, size, size, device=device)
    boxes = torch.tensor([[0.0, 0.0, size, size]], device=device).expand(batch, 2, 4)
    flips = torch.zeros(batch, 2, dtype=torch.bool, device=device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + iters):
        for name, (cfg, model, optimizer, scaler) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, scaler, views, boxes, flips, cfg, device, loss_lambda=cfg.loss_lambda)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
