"""DenseCL vs MoCo v2 step time, measured alternately in one process so machine noise hits both alike.

The dense head is about 10% of a ResNet-50 step's FLOPs; the paper reports under 1% wall-time overhead on
GPUs. Prints the per-model medians and, as its last line, `densecl/mocov2 step-time ratio: X.XXX`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from densecl.engine import PretrainConfig, build_model, build_optimizer, train_step, uses_channels_last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--queue-len", type=int, default=65536)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    runs = {}
    for name, lam in (("densecl", 0.5), ("mocov2", 0.0)):
        cfg = PretrainConfig(
            arch=args.arch, loss_lambda=lam, queue_len=args.queue_len, batch_size=args.batch,
            crop_size=args.size, amp=args.amp, iters=1, epochs=None,
        )
        model = build_model(cfg).to(device)
        if uses_channels_last(cfg, device):
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, model, world_size=1)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda")
        runs[name] = (cfg, model, optimizer, scaler)

    views = torch.randn(args.batch, 2, 3, args.size, args.size, device=device)
    boxes = torch.tensor([[0.0, 0.0, args.size, args.size]], device=device).expand(args.batch, 2, 4)
    flips = torch.zeros(args.batch, 2, dtype=torch.bool, device=device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.iters):
        for name, (cfg, model, optimizer, scaler) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, scaler, views, boxes, flips, cfg, device, loss_lambda=cfg.loss_lambda)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name}: median step {med * 1000:.1f} ms, {args.batch / med:.1f} images/s ({args.arch}, {args.size}px, "
              f"batch {args.batch}, {device})")
    ratio = statistics.median(times["densecl"]) / statistics.median(times["mocov2"])
    print(f"densecl/mocov2 step-time ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
