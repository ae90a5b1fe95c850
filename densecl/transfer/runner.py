"""Running one transfer stage on detectron2: the detectron2 config every stage shares, the trainer the stages
subclass, reuse of the output folder (densecl.resume), evaluation and metrics.json.

The output folder holds stage_config.json (the stage config and starting weights, compared on a rerun),
config.yaml (detectron2's config), log.txt, train_log.json (detectron2's per-iteration JSON lines),
model_final.pth (plus periodic model_XXXXXXX.pth and last_checkpoint, from which a rerun resumes),
pretrained_backbone.pkl (converted weights), inference/ (evaluator files) and metrics.json (what `run_stage`
returns). A rerun of a finished stage with the same settings returns metrics.json without training again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, HookBase, hooks, launch
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from densecl.data.synthetic import write_synthetic_dataset
from densecl.distributed import resolve_device
from densecl.files import write_json
from densecl.method.settings import ARCHS
from densecl.resume import Reuse, reuse
from densecl.transfer import custom
from densecl.transfer.catalog import register_datasets
from densecl.transfer.layouts import check_dataset, is_custom
from densecl.transfer.pretrained import load_pretrained, prepare_weights
from densecl.transfer.protocol import fixed_deviations
from densecl.transfer.settings import StageConfig
from densecl.typed_settings import ConfigValueError, flatten, from_dict, plain

logger = logging.getLogger(__name__)
data_logger = logging.getLogger("densecl.data")  # the user's set and its classes: shown in the terminal too

PIXEL_MEAN = [123.675, 116.280, 103.530]  # torchvision's ImageNet statistics on the 0-255 scale, RGB order
PIXEL_STD = [58.395, 57.120, 57.375]
DEPTH = {arch: int(arch.removeprefix("resnet")) for arch in ARCHS}  # MODEL.RESNETS.DEPTH
STAGE_CONFIG = "stage_config.json"
METRICS = "metrics.json"
FINAL_MODEL = "model_final.pth"


def stage_device(cfg: StageConfig) -> str:
    """detectron2's MODEL.DEVICE for `cfg.device` on this machine; several GPUs need CUDA."""
    device = resolve_device(cfg.device).type
    if device != "cuda" and cfg.num_gpus > 1:
        raise ConfigValueError("num_gpus", cfg.num_gpus, f"several GPUs need CUDA; device={cfg.device!r} is a CPU here")
    return device


def base_d2_config(cfg: StageConfig, output_dir: str, zoo_config: str | None = None) -> CfgNode:
    """detectron2's defaults, then a model-zoo file (e.g. "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml"),
    then what every stage sets: torchvision-style weights, solver, loaders, norm."""
    c = get_cfg()
    if zoo_config is not None:
        c.merge_from_file(model_zoo.get_config_file(zoo_config))
    c.OUTPUT_DIR = str(output_dir)
    c.SEED = cfg.seed
    c.MODEL.DEVICE = stage_device(cfg)
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
    c.DENSECL = CfgNode({"LOG_PERIOD": cfg.log_period, "AMP": cfg.amp, "PROGRESS": cfg.progress})
    return c


def flat_metrics(results: Mapping) -> dict[str, float]:
    """detectron2's nested {"bbox": {"AP": ...}} -> {"bbox/AP": ...}, floats only; a per-class name made safe
    for mlflow and files (`safe_names`)."""
    return {k: float(v) for k, v in flatten(safe_names(results), sep="/").items() if not isinstance(v, Mapping)}


def safe_names(results: Mapping) -> dict:
    """Metric names with their class part made safe (densecl.transfer.custom.metric_name: a class named 'a/b'
    or 'car (red)' gives AP-a_b, AP-car _red_), at every level of a nested result."""
    out = {}
    for key, value in results.items():
        head, dash, tail = str(key).partition("-")
        name = f"{head}{dash}{custom.metric_name(tail)}" if dash else key
        out[name] = safe_names(value) if isinstance(value, Mapping) else value
    return out


# ---------------------------------------------------------------------------------------------- trainer
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


class ProgressBar(HookBase):
    """Iterations and time left in the terminal (tqdm), on the main process."""

    def before_train(self):
        name = Path(self.trainer.cfg.OUTPUT_DIR).name
        self.bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter, desc=name, leave=False,
                        dynamic_ncols=True)

    def after_step(self):
        self.bar.update(1)

    def after_train(self):
        self.bar.close()


class TransferTrainer(DefaultTrainer):
    """DefaultTrainer with: our log period, a JSON log that leaves metrics.json to the final metrics,
    periodic evaluation without a duplicate final one, `evaluate()` returning flat metrics, and bf16
    training on CPU as well as GPU (detectron2's AMPTrainer is CUDA-only). Each stage subclasses it."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.DENSECL.AMP == "bf16":
            autocast_training_forward(_unwrap(self.model), cfg.MODEL.DEVICE)

    @classmethod
    def build_d2_config(cls, cfg: StageConfig, output_dir: str) -> CfgNode:
        """The stage's complete detectron2 config (DATASETS.TEST[0] is the set `evaluate` uses)."""
        raise NotImplementedError

    @classmethod
    def summarize(cls, results: dict) -> dict[str, float]:
        return flat_metrics(results)

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
            if self.cfg.DENSECL.PROGRESS:
                kept.append(ProgressBar())
        return kept

    def evaluate(self) -> dict[str, float]:
        """Evaluate the current model on the test set; the flat metrics on the main process, {} elsewhere."""
        name = self.cfg.DATASETS.TEST[0]
        evaluator = self.build_evaluator(self.cfg, name, os.path.join(self.cfg.OUTPUT_DIR, "inference"))
        results = inference_on_dataset(self.model, self.build_test_loader(self.cfg, name), evaluator)
        return self.summarize(results) if comm.is_main_process() else {}


def autocast_training_forward(model: torch.nn.Module, device: str) -> None:
    """Run `model`'s forward under bf16 autocast while it is in training mode; evaluation stays fp32.

    Patching the instance's forward (not wrapping the module) keeps `trainer.model`, its state-dict keys and
    the checkpointer untouched; only the forward (and loss) is autocast, as torch recommends."""
    forward = model.forward
    device_type = torch.device(device).type

    def forward_in_bf16_when_training(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=model.training):
            return forward(*args, **kwargs)

    model.forward = forward_in_bf16_when_training


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- running
def _settings(config: dict, weights: str | None) -> dict:
    """What a stage's result depends on, as stage_config.json records it."""
    return {"config": config, "weights": weights}


def _saved_settings(output_dir: Path, cls: type[StageConfig]) -> dict | None:
    """What stage_config.json recorded, its config read through `cls` (a field added since counts as its
    default: the earlier run behaved so); None when there is no record."""
    path = output_dir / STAGE_CONFIG
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    try:
        config = plain(from_dict(cls, saved["config"]))
    except ConfigValueError as err:
        raise ValueError(f"{path} records a setting this {cls.__name__} does not have ({err})") from None
    return _settings(config, saved.get("weights"))


def stage_reuse(cfg: StageConfig, weights: str | None, output_dir: str | os.PathLike) -> Reuse:
    """What `run_stage` does with `output_dir` (densecl.resume.reuse): start, resume or return the finished
    metrics; raises SettingsChangedError when it holds work made with other settings or starting weights."""
    output_dir = Path(output_dir).absolute()
    finished = (output_dir / METRICS).is_file() and (output_dir / FINAL_MODEL).is_file()
    current = _settings(plain(cfg), None if weights is None else str(weights))
    saved = _saved_settings(output_dir, type(cfg))
    return reuse(output_dir, saved, current, finished, schema=type(cfg), within="config.")


def _ensure_synthetic(cfg: StageConfig, names: list[str]) -> None:
    """Write the synthetic set on first use, the one writer of it (built aside and renamed, so concurrent
    jobs are safe); a set already at synthetic_root is used as it is (one written by hand, say)."""
    if any(n.startswith("synthetic_") for n in names) and cfg.synthetic_root:
        if (Path(cfg.synthetic_root) / "meta.json").is_file():
            return
        scenes = cfg.synthetic
        write_synthetic_dataset(cfg.synthetic_root, scenes.num_train, scenes.num_val, image_size=scenes.image_size,
                                seed=scenes.seed, class_cue=scenes.class_cue, object_size=scenes.object_size)


def run_stage(trainer_cls: type[TransferTrainer], cfg: StageConfig, weights: str | None,
              output_dir: str) -> dict[str, float]:
    """Train (or resume) and evaluate one stage with `trainer_cls`; write and return its flat metrics.

    trainer_cls is a module-level TransferTrainer subclass: detectron2's launch pickles it by reference into
    the processes it starts."""
    cfg.validate()
    stage_device(cfg)
    output_dir = Path(output_dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = None if weights is None else str(weights)
    decision = stage_reuse(cfg, weights, output_dir)
    metrics_file = output_dir / METRICS
    if decision is Reuse.DONE:
        logger.info("%s: finished earlier; returning its %s", output_dir, METRICS)
        return json.loads(metrics_file.read_text())
    if decision is Reuse.RESUME:
        logger.info("%s: continuing the unfinished stage there (same settings)", output_dir)

    names = cfg.dataset_names()
    _ensure_synthetic(cfg, names)
    for name in names:  # before anything is built or converted
        if not is_custom(name):
            check_dataset(name, cfg.data_root or None, cfg.synthetic_root or None)
    if cfg.custom is not None:  # read and checked whole, then written where the stage registers it from
        summary = custom.prepare(cfg.custom, output_dir / custom.PREPARED_FOLDER, cfg.CUSTOM_TASK)
        for line in custom.describe(summary):
            data_logger.info("data set %s", line)
    pkl = prepare_weights(weights, output_dir)
    write_json(output_dir / STAGE_CONFIG, {**_settings(plain(cfg), weights), "weights_pkl": pkl})

    if cfg.num_gpus > 1:
        launch(_worker, cfg.num_gpus, dist_url="auto", args=(trainer_cls, cfg, pkl, str(output_dir)))
    else:
        _worker(trainer_cls, cfg, pkl, str(output_dir))
    if not metrics_file.is_file():
        raise RuntimeError(f"the stage ended without writing {metrics_file}")
    return json.loads(metrics_file.read_text())


def _worker(trainer_cls: type[TransferTrainer], cfg: StageConfig, pkl: str | None, output_dir: str) -> None:
    register_datasets(cfg.dataset_names(), cfg.data_root or None, cfg.synthetic_root or None,
                      os.path.join(output_dir, custom.PREPARED_FOLDER))
    d2cfg = trainer_cls.build_d2_config(cfg, output_dir)
    d2cfg.freeze()
    _check_fixed_protocol(cfg, d2cfg)
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
            write_json(Path(output_dir) / METRICS, metrics)
            logger.info("metrics: %s", metrics)
        comm.synchronize()
    finally:
        if log_state is not None:
            handler, levels = log_state
            for name, level in levels.items():
                logging.getLogger(name).removeHandler(handler)
                logging.getLogger(name).setLevel(level)
            handler.close()


def _check_fixed_protocol(cfg: StageConfig, d2cfg: CfgNode) -> None:
    """The built detectron2 config against what the published protocols fix (densecl.transfer.protocol):
    each difference logged, an error under strict_protocol; before the model is built."""
    deviations = fixed_deviations(d2cfg) if cfg.own_protocol() is None else []
    for deviation in deviations:
        logger.warning("the detectron2 config deviates from the published protocol: %s", deviation)
    if deviations and cfg.strict_protocol:
        raise ConfigValueError("strict_protocol", True, "the detectron2 config deviates from the published "
                               "protocol: " + "; ".join(map(str, deviations)))


# densecl.transfer too: a caller that keeps the stages' details out of the terminal stops it propagating
# (pipelines.console), and its messages (pycocotools' summary among them) still belong in log.txt
_LOGGERS = ("detectron2", "densecl", "densecl.transfer", "fvcore")


def _once(record: logging.LogRecord) -> bool:
    """A record reaches log.txt once, though it passes two of _LOGGERS on its way up."""
    if getattr(record, "_in_stage_log", False):
        return False
    record._in_stage_log = True
    return True


def _attach_file_log(output_dir: str) -> tuple[logging.Handler, dict[str, int]]:
    """Log the stage's INFO messages to output_dir/log.txt; returns what to undo afterwards."""
    handler = logging.FileHandler(os.path.join(output_dir, "log.txt"))
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    handler.setLevel(logging.INFO)
    handler.addFilter(_once)
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name, level in levels.items():
        log = logging.getLogger(name)
        log.addHandler(handler)
        if level == logging.NOTSET or level > logging.INFO:
            log.setLevel(logging.INFO)
    return handler, levels
