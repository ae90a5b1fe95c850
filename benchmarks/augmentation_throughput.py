"""Single-core throughput of the two-view augmentation and of the synthetic scene generator.

Pre-training on CPU-poor machines is often input-bound; these figures say how many data-loader workers a
given GPU step time needs. Usage: python benchmarks/augmentation_throughput.py --size 224
"""

from __future__ import annotations

import argparse
import time

import torch

from densecl.data.augment import TwoViewAugmentation
from densecl.data.synthetic import generate_scene


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="output crop size of each view")
    parser.add_argument("--images", type=int, default=200, help="number of images to augment")
    parser.add_argument("--image-size", type=int, default=320, help="side of the synthetic source images")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    images = [generate_scene(args.seed, i, args.image_size).image for i in range(args.images)]
    generate_seconds = time.perf_counter() - start
    print(f"generate_scene: {1000 * generate_seconds / args.images:.2f} ms per {args.image_size} px scene "
          f"({args.images / generate_seconds:.1f} scenes/s per core)")

    augment = TwoViewAugmentation(size=args.size)
    augment(images[0])  # warm-up: first-call allocations and lazy imports
    start = time.perf_counter()
    for image in images:
        augment(image)
    augment_seconds = time.perf_counter() - start
    print(f"two-view augmentation: {args.images / augment_seconds:.1f} images/s per core (size {args.size})")


if __name__ == "__main__":
    main()
