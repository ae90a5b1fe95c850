"""Pre-training engine: data order, optimisation, AMP, DDP, atomic checkpoints and exact resume.

Resume is exact on CPU with deterministic settings because nothing depends on history that a checkpoint
does not hold: each sample's augmentation is seeded from (seed, epoch, index), the data order from
(seed, epoch), and the model/optimiser/scheduler/scaler/queues/RNG states are saved together.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from densecl.backbone import ARCHS
from densecl.correspondence_eval import evaluate_correspondence, fixed_view_pairs
from densecl.distributed import init_distributed
from densecl.export import backbone_state_dict, save_backbone
from densecl.model import DenseCL, validate_hyperparameters
from densecl.saved_config import changed_settings

CHECKPOINT_NAME = "checkpoint.pt"
BACKBONE_NAME = "backbone.pth"
AMP_MODES = ("none", "bf16", "fp16")
DATA_KINDS = ("synthetic", "image_folder")
LR_REFERENCE_BATCH = 256
# averaged over the log window rather than taken at its last step: per-batch values are noisy fractions
WINDOW_MEAN_METRICS = ("corr_acc", "corr_acc_chance")
CORR_EVAL_KEYS = {"corr_eval_crop", "corr_eval_pairs", "corr_eval_every"}
log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    kind: str = "synthetic"  # "synthetic" | "image_folder"
    root: str | None = None  # image_folder: any tree of images
    num_images: int = 2048  # synthetic: number of scenes
    image_size: int = 160  # synthetic: scene side in pixels
    seed: int = 0  # synthetic: scene seed


@dataclass
class PretrainConfig:
    arch: str = "resnet50"
    feat_dim: int = 128
    num_regions: int | None = None  # S; None keeps the native grid (7x7 at 224)
    matching: str = "backbone"  # backbone | projection | random | geometric
    loss_lambda: float = 0.5  # 0 = MoCo v2
    lambda_warmup_iters: int = 0  # lambda = 0 for the first N iterations
    temperature: float = 0.2
    momentum: float = 0.999
    queue_len: int = 65536
    data: DataConfig = field(default_factory=DataConfig)
    crop_size: int = 224
    batch_size: int = 32  # per process
    num_workers: int = 4
    base_lr: float = 0.03  # for a total batch of 256, scaled linearly
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    warmup_iters: int = 0  # linear lr warm-up
    iters: int | None = None  # exactly one of iters / epochs
    epochs: int | None = 200
    amp: str = "none"  # none | bf16 | fp16; on CPU only bf16 (oneDNN runs it about 2x faster than fp32 there)
    channels_last: bool = True  # on GPU, and on CPU under bf16 (no gain for fp32 on CPU)
    sync_bn: bool = False
    shuffle_bn: bool = True
    bn_splits: int = 1  # BN groups per process (densecl.split_bn): emulates per-GPU BN and shuffle-BN in one process
    corr_eval_crop: int | None = None  # e.g. 160: correspondence accuracy on fixed view pairs at this crop
    corr_eval_pairs: int = 64
    corr_eval_every: int = 100  # iterations; a multiple of log_every (also at 0 and at the end)
    seed: int = 0
    deterministic: bool = False
    ckpt_every: int = 1000
    log_every: int = 10
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        values = dict(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown pre-training config keys {unknown}; expected keys among {sorted(known)}")
        data = values.pop("data", {}) or {}
        data_cfg = data if isinstance(data, DataConfig) else DataConfig(**data)
        return cls(data=data_cfg, **values)

    def validate(self, world_size: int = 1) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: expected one of {', '.join(ARCHS)}")
        validate_hyperparameters(
            self.matching, self.loss_lambda, self.num_regions, self.queue_len, self.momentum, self.temperature
        )
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp={self.amp!r}: expected one of {', '.join(AMP_MODES)}")
        if self.data.kind not in DATA_KINDS:
            raise ValueError(f"data.kind={self.data.kind!r}: expected one of {', '.join(DATA_KINDS)}")
        if (self.iters is None) == (self.epochs is None):
            raise ValueError(f"set exactly one of iters / epochs (got iters={self.iters}, epochs={self.epochs})")
        for name in ("iters", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: expected a positive number")
        for name in ("batch_size", "crop_size", "ckpt_every", "log_every", "feat_dim", "bn_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.lambda_warmup_iters < 0 or self.warmup_iters < 0 or self.num_workers < 0:
            raise ValueError("lambda_warmup_iters, warmup_iters and num_workers must be >= 0")
        if self.corr_eval_crop is not None:
            if self.corr_eval_crop < 32 or self.corr_eval_pairs < 1 or self.corr_eval_every < 1:
                raise ValueError(
                    f"corr_eval_crop={self.corr_eval_crop}, corr_eval_pairs={self.corr_eval_pairs}, "
                    f"corr_eval_every={self.corr_eval_every}: expected a crop >= 32 px and positive counts"
                )
            if self.corr_eval_every % self.log_every != 0:
                raise ValueError(
                    f"corr_eval_every={self.corr_eval_every} is not a multiple of log_every={self.log_every}"
                )
        if self.batch_size % self.bn_splits != 0:
            raise ValueError(
                f"batch_size={self.batch_size} does not split into bn_splits={self.bn_splits} equal BN groups"
            )
        if self.bn_splits > 1 and self.sync_bn:
            raise ValueError(f"bn_splits={self.bn_splits} with sync_bn=True: choose split BN or SyncBN, not both")
        global_batch = self.batch_size * world_size
        if self.queue_len % global_batch != 0:
            raise ValueError(
                f"queue_len={self.queue_len} is not divisible by the global batch {global_batch} "
                f"(batch_size={self.batch_size} x world_size={world_size}); keys are enqueued a batch at a time"
            )


@dataclass
class PretrainResult:
    metrics: dict[str, float]
    backbone_path: Path
    checkpoint_path: Path
    iterations: int
    completed: bool


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- data


SAMPLE_STREAM, ORDER_STREAM = 0, 1


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (stream id, seed, epoch, index...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededViews(Dataset):
    """Indexed by (epoch, index): the sample's augmentation RNG depends on nothing else."""

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(SAMPLE_STREAM, self.seed, epoch, index))
            return self.base[index]


class ResumableSampler(Sampler):
    """Yields (epoch, index) for this rank from a given global step to the end of training.

    Each epoch is a permutation drawn from (seed, epoch), cut into global batches (the tail that does not
    fill one is dropped); rank r takes the r-th slice of each. Starting at any step reproduces the order an
    uninterrupted run would have seen.
    """

    def __init__(self, num_samples, batch_size, rank, world_size, seed, start_step, total_steps):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.total_steps = total_steps
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(ORDER_STREAM, self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm, perm_epoch = None, None
        for step in range(self.start_step, self.total_steps):
            epoch, batch = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self.permutation(epoch), epoch
            start = batch * self.global_batch + self.rank * self.batch_size
            for index in perm[start : start + self.batch_size].tolist():
                yield epoch, index


def build_dataset(cfg: PretrainConfig) -> SeededViews:
    from densecl.datasets import build_pretrain_dataset
    from densecl.transforms import TwoViewAugmentation

    data = cfg.data
    base = build_pretrain_dataset(
        data.kind,
        transform=TwoViewAugmentation(cfg.crop_size),
        root=data.root,
        num_images=data.num_images,
        image_size=data.image_size,
        seed=data.seed,
    )
    return SeededViews(base, cfg.seed)


def with_view_size(dataset: SeededViews, crop_size: int) -> SeededViews:
    """The same images with views of another size, sharing the file list: no second walk of a large folder."""
    from densecl.transforms import TwoViewAugmentation

    base = copy.copy(dataset.base)
    base.transform = TwoViewAugmentation(crop_size)
    return SeededViews(base, dataset.seed)


# ---------------------------------------------------------------------------------------------- model


def build_model(cfg: PretrainConfig) -> DenseCL:
    return DenseCL(
        arch=cfg.arch,
        feat_dim=cfg.feat_dim,
        num_regions=cfg.num_regions,
        queue_len=cfg.queue_len,
        momentum=cfg.momentum,
        temperature=cfg.temperature,
        loss_lambda=cfg.loss_lambda,
        matching=cfg.matching,
        bn_splits=cfg.bn_splits,
    )


def scaled_lr(cfg: PretrainConfig, world_size: int) -> float:
    return cfg.base_lr * cfg.batch_size * world_size / LR_REFERENCE_BATCH


def build_optimizer(cfg: PretrainConfig, model: DenseCL, world_size: int) -> torch.optim.SGD:
    params = [p for p in model.encoder_q.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params, lr=scaled_lr(cfg, world_size), momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay
    )


def lr_factor(step: int, total_steps: int, warmup_iters: int) -> float:
    """Linear warm-up, then cosine annealing to 0 over the remaining iterations."""
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    progress = (step - warmup_iters) / max(1, total_steps - warmup_iters)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lambda_at(cfg: PretrainConfig, step: int) -> float:
    return 0.0 if step < cfg.lambda_warmup_iters else cfg.loss_lambda


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available on this machine")
    return device


def check_sync_bn(sync_bn: bool, world_size: int, device: torch.device) -> None:
    if sync_bn and world_size > 1 and device.type != "cuda":
        raise ValueError(
            f"sync_bn=True needs CUDA devices (torch's SyncBatchNorm is GPU-only; this run is on {device.type}): "
            "use the default shuffle_bn=True on CPU"
        )


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on any device, fp16 on CUDA only (CPU has no fast fp16 kernels and needs no grad scaler)."""
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.amp == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def uses_channels_last(cfg: PretrainConfig, device: torch.device) -> bool:
    return cfg.channels_last and (device.type == "cuda" or autocast_dtype(cfg, device) == torch.bfloat16)


def train_step(model, optimizer, scaler, views, boxes, flips, cfg, device, loss_lambda) -> dict[str, torch.Tensor]:
    """One SGD step on a batch of two-view pairs. Raises NonFiniteLossError before touching the weights."""
    views = views.to(device, non_blocking=True)
    im_q, im_k = views[:, 0], views[:, 1]
    if uses_channels_last(cfg, device):
        im_q = im_q.contiguous(memory_format=torch.channels_last)
        im_k = im_k.contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(cfg, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(im_q, im_k, boxes.to(device), flips.to(device), loss_lambda=loss_lambda)
    loss = out["loss"]
    if not torch.isfinite(loss.detach()):
        raise NonFiniteLossError(f"non-finite loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in out.items()}


# ----------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Temporary file, then rename: a crash mid-write never replaces the last good checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err


def load_trained_model(checkpoint_path: str | os.PathLike) -> tuple[DenseCL, PretrainConfig]:
    """The DenseCL model of a training checkpoint (all weights, queues included), in eval mode."""
    state = load_checkpoint(Path(checkpoint_path))
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def check_resumable(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    """A checkpoint from a different model or schedule cannot be continued: say which key differs."""
    # settings that change what is logged or when, never the weights
    ignored = {"num_workers", "progress", "log_every", "ckpt_every", "device"} | CORR_EVAL_KEYS
    diffs = [
        f"{key}: checkpoint {before!r} vs now {now!r}"
        for key, before, now in changed_settings(saved, asdict(cfg), PretrainConfig, ignored)
    ]
    if diffs:
        raise ValueError(
            f"{path} was written by a different configuration (move it away, or restore the settings): "
            + "; ".join(diffs)
        )


# ------------------------------------------------------------------------------------------- training


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | os.PathLike,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PretrainResult:
    """Train DenseCL (MoCo v2 when loss_lambda = 0) into out_dir, resuming from out_dir/checkpoint.pt.

    on_step(step, metrics) runs on global rank 0 every log_every iterations and at the last one;
    should_stop() is polled after each iteration: when True, a checkpoint is written and the run returns.
    """
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    env, created_group = init_distributed(device)
    try:
        return _pretrain(cfg, out_dir, device, env, on_step, should_stop)
    finally:
        if created_group:
            dist.destroy_process_group()


def _pretrain(cfg, out_dir, device, env, on_step, should_stop) -> PretrainResult:
    cfg.validate(env.world_size)
    check_sync_bn(cfg.sync_bn, env.world_size, device)
    warn_if_cpu_amp(cfg, device)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank if torch.cuda.device_count() > 1 else 0)
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, backbone_path = out_dir / CHECKPOINT_NAME, out_dir / BACKBONE_NAME

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    model.shuffle_bn = cfg.shuffle_bn and not cfg.sync_bn
    if env.world_size > 1 and cfg.sync_bn:
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    model.to(device)
    if uses_channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, env.world_size)
    dataset = build_dataset(cfg)
    global_batch = cfg.batch_size * env.world_size
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"the data set has {len(dataset)} images, fewer than one global batch of {global_batch}: "
            f"lower batch_size or add images"
        )
    total_steps = cfg.iters if cfg.iters is not None else cfg.epochs * steps_per_epoch
    if env.rank == 0:
        warn_if_queue_holds_own_keys(cfg.queue_len, len(dataset), total_steps * global_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_iters)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)

    start_step, last_metrics = 0, {}
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, device)
        check_resumable(state["config"], cfg, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0])
        start_step, last_metrics = state["step"], dict(state.get("metrics", {}))
        log.info("resumed from %s at iteration %d of %d", ckpt_path, start_step, total_steps)
    else:
        torch.manual_seed(cfg.seed + env.rank)  # per-rank randomness (random matching) after the shared init

    if env.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model.encoder_q, device_ids=[device.index] if device.type == "cuda" else None
        )
        model.set_query_runner(ddp)
    model.train()

    def checkpoint(step: int, metrics: dict) -> None:
        # every rank's RNG state travels with the checkpoint so each resumes its own stream
        states = [rng_state()]
        if env.world_size > 1:
            states = [None] * env.world_size
            dist.all_gather_object(states, rng_state())
        if env.rank == 0:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": states,
                "step": step,
                "metrics": metrics,
                "config": asdict(cfg),
            }
            save_checkpoint(ckpt_path, payload)
        if env.world_size > 1:
            dist.barrier()

    sampler = ResumableSampler(
        len(dataset), cfg.batch_size, env.rank, env.world_size, cfg.seed, start_step, total_steps
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    eval_pairs = None
    if cfg.corr_eval_crop is not None and env.is_main:
        eval_pairs = fixed_view_pairs(with_view_size(dataset, cfg.corr_eval_crop), cfg.corr_eval_pairs)
        if start_step == 0 and on_step is not None:
            on_step(0, evaluate_correspondence(model, eval_pairs, device))
    progress = None
    if cfg.progress and env.is_main and start_step < total_steps:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="pretrain", dynamic_ncols=True)

    step, completed = start_step, True
    window_start, window_images, window_means = time.perf_counter(), 0, {key: [] for key in WINDOW_MEAN_METRICS}
    try:
        for views, boxes, flips in loader:
            lam = lambda_at(cfg, step)
            try:
                out = train_step(model, optimizer, scaler, views, boxes, flips, cfg, device, lam)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err} at iteration {step}: stopping; the last good checkpoint "
                    f"({ckpt_path if ckpt_path.exists() else 'none written yet'}) is kept"
                ) from None
            scheduler.step()
            step += 1
            window_images += views.shape[0] * env.world_size
            for key, values in window_means.items():
                if key in out and not torch.isnan(out[key]):
                    values.append(float(out[key]))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(out['loss']):.3f}", refresh=False)
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                last_metrics = {k: float(v) for k, v in out.items() if k not in window_means}
                last_metrics.update({k: float(np.mean(v)) for k, v in window_means.items() if v})
                last_metrics.update(
                    lr=optimizer.param_groups[0]["lr"], images_per_sec=window_images / elapsed, **{"lambda": lam}
                )
                if eval_pairs is not None and (step % cfg.corr_eval_every == 0 or step == total_steps):
                    last_metrics.update(evaluate_correspondence(model, eval_pairs, device))
                if on_step is not None and env.is_main:
                    on_step(step, dict(last_metrics))
                window_start, window_images = time.perf_counter(), 0
                window_means = {key: [] for key in WINDOW_MEAN_METRICS}
            if step % cfg.ckpt_every == 0 and step < total_steps:
                checkpoint(step, last_metrics)
            if should_stop is not None and step < total_steps and should_stop():
                checkpoint(step, last_metrics)
                completed = False
                break
    finally:
        if progress is not None:
            progress.close()

    if completed:
        if step != total_steps:
            raise RuntimeError(f"the data loader ended at iteration {step} of {total_steps}")
        if start_step < total_steps or not backbone_path.exists():
            checkpoint(step, last_metrics)
            if env.rank == 0:
                save_backbone(backbone_state_dict(model.state_dict()), backbone_path, cfg.arch)
                (out_dir / "pretrain_metrics.json").write_text(json.dumps(last_metrics, indent=2))
        if env.world_size > 1:
            dist.barrier()
    return PretrainResult(
        metrics=last_metrics,
        backbone_path=backbone_path,
        checkpoint_path=ckpt_path,
        iterations=step,
        completed=completed,
    )


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
            stacklevel=2,
        )


def warn_if_cpu_amp(cfg: PretrainConfig, device: torch.device) -> None:
    if device.type != "cuda" and cfg.amp == "fp16":
        warnings.warn(
            f"amp='fp16' is ignored on {device.type}: use amp='bf16' there, or fp32 (amp='none')", stacklevel=2
        )
