"""SGD over the query encoder, its linearly scaled learning rate and its schedule."""

from __future__ import annotations

import math

import torch

from densecl.training.settings import LrSchedule, PretrainConfig


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module, world_size: int) -> torch.optim.SGD:
    params = [p for p in model.encoder_q.parameters() if p.requires_grad]
    train = cfg.pretrain
    return torch.optim.SGD(
        params, lr=train.scaled_lr(world_size), momentum=train.sgd_momentum, weight_decay=train.weight_decay
    )


def lr_factor(step: int, total_steps: int, warmup_iters: int, steps_per_epoch: int | None = None) -> float:
    """Linear warm-up, then cosine annealing to 0 over the iterations; given `steps_per_epoch`, the cosine
    moves once per epoch instead (mmcv's CosineAnnealing with by_epoch, as the official configs run)."""
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if steps_per_epoch is not None:
        progress = (step // steps_per_epoch) / max(1, total_steps // steps_per_epoch)
    else:
        progress = (step - warmup_iters) / max(1, total_steps - warmup_iters)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(cfg: PretrainConfig, optimizer, total_steps: int, steps_per_epoch: int):
    per_epoch = steps_per_epoch if cfg.pretrain.lr_schedule == LrSchedule.epoch else None
    warmup = cfg.pretrain.warmup_iters
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, per_epoch)
    )


def lambda_at(cfg: PretrainConfig, step: int) -> float:
    """The dense loss weight λ at a step: 0 during `model.lambda_warmup_iters`."""
    return 0.0 if step < cfg.model.lambda_warmup_iters else cfg.model.loss_lambda
