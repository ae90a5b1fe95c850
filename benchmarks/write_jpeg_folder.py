"""A folder of JPEG photos at ImageNet-like sizes, made from the synthetic scenes: the input of the JPEG-folder
throughput runs (benchmarks/pretrain_throughput.py --source FOLDER).

    python benchmarks/write_jpeg_folder.py FOLDER --num 25600 --workers 16

Scene i (densecl.data.synthetic.generate_scene, set `--seed`) is drawn at `--scene-size` px, upscaled (bicubic) to
a size drawn around `--width` x `--height` (ImageNet's typical 500 x 375; landscape or portrait, each side
+-20%), given photo-like grain (Gaussian, sigma `--grain`: upscaled scenes are smoother than photos and would
compress, and decode, unrealistically well) and saved at JPEG quality `--quality`. Already written files are
kept, so a rerun only adds what is missing. Ends with one line:
    jpeg folder: N images, mean WxH, mean K KiB, S s
"""

from __future__ import annotations

import argparse
import os
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from densecl.data.synthetic import generate_scene


def image_size(index: int, width: int, height: int, seed: int) -> tuple[int, int]:
    rng = np.random.default_rng([seed, index, 1])
    w, h = (width, height) if rng.random() < 0.75 else (height, width)  # a quarter portrait, as in photo sets
    scale = rng.uniform(0.8, 1.2, size=2)
    return max(32, round(w * scale[0])), max(32, round(h * scale[1]))


def write_one(job: tuple) -> tuple[int, int, int]:
    path, index, args = job
    size = image_size(index, args.width, args.height, args.seed)
    if not path.exists():
        scene = generate_scene(args.seed, index, args.scene_size).image.resize(size, Image.BICUBIC)
        pixels = np.asarray(scene, dtype=np.float32)
        pixels = pixels + np.random.default_rng([args.seed, index, 2]).standard_normal(pixels.shape) * args.grain
        tmp = path.with_suffix(".tmp")
        Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=args.quality)
        os.replace(tmp, path)
    return size[0], size[1], path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--num", type=int, default=25600)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--scene-size", type=int, default=256, help="side of the generated scene before upscaling")
    parser.add_argument("--grain", type=float, default=14.0)  # about 90 KiB per image (ImageNet: ~110 KB)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = parser.parse_args()

    start = time.perf_counter()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i // 1000:03d}" / f"scene_{i:07d}.jpg", i, args) for i in range(args.num)]
    for sub in {path.parent for path, _, _ in jobs}:
        sub.mkdir(exist_ok=True)
    with Pool(max(1, args.workers)) as pool:
        sizes = np.array(pool.map(write_one, jobs, chunksize=64), dtype=np.float64)
    print(f"jpeg folder: {len(jobs)} images, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f}, "
          f"mean {sizes[:, 2].mean() / 1024:.1f} KiB, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
