"""Pre-training DenseCL (MoCo v2 with λ = 0): the run's set-up around the Trainer, resume, and export.

A folder holds one run: `checkpoint.pt` (every state needed to continue exactly: model, optimiser, schedule,
scaler, queues, each rank's RNG), then `backbone.pth` and `pretrain_metrics.json` when it finishes. Run again
in the same folder, it returns the finished result, continues from the checkpoint, or refuses a checkpoint
written with other settings (densecl.resume).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from densecl.data.augment import TwoViewAugmentation
from densecl.data.gpu_augment import DeviceTwoViewAugmentation, TwoViewParams, collate_raw
from densecl.data.sampling import ResumableSampler, SeededBatchAugmentation, SeededViews, with_view_size
from densecl.data.settings import AugmentOn
from densecl.data.sources import UnlabeledImageFolder, build_pretrain_dataset, read_encoded
from densecl.distributed import DistEnv, init_distributed, resolve_device
from densecl.evaluation.correspondence import fixed_view_pairs
from densecl.evaluation.quality import QUALITY_EVALS, QualitySet
from densecl.files import write_json
from densecl.method.model import DenseCL
from densecl.resume import Reuse, reuse
from densecl.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, saved_config
from densecl.training.hooks import FeatureQuality, LogMetrics, PeriodicCheckpoint, ProgressBar, StopWhenAsked
from densecl.training.optim import build_optimizer, build_scheduler
from densecl.training.settings import Amp, PretrainConfig
from densecl.training.trainer import NonFiniteLossError, OnStep, Trainer, autocast_dtype, uses_channels_last
from densecl.weights.export import backbone_state_dict, save_backbone

BACKBONE_NAME = "backbone.pth"
METRICS_NAME = "pretrain_metrics.json"
log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    metrics: dict[str, float]
    backbone_path: Path
    checkpoint_path: Path
    iterations: int
    completed: bool


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | os.PathLike,
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PretrainResult:
    """Train into `out_dir` (see the module doc for what a rerun there does).

    on_step(step, metrics) runs on global rank 0 every `pretrain.log_every` iterations and at the last one;
    should_stop() is polled after each iteration: when True, a checkpoint is written and the run returns.
    """
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    env, created_group = init_distributed(device)
    try:
        cfg.validate(env.world_size)
        device = prepare_device(cfg, env, device)
        return _pretrain(cfg, out_dir, device, env, on_step, should_stop)
    finally:
        if created_group:
            dist.destroy_process_group()


def prepare_device(cfg: PretrainConfig, env: DistEnv, device: torch.device) -> torch.device:
    """This process's device, and the determinism and kernel choices the config asks for."""
    if cfg.pretrain.sync_bn and env.world_size > 1 and device.type != "cuda":
        raise ValueError(
            f"pretrain.sync_bn=true needs CUDA devices (torch's SyncBatchNorm is GPU-only; this run is on "
            f"{device.type}): use the default pretrain.shuffle_bn=true on CPU"
        )
    if device.type != "cuda" and cfg.pretrain.amp == Amp.fp16:
        warnings.warn(f"amp='fp16' is ignored on {device.type}: use amp='bf16' there, or fp32 (amp='none')",
                      stacklevel=3)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank if torch.cuda.device_count() > 1 else 0)
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.pretrain.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def model_from_settings(cfg: PretrainConfig) -> DenseCL:
    """The model a pre-training config describes (its values are checked by `cfg.validate()`)."""
    return DenseCL(
        arch=cfg.backbone.arch,
        feat_dim=cfg.model.feat_dim,
        num_regions=cfg.model.num_regions,
        queue_len=cfg.pretrain.queue_len,
        momentum=cfg.model.momentum,
        temperature=cfg.model.temperature,
        loss_lambda=cfg.model.loss_lambda,
        matching=cfg.matching.name,
        bn_splits=cfg.pretrain.bn_splits,
    )


def load_trained_model(checkpoint_path: str | os.PathLike) -> tuple[DenseCL, PretrainConfig]:
    """The DenseCL model of a training checkpoint (all weights, queues included), in eval mode."""
    state = load_checkpoint(Path(checkpoint_path))
    cfg = saved_config(state)
    model = model_from_settings(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def build_model(cfg: PretrainConfig, env: DistEnv, device: torch.device) -> DenseCL:
    """The same initial weights on every rank (drawn from the seed), placed and laid out for training."""
    torch.manual_seed(cfg.seed)
    model = model_from_settings(cfg)
    model.shuffle_bn = cfg.pretrain.shuffle_bn and not cfg.pretrain.sync_bn
    if env.world_size > 1 and cfg.pretrain.sync_bn:
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    model.to(device)
    if uses_channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    if cfg.pretrain.compile:
        compile_encoders(model)
    return model


def batch_augmentation(cfg: PretrainConfig, rank: int) -> SeededBatchAugmentation | None:
    """What the trainer applies to each loader batch: nothing for augment_on=cpu (the loader yields views)."""
    if cfg.data.augment_on != AugmentOn.gpu:
        return None
    return SeededBatchAugmentation(DeviceTwoViewAugmentation(cfg.pretrain.crop_size), cfg.seed, rank)


def build_dataset(cfg: PretrainConfig) -> SeededViews:
    """The configured images, each turned into two seeded views of `pretrain.crop_size`; with augment_on=gpu,
    into the image as read and its two views' boxes and flips (TwoViewParams, batched by gpu_augment.collate_raw)."""
    data = cfg.data
    on_gpu = data.augment_on == AugmentOn.gpu
    base = build_pretrain_dataset(
        data.kind,
        transform=(TwoViewParams if on_gpu else TwoViewAugmentation)(cfg.pretrain.crop_size),
        root=data.root,
        num_images=data.num_images,
        image_size=data.image_size,
        seed=data.seed,
        cache_dir=data.cache_dir,
    )
    if on_gpu and isinstance(base, UnlabeledImageFolder):
        base.read = read_encoded  # JPEGs stay encoded until the device
    return SeededViews(base, cfg.seed)


def compile_encoders(model: DenseCL) -> None:
    """torch.compile each encoder in place (nn.Module.compile): the parameters and state-dict keys stay the
    module's own (no `_orig_mod.` in checkpoints or the export), the optimiser, the momentum update and a
    resume write into the same tensors, and the DDP wrapper put around encoder_q later calls the compiled
    forward. Only the encoders: shuffle-BN's permutation, matching and the loss stay eager."""
    model.encoder_q.compile()
    model.encoder_k.compile()


def _pretrain(cfg, out_dir: Path, device, env: DistEnv, on_step, should_stop) -> PretrainResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, backbone_path = out_dir / CHECKPOINT_NAME, out_dir / BACKBONE_NAME
    model = build_model(cfg, env, device)
    optimizer = build_optimizer(cfg, model, env.world_size)
    dataset = build_dataset(cfg)
    steps_per_epoch, total_steps = cfg.schedule(len(dataset), env.world_size)
    if env.rank == 0:
        warn_if_queue_holds_own_keys(cfg.pretrain.queue_len, len(dataset), total_steps * cfg.pretrain.batch_size
                                     * env.world_size)
    scheduler = build_scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    augment = batch_augmentation(cfg, env.rank)  # augment_on=gpu: the loader yields raw batches
    trainer = Trainer(model, optimizer, scheduler, scaler, cfg, device, env, total_steps, ckpt_path, augment)

    state = load_checkpoint(ckpt_path, device) if ckpt_path.exists() else None
    saved = saved_config(state).to_dict() if state is not None else None
    finished = state is not None and state["step"] == total_steps and backbone_path.exists()
    decision = reuse(ckpt_path, saved, cfg.to_dict(), finished, schema=PretrainConfig)
    if decision is Reuse.DONE:
        return PretrainResult(dict(state["metrics"]), backbone_path, ckpt_path, total_steps, completed=True)
    if decision is Reuse.RESUME:
        trainer.load_state_dict(state)
        log.info("resumed from %s at iteration %d of %d", ckpt_path, trainer.step, total_steps)
    else:
        torch.manual_seed(cfg.seed + env.rank)  # per-rank randomness (random matching) after the shared init
    if env.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model.encoder_q, device_ids=[device.index] if device.type == "cuda" else None
        )
        model.set_query_runner(ddp)
    model.train()

    train = cfg.pretrain
    sampler = ResumableSampler(len(dataset), train.batch_size, env.rank, env.world_size, cfg.seed, trainer.step,
                               total_steps)
    # The loader's own generator: its iterator draws the workers' base seed, which would otherwise come from the
    # global RNG right after a resume restored it, shifting the stream that split BN and random matching use.
    # (The base seed itself matters nowhere: every sample is seeded from (seed, epoch, index).)
    loader = DataLoader(dataset, batch_size=train.batch_size, sampler=sampler, num_workers=train.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        collate_fn=None if augment is None else collate_raw, generator=torch.Generator())
    try:
        completed = trainer.train(loader, training_hooks(cfg, trainer, dataset, on_step, should_stop))
    except NonFiniteLossError as err:
        kept = ckpt_path if ckpt_path.exists() else "none written yet"
        raise NonFiniteLossError(f"{err}: stopping; the last good checkpoint ({kept}) is kept") from None
    if completed:
        export(trainer, out_dir)
    return PretrainResult(trainer.metrics, backbone_path, ckpt_path, trainer.step, completed)


def training_hooks(cfg: PretrainConfig, trainer: Trainer, dataset, on_step, should_stop) -> list:
    train, main = cfg.pretrain, trainer.env.is_main
    eval_pairs = None
    if train.corr_eval_crop is not None and main:
        eval_pairs = fixed_view_pairs(with_view_size(dataset, train.corr_eval_crop), train.corr_eval_pairs)
    hooks = [LogMetrics(train.log_every, on_step, eval_pairs, train.corr_eval_every)]
    if train.eval_every != 0 and main:
        every = train.eval_every or max(1, trainer.total_steps // QUALITY_EVALS)
        if train.eval_data == "scenes":
            data = QualitySet.scenes(train.eval_num_train, train.eval_num_val, train.eval_size)
        else:
            data = QualitySet.voc(train.eval_data, train.eval_num_train, train.eval_num_val, train.eval_size)
        hooks.append(FeatureQuality(data, every, on_step))
    if train.progress and main and trainer.step < trainer.total_steps:
        hooks.append(ProgressBar())
    hooks.append(PeriodicCheckpoint(train.ckpt_every))
    if should_stop is not None:
        hooks.append(StopWhenAsked(should_stop))
    return hooks


def export(trainer: Trainer, out_dir: Path) -> None:
    """The last checkpoint, then (rank 0) the query backbone under torchvision's names and the final metrics."""
    if trainer.step != trainer.total_steps:
        raise RuntimeError(f"the data loader ended at iteration {trainer.step} of {trainer.total_steps}")
    trainer.save_checkpoint()
    if trainer.env.rank == 0:
        weights = backbone_state_dict(trainer.model.state_dict())
        save_backbone(weights, out_dir / BACKBONE_NAME, trainer.cfg.backbone.arch)
        write_json(out_dir / METRICS_NAME, trainer.metrics)
    if trainer.env.world_size > 1:
        dist.barrier()


QUEUE_SHARE_WARNING = 0.25  # MoCo's ImageNet queue holds 65536 of 1.28M images, 5%


def warn_if_queue_holds_own_keys(queue_len: int, num_images: int, num_samples: int) -> None:
    """Once images repeat, an image whose key from its last visit is still queued meets itself as a negative:
    instance discrimination then pushes apart two views of one image. A queue that holds a large share of
    the data set (or all of it, many times over) makes that the rule rather than the exception, so say so
    before hours of training."""
    if num_samples > num_images and queue_len > QUEUE_SHARE_WARNING * num_images:
        share = min(queue_len / num_images, 1.0)
        warnings.warn(
            f"queue_len={queue_len} with {num_images} images seen {num_samples / num_images:.1f} times each: "
            f"from the second epoch on, {share:.0%} of the images find their own earlier key in the queue as a "
            f"negative. Use more images (data.num_images for synthetic scenes; {num_samples} makes every image "
            f"new) or a queue under {QUEUE_SHARE_WARNING:.0%} of the data set",
            stacklevel=4,  # the caller of pretrain()
        )
