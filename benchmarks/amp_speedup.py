"""bf16 autocast against fp32: DenseCL train steps of both, timed alternately in one process.

On a CPU with AVX512-BF16/AMX, oneDNN runs bf16 convolutions much faster than fp32, which is what lets the
CPU presets (mini_paper) afford more pre-training in the same hour. Alternating the two models step by
step, in one process, keeps the ratio meaningful on a shared, noisy machine:
    OMP_NUM_THREADS=1 python benchmarks/amp_speedup.py --arch resnet18 --size 96 --batch 32 --iters 10
The last line is `bf16/fp32 step-time ratio: X.XXX` (below 1: bf16 is faster).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from alternating_steps import bench_config, build_run, time_alternately


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queue-len", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    runs = {}
    for amp in ("none", "bf16"):
        cfg = bench_config(args.arch, args.size, args.batch, args.queue_len, amp=amp, channels_last=True)
        runs[amp] = build_run(cfg, device)  # the same initial weights for both (drawn from the config's seed)
    times = time_alternately(runs, args.batch, args.size, device, args.warmup, args.iters)
    fp32, bf16 = statistics.median(times["none"]), statistics.median(times["bf16"])
    print(f"{args.arch} {args.size}px batch {args.batch} queue {args.queue_len} on {device}, "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"median step: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s")
    print(f"bf16/fp32 step-time ratio: {bf16 / fp32:.3f}")


if __name__ == "__main__":
    main()
