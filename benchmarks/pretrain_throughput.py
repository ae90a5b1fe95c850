"""Pre-training throughput (images/s): on tensors already on the device, and through the real data pipeline.

The paper-scale target is ResNet-50 at 224, batch 256, AMP + channels_last on one GPU:
    python benchmarks/pretrain_throughput.py --arch resnet50 --size 224 --batch 256 --amp bf16 --workers 16
On a CPU it runs at any size, e.g. --arch resnet18 --size 96 --batch 32 --queue-len 4096 --amp none.
The pipeline mode decodes, augments (two MoCo v2 views) and collates like training does; its source is
the synthetic scene generator (--source synthetic) or a folder of images (--source PATH).
"""

from __future__ import annotations

import argparse
import time

import torch
from alternating_steps import bench_config, build_run
from torch.utils.data import DataLoader

from densecl.config import DataConfig
from densecl.distributed import resolve_device
from densecl.sampling import ResumableSampler, build_dataset


def measure(step, batches, warmup: int, device: torch.device, batch: int) -> float:
    count = 0
    start = None
    for i, data in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        step(*data)
        if i >= warmup:
            count += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--queue-len", type=int, default=65536)
    parser.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"))
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--source", default="synthetic", help="'synthetic' or a folder of images")
    parser.add_argument("--mode", default="both", choices=("tensors", "pipeline", "both"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = (
        DataConfig(kind="synthetic", num_images=args.batch * (args.iters + args.warmup), image_size=max(160, args.size))
        if args.source == "synthetic"
        else DataConfig(kind="image_folder", root=args.source)
    )
    cfg = bench_config(args.arch, args.size, args.batch, args.queue_len, amp=args.amp,
                       channels_last=not args.no_channels_last, num_workers=args.workers,
                       iters=args.iters + args.warmup)
    cfg.data, cfg.device = data, str(device)
    cfg.validate()
    trainer = build_run(cfg, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    step = trainer.run_step

    total = args.iters + args.warmup
    results = {}
    if args.mode in ("tensors", "both"):
        views = torch.randn(args.batch, 2, 3, args.size, args.size, device=device)
        boxes = torch.tensor([0.0, 0.0, args.size, args.size], device=device).expand(args.batch, 2, 4)
        flips = torch.zeros(args.batch, 2, dtype=torch.bool, device=device)
        batches = ((views, boxes, flips) for _ in range(total))
        results["tensors"] = measure(step, batches, args.warmup, device, args.batch)
    if args.mode in ("pipeline", "both"):
        dataset = build_dataset(cfg)
        sampler = ResumableSampler(len(dataset), args.batch, 0, 1, cfg.seed, 0, total)
        loader = DataLoader(
            dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
            pin_memory=device.type == "cuda", persistent_workers=False,
        )
        results["pipeline"] = measure(step, loader, args.warmup, device, args.batch)
    desc = f"{args.arch} {args.size}px batch {args.batch} amp {args.amp} on {device}"
    if device.type == "cuda":
        desc += f" ({torch.cuda.get_device_name(device)}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)"
    print(desc)
    print("images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
