"""Running one transfer stage on detectron2: shared config fields, trainer, resume, evaluation, metrics.json.

API (used by detection.py and segmentation.py; the pipeline calls their run_* functions):
    StageConfig                  flat dataclass of the fields every stage has (below)
    StageConfig.scaled(ims_per_batch) -> copy with the linear scaling rule applied
        (lr x k, iterations / k, for k = new batch / old batch): a small-batch run of the same schedule
    StageConfig.shortened(max_iter) -> copy with the schedule (steps, warm-up, periods) squeezed to max_iter
    TransferTrainer              detectron2 DefaultTrainer with our hooks/writers; stages subclass it
    run_stage(trainer_cls, cfg, weights, output_dir) -> dict[str, float]

StageConfig fields: arch (resnet18/34/50/101), data_root ("" = $DETECTRON2_DATASETS or ./datasets),
synthetic_root, synthetic_num_train, synthetic_num_val, synthetic_image_size (the synthetic set is written
there with these parameters if the folder holds none yet; an existing set is used as it is), max_iter,
ims_per_batch (total over GPUs), base_lr, momentum, weight_decay, steps (iterations where lr x 0.1),
warmup_iters, warmup_factor, clip_grad_norm (0 = off), num_gpus (>1: SyncBN and detectron2's launch),
device ("auto", "cuda" or "cpu"), seed, eval_period (0 = only at the end), checkpoint_period, log_period,
num_workers, precise_bn, precise_bn_iters.

Output folder: stage_config.json (the dataclass, checked on rerun), config.yaml (detectron2's config),
log.txt, train_log.json (detectron2's per-iteration JSON lines), model_final.pth (plus periodic
model_XXXXXXX.pth and last_checkpoint, from which a rerun resumes), pretrained_backbone.pkl (converted
weights), inference/ (evaluator files) and metrics.json (the flat dict that run_stage returns).
A rerun of a finished stage with the same config returns metrics.json without training again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from densecl.files import write_json
from densecl.saved_config import changed_settings

logger = logging.getLogger(__name__)

PIXEL_MEAN = [123.675, 116.280, 103.530]  # torchvision's ImageNet statistics on the 0-255 scale, RGB order
PIXEL_STD = [58.395, 57.120, 57.375]
DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
# Fields that may change between a run and its resumption without changing what is computed.
RUNTIME_FIELDS = {"device", "num_gpus", "num_workers", "eval_period", "checkpoint_period", "log_period"}


@dataclass
class StageConfig:
    arch: str = "resnet50"
    data_root: str = ""
    synthetic_root: str = ""
    synthetic_num_train: int = 64
    synthetic_num_val: int = 16
    synthetic_image_size: int = 160
    max_iter: int = 1000
    ims_per_batch: int = 16
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    steps: tuple[int, ...] = ()
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0
    num_gpus: int = 1
    device: str = "auto"
    seed: int = 0
    eval_period: int = 0
    checkpoint_period: int = 5000
    log_period: int = 20
    num_workers: int = 4
    precise_bn: bool = True
    precise_bn_iters: int = 200
    amp: str = "none"  # none | bf16: bf16 autocast around the training forward (GPU, or CPU with AVX512-BF16)

    def scaled(self, ims_per_batch: int):
        """Same schedule at another batch size: lr x k, every iteration count / k (k = new / old batch)."""
        k = ims_per_batch / self.ims_per_batch
        iters = lambda n: max(1, round(n / k)) if n > 0 else n  # noqa: E731
        return dataclasses.replace(
            self,
            ims_per_batch=ims_per_batch,
            base_lr=self.base_lr * k,
            max_iter=iters(self.max_iter),
            steps=tuple(iters(s) for s in self.steps),
            warmup_iters=iters(self.warmup_iters),
            eval_period=iters(self.eval_period),
            checkpoint_period=iters(self.checkpoint_period),
        )

    def shortened(self, max_iter: int):
        """The same schedule shape in max_iter iterations (steps and periods scaled by max_iter / old)."""
        f = max_iter / self.max_iter
        iters = lambda n: max(1, round(n * f)) if n > 0 else n  # noqa: E731
        steps = sorted({iters(s) for s in self.steps if iters(s) < max_iter})
        return dataclasses.replace(
            self,
            max_iter=max_iter,
            steps=tuple(steps),
            warmup_iters=min(iters(self.warmup_iters), max_iter),
            eval_period=iters(self.eval_period),
            checkpoint_period=iters(self.checkpoint_period),
        )

    def validate(self) -> None:
        if self.arch not in DEPTH:
            raise ValueError(f"arch={self.arch!r}: expected one of {', '.join(DEPTH)}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device={self.device!r}: expected 'auto', 'cuda' or 'cpu'")
        if self.max_iter < 1 or self.ims_per_batch < 1 or self.num_gpus < 1:
            raise ValueError(
                f"max_iter, ims_per_batch and num_gpus must be >= 1 "
                f"(got {self.max_iter}, {self.ims_per_batch}, {self.num_gpus})"
            )
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp={self.amp!r}: expected 'none' or 'bf16'")
        if self.ims_per_batch % self.num_gpus:
            raise ValueError(f"ims_per_batch={self.ims_per_batch} is not divisible by num_gpus={self.num_gpus}")
        if list(self.steps) != sorted(self.steps) or any(s >= self.max_iter or s < 1 for s in self.steps):
            raise ValueError(f"steps={self.steps} must be increasing and inside (0, max_iter={self.max_iter})")

    def resolved_device(self) -> str:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch.cuda.is_available() is False")
        if device == "cpu" and self.num_gpus > 1:
            raise ValueError(f"num_gpus={self.num_gpus} needs device='cuda'")
        return device

    def norm(self) -> str:
        """SyncBN across several GPUs (the protocol), plain BN in one process (what SyncBN reduces to)."""
        return "SyncBN" if self.num_gpus > 1 else "BN"

    def dataset_names(self) -> list[str]:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def base_d2_config(cfg: StageConfig, output_dir: str, zoo_config: str | None = None):
    """detectron2's defaults, then a model-zoo file (e.g. "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml"),
    then what every stage sets: torchvision-style weights, solver, loaders, norm."""
    from detectron2 import model_zoo
    from detectron2.config import CfgNode, get_cfg

    c = get_cfg()
    if zoo_config is not None:
        c.merge_from_file(model_zoo.get_config_file(zoo_config))
    c.OUTPUT_DIR = str(output_dir)
    c.SEED = cfg.seed
    c.MODEL.DEVICE = cfg.resolved_device()
    c.MODEL.WEIGHTS = ""  # starting weights are loaded (strictly) by run_stage
    c.MODEL.PIXEL_MEAN = list(PIXEL_MEAN)
    c.MODEL.PIXEL_STD = list(PIXEL_STD)
    c.INPUT.FORMAT = "RGB"
    c.MODEL.BACKBONE.FREEZE_AT = 0
    c.MODEL.RESNETS.DEPTH = DEPTH[cfg.arch]
    c.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if DEPTH[cfg.arch] < 50 else 256
    c.MODEL.RESNETS.STRIDE_IN_1X1 = False
    c.MODEL.RESNETS.NORM = cfg.norm()
    c.SOLVER.IMS_PER_BATCH = cfg.ims_per_batch
    c.SOLVER.REFERENCE_WORLD_SIZE = 0  # batch and lr are set explicitly (StageConfig.scaled)
    c.SOLVER.BASE_LR = cfg.base_lr
    c.SOLVER.MOMENTUM = cfg.momentum
    c.SOLVER.WEIGHT_DECAY = cfg.weight_decay
    c.SOLVER.MAX_ITER = cfg.max_iter
    c.SOLVER.STEPS = tuple(cfg.steps)
    c.SOLVER.WARMUP_ITERS = cfg.warmup_iters
    c.SOLVER.WARMUP_FACTOR = cfg.warmup_factor
    c.SOLVER.CHECKPOINT_PERIOD = cfg.checkpoint_period
    c.SOLVER.CLIP_GRADIENTS.ENABLED = cfg.clip_grad_norm > 0
    c.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    c.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else 1.0
    c.TEST.EVAL_PERIOD = cfg.eval_period
    c.TEST.PRECISE_BN.ENABLED = cfg.precise_bn
    c.TEST.PRECISE_BN.NUM_ITER = cfg.precise_bn_iters
    c.DATALOADER.NUM_WORKERS = cfg.num_workers
    c.DENSECL = CfgNode({"LOG_PERIOD": cfg.log_period, "AMP": cfg.amp})
    return c


def flatten_results(results: dict, prefix: str = "") -> dict[str, float]:
    """detectron2's nested {"bbox": {"AP": ...}} -> {"bbox/AP": ...}, floats only."""
    flat = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_results(value, name + "/"))
        else:
            flat[name] = float(value)
    return flat


@functools.cache
def transfer_trainer_class():
    """TransferTrainer, built on first use so that importing this module does not import detectron2."""
    from detectron2.engine import DefaultTrainer, HookBase, hooks
    from detectron2.evaluation import inference_on_dataset
    from detectron2.utils import comm
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    class PeriodicEval(HookBase):
        """Evaluate every `period` iterations during training (the final evaluation is run_stage's)."""

        def __init__(self, period: int):
            self.period = period

        def after_step(self):
            next_iter = self.trainer.iter + 1
            if next_iter % self.period == 0 and next_iter < self.trainer.max_iter:
                metrics = self.trainer.evaluate()
                if comm.is_main_process() and metrics:
                    finite = {f"eval/{k}": v for k, v in metrics.items() if math.isfinite(v)}
                    self.trainer.storage.put_scalars(**finite, smoothing_hint=False)
                comm.synchronize()

    class TransferTrainer(DefaultTrainer):
        """DefaultTrainer with: our log period, a JSON log that leaves metrics.json to the final metrics,
        periodic evaluation without a duplicate final one, `evaluate()` returning flat metrics, and bf16
        training on CPU as well as GPU (detectron2's AMPTrainer is CUDA-only)."""

        def __init__(self, cfg):
            super().__init__(cfg)
            if cfg.DENSECL.AMP == "bf16":
                autocast_training_forward(_unwrap(self.model), cfg.MODEL.DEVICE)

        @classmethod
        def build_d2_config(cls, cfg: StageConfig, output_dir: str):
            """The stage's complete detectron2 config (DATASETS.TEST[0] is the set `evaluate` uses)."""
            raise NotImplementedError

        @classmethod
        def summarize(cls, results: dict) -> dict[str, float]:
            return flatten_results(results)

        def build_writers(self):
            return [
                CommonMetricPrinter(self.max_iter),
                JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "train_log.json")),
            ]

        def build_hooks(self):
            kept = [h for h in super().build_hooks() if not isinstance(h, (hooks.EvalHook, hooks.PeriodicWriter))]
            if self.cfg.TEST.EVAL_PERIOD > 0:
                kept.append(PeriodicEval(self.cfg.TEST.EVAL_PERIOD))
            if comm.is_main_process():
                kept.append(hooks.PeriodicWriter(self.build_writers(), period=self.cfg.DENSECL.LOG_PERIOD))
            return kept

        def evaluate(self) -> dict[str, float]:
            """Evaluate the current model on the test set; the flat metrics on the main process, {} elsewhere."""
            name = self.cfg.DATASETS.TEST[0]
            evaluator = self.build_evaluator(self.cfg, name, os.path.join(self.cfg.OUTPUT_DIR, "inference"))
            results = inference_on_dataset(self.model, self.build_test_loader(self.cfg, name), evaluator)
            return self.summarize(results) if comm.is_main_process() else {}

    return TransferTrainer


# ---------------------------------------------------------------------------------------------- running
def _check_resumable(output_dir: Path, config: dict, weights: str | None, config_class: type) -> None:
    saved_file = output_dir / "stage_config.json"
    if not saved_file.is_file():
        return
    saved_all = json.loads(saved_file.read_text())
    if saved_all.get("weights") != weights:
        logger.warning(
            "%s started from weights %s; continuing it, so the weights given now (%s) are not used",
            output_dir, saved_all.get("weights"), weights,
        )  # fmt: skip
    changed = changed_settings(saved_all["config"], config, config_class, RUNTIME_FIELDS)
    if changed:
        diff = ", ".join(f"{key}: {before!r} -> {now!r}" for key, before, now in changed)
        raise ValueError(
            f"{output_dir} holds a run with another config ({diff}); resuming it would mix the two. "
            "Use a new output folder, or delete this one to start over."
        )


def _ensure_synthetic(cfg: StageConfig, names: list[str]) -> None:
    """Write the synthetic set on first use; an existing set at synthetic_root is used as it is."""
    if any(n.startswith("synthetic_") for n in names) and cfg.synthetic_root:
        if (Path(cfg.synthetic_root) / "meta.json").is_file():
            return
        from densecl.synthetic import write_synthetic_dataset

        write_synthetic_dataset(
            cfg.synthetic_root, cfg.synthetic_num_train, cfg.synthetic_num_val, cfg.synthetic_image_size, cfg.seed
        )


def run_stage(trainer_cls_name: str, cfg: StageConfig, weights: str | None, output_dir: str) -> dict[str, float]:
    """Train (or resume) and evaluate one stage; write and return its flat metrics.

    trainer_cls_name is "module:function" returning the TransferTrainer subclass (kept importable by name
    so that detectron2's launch can start it in fresh processes).
    """
    from densecl.transfer.data import check_dataset
    from densecl.transfer.weights import prepare_weights

    cfg.validate()
    cfg.resolved_device()
    output_dir = Path(output_dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.to_dict()
    _check_resumable(output_dir, config, None if weights is None else str(weights), type(cfg))
    metrics_file = output_dir / "metrics.json"
    if metrics_file.is_file() and (output_dir / "model_final.pth").is_file():
        logger.info("%s: finished earlier; returning its metrics.json", output_dir)
        return json.loads(metrics_file.read_text())

    names = cfg.dataset_names()
    _ensure_synthetic(cfg, names)
    for name in names:  # before anything is built or converted
        check_dataset(name, cfg.data_root or None, cfg.synthetic_root or None)
    pkl = prepare_weights(weights, output_dir)
    write_json(
        output_dir / "stage_config.json",
        {"config": config, "weights": None if weights is None else str(weights), "weights_pkl": pkl},
    )

    if cfg.num_gpus > 1:
        from detectron2.engine import launch

        launch(_worker, cfg.num_gpus, dist_url="auto", args=(trainer_cls_name, cfg, pkl, str(output_dir)))
    else:
        _worker(trainer_cls_name, cfg, pkl, str(output_dir))
    if not metrics_file.is_file():
        raise RuntimeError(f"the stage ended without writing {metrics_file}")
    return json.loads(metrics_file.read_text())


def _resolve_trainer(trainer_cls_name: str):
    import importlib

    module, func = trainer_cls_name.split(":")
    return getattr(importlib.import_module(module), func)()


def autocast_training_forward(model, device: str) -> None:
    """Run `model`'s forward under bf16 autocast while it is in training mode; evaluation stays fp32.

    Patching the instance's forward (not wrapping the module) keeps `trainer.model`, its state-dict keys and
    the checkpointer untouched; only the forward (and loss) is autocast, as torch recommends."""
    import torch

    forward = model.forward
    device_type = torch.device(device).type

    def forward_in_bf16_when_training(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=model.training):
            return forward(*args, **kwargs)

    model.forward = forward_in_bf16_when_training


def _unwrap(model):
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _worker(trainer_cls_name: str, cfg: StageConfig, pkl: str | None, output_dir: str) -> None:
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from densecl.transfer.data import register_datasets
    from densecl.transfer.weights import load_pretrained

    trainer_cls = _resolve_trainer(trainer_cls_name)
    register_datasets(cfg.dataset_names(), cfg.data_root or None, cfg.synthetic_root or None)
    d2cfg = trainer_cls.build_d2_config(cfg, output_dir)
    d2cfg.freeze()
    seed_all_rng(cfg.seed + comm.get_rank())
    log_state = _attach_file_log(output_dir) if comm.is_main_process() else None
    try:
        if comm.is_main_process():
            Path(output_dir, "config.yaml").write_text(d2cfg.dump())
        trainer = trainer_cls(d2cfg)
        if trainer.checkpointer.has_checkpoint():
            trainer.resume_or_load(resume=True)
            logger.info(
                "resuming from %s at iteration %d", trainer.checkpointer.get_checkpoint_file(), trainer.start_iter
            )
        elif pkl is not None:
            load_pretrained(_unwrap(trainer.model), pkl, cfg.arch)
        trainer.train()
        metrics = trainer.evaluate()
        if comm.is_main_process():
            write_json(Path(output_dir) / "metrics.json", metrics)
            logger.info("metrics: %s", metrics)
        comm.synchronize()
    finally:
        if log_state is not None:
            handler, levels = log_state
            for name, level in levels.items():
                logging.getLogger(name).removeHandler(handler)
                logging.getLogger(name).setLevel(level)
            handler.close()


_LOGGERS = ("detectron2", "densecl", "fvcore")


def _attach_file_log(output_dir: str) -> tuple[logging.Handler, dict[str, int]]:
    """Log the stage's INFO messages to output_dir/log.txt; returns what to undo afterwards."""
    handler = logging.FileHandler(os.path.join(output_dir, "log.txt"))
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    handler.setLevel(logging.INFO)
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name, level in levels.items():
        log = logging.getLogger(name)
        log.addHandler(handler)
        if level == logging.NOTSET or level > logging.INFO:
            log.setLevel(logging.INFO)
    return handler, levels
