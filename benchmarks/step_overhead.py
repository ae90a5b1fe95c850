"""DenseCL vs MoCo v2 step time, measured alternately in one process so machine noise hits both alike.

The dense head is about 10% of a ResNet-50 step's FLOPs; the paper reports under 1% wall-time overhead on
GPUs. Prints the per-model medians and, as its last line, `densecl/mocov2 step-time ratio: X.XXX`.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from alternating_steps import bench_config, build_run, time_alternately


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
        cfg = bench_config(args.arch, args.size, args.batch, args.queue_len, loss_lambda=lam, amp=args.amp)
        runs[name] = build_run(cfg, device)
    times = time_alternately(runs, args.batch, args.size, device, args.warmup, args.iters)
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name}: median step {med * 1000:.1f} ms, {args.batch / med:.1f} images/s ({args.arch}, {args.size}px, "
              f"batch {args.batch}, {device})")
    ratio = statistics.median(times["densecl"]) / statistics.median(times["mocov2"])
    print(f"densecl/mocov2 step-time ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
