"""Pre-training throughput (images/s): on tensors already on the device, and through the real data pipeline.

The paper-scale target is ResNet-50 at 224, batch 256, AMP + channels_last on one GPU:
    python benchmarks/pretrain_throughput.py --arch resnet50 --size 224 --batch 256 --amp bf16 --workers 16
    python benchmarks/pretrain_throughput.py ... --mode both --source FOLDER --augment-on gpu
On a CPU it runs at any size, e.g. --arch resnet18 --size 96 --batch 32 --queue-len 4096 --amp none.

tensors: `Trainer.run_step` on one batch of random views resident on the device (no data pipeline at all).
pipeline: the engine's own pre-training (densecl.training.pretrain.pretrain: its data set, loader, two-view augmentation
on the CPU workers or, with --augment-on gpu, on the device, and its training loop) on the synthetic scenes
(--source synthetic, optionally cached: --cache-dir) or a folder of images (--source FOLDER, e.g. the JPEGs of
benchmarks/write_jpeg_folder.py); timed from the end of step --warmup to the end of the last step.
--mode both measures the two in one process, side by side, and prints their ratio.

Prints one line per figure, then the ratio with --mode both:
    throughput tensors: 2848.1 images/s (...)
    throughput pipeline: 2562.0 images/s (...)
    pipeline/tensors: 0.900
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings

import torch
from alternating_steps import bench_config, build_run

from densecl.data.settings import AugmentOn, DataConfig
from densecl.distributed import resolve_device
from densecl.training.pretrain import pretrain


def measure_tensors(cfg, device: torch.device, args) -> float:
    """images/s of run_step on resident random views, after `warmup` untimed steps."""
    trainer = build_run(cfg, device)
    views = torch.randn(args.batch, 2, 3, args.size, args.size, device=device)
    boxes = torch.tensor([0.0, 0.0, args.size, args.size], device=device).expand(args.batch, 2, 4)
    flips = torch.zeros(args.batch, 2, dtype=torch.bool, device=device)
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        trainer.run_step(views, boxes, flips)
    sync(device)
    return args.iters * args.batch / (time.perf_counter() - start)


def measure_pipeline(cfg, args) -> float:
    """images/s of the engine's pre-training between the end of step `warmup` and the end of the last step.

    The engine hands its metrics to `on_step` every `log_every` steps (after reading the step's losses back,
    which waits for the device): log_every = warmup gives a call at the end of step `warmup` and one at the last.
    """
    stamps: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="throughput_") as folder:
        with warnings.catch_warnings():  # a short timing run: images meeting their own queued keys cost no time
            warnings.filterwarnings("ignore", message=r"queue_len=\d+ with \d+ images seen")
            pretrain(cfg, folder, on_step=lambda step, _: stamps.setdefault(step, time.perf_counter()))
    return args.iters * args.batch / (stamps[args.warmup + args.iters] - stamps[args.warmup])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    parser.add_argument("--queue-len", type=int, default=65536)
    parser.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"))
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="pretrain.compile=true")
    parser.add_argument("--workers", type=int, default=8, help="data-loader workers (pipeline mode)")
    parser.add_argument("--source", default="synthetic", help="'synthetic' or a folder of images")
    parser.add_argument("--augment-on", default="cpu", choices=tuple(AugmentOn), help="data.augment_on (pipeline)")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir for the synthetic source")
    parser.add_argument("--mode", default="both", choices=("tensors", "pipeline", "both"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    total = args.warmup + args.iters
    if args.source == "synthetic":
        data = DataConfig(kind="synthetic", num_images=args.batch * total, image_size=max(160, args.size),
                          augment_on=args.augment_on, cache_dir=args.cache_dir)
        source = f"synthetic {data.image_size}px scenes" + (", cached" if args.cache_dir else "")
    else:
        data = DataConfig(kind="image_folder", root=args.source, augment_on=args.augment_on)
        source = f"images in {args.source}"
    # iters = gcd(warmup, warmup + iters) steps between logs: the engine logs (and syncs) at the end of step
    # `warmup` and of the last; no checkpoint before the end, no quality evaluations, no progress bar
    cfg = bench_config(args.arch, args.size, args.batch, args.queue_len, amp=args.amp,
                       channels_last=not args.no_channels_last, num_workers=args.workers, iters=total,
                       compile=args.compile, log_every=math.gcd(args.warmup, total), ckpt_every=total + 1,
                       eval_every=0, progress=False)
    cfg.data, cfg.device = data, str(device)
    cfg.validate()
    torch.backends.cudnn.benchmark = device.type == "cuda"

    desc = f"{args.arch} {args.size}px batch {args.batch} amp {args.amp}" + (" compiled" if args.compile else "")
    desc += f", {args.warmup} + {args.iters} steps on {device}"
    if device.type == "cuda":
        desc += f" ({torch.cuda.get_device_name(device)})"
    results = {}
    for mode in ("tensors", "pipeline") if args.mode == "both" else (args.mode,):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if mode == "tensors":
            tensor_cfg = bench_config(args.arch, args.size, args.batch, args.queue_len, amp=args.amp,
                                      channels_last=not args.no_channels_last, iters=total, compile=args.compile)
            tensor_cfg.device = str(device)
            results[mode] = measure_tensors(tensor_cfg, device, args)
            where = "views resident on the device"
        else:
            results[mode] = measure_pipeline(cfg, args)
            where = f"{source}, augment_on={args.augment_on}, {args.workers} workers"
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"throughput {mode}: {results[mode]:.1f} images/s ({desc}; {where}{peak})", flush=True)
    if len(results) == 2:
        print(f"pipeline/tensors: {results['pipeline'] / results['tensors']:.3f}")


if __name__ == "__main__":
    main()
