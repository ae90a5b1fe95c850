"""Generated scenes kept as one uint8 array on disk, so that long runs are not bound by scene generation.

A scene takes milliseconds of one core to generate (docs/benchmarks.md); a GPU step consumes hundreds of them
in less. The array (N, H, W, 3) is made once, by a pool of processes, written under a temporary name and
renamed when complete (a crash leaves no half array), and guarded by a file lock so that jobs started side
by side wait for one maker instead of each making it. It is read through a memory map: DataLoader workers
and the jobs of a sweep share its pages. Its pixels are generate_scene's, bit for bit.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from densecl.data.synthetic import FORMAT_VERSION, generate_scene

log = logging.getLogger(__name__)

CHUNK = 256  # scenes per task of the pool
IN_PROCESS_BELOW = 512  # smaller sets are made in this process: a pool costs more than it saves


class SceneCacheError(ValueError):
    """A cache file that cannot be used or made; names the file and what was expected."""


def cache_path(cache_dir: str | os.PathLike, seed: int, num_images: int, image_size: int) -> Path:
    """The file of one set of scenes; its name holds everything its pixels depend on."""
    return Path(cache_dir) / f"scenes-v{FORMAT_VERSION}-seed{seed}-{num_images}x{image_size}px.npy"


def cached_scenes(cache_dir: str | os.PathLike, seed: int, num_images: int, image_size: int,
                  processes: int | None = None) -> np.ndarray:
    """The scenes 0..num_images-1 of set `seed` as a read-only uint8 memory map (N, H, W, 3), made first if
    no process has made them yet."""
    path = cache_path(cache_dir, seed, num_images, image_size)
    if not path.exists():
        with _locked(path):
            if not path.exists():  # another job may have made it while this one waited
                _make(path, seed, num_images, image_size, processes)
    try:
        pixels = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise SceneCacheError(f"scene cache {path} is unreadable ({err}): delete it to have it made again") from None
    expected = (num_images, image_size, image_size, 3)
    if pixels.dtype != np.uint8 or pixels.shape != expected:
        raise SceneCacheError(f"scene cache {path} holds {pixels.dtype} {pixels.shape}, expected uint8 {expected}: "
                              f"delete it to have it made again")
    return pixels


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _scene_pixels(args: tuple[int, int, int, int]) -> np.ndarray:
    seed, start, stop, image_size = args
    return np.stack([np.asarray(generate_scene(seed, i, image_size).image) for i in range(start, stop)])


def _make(path: Path, seed: int, num_images: int, image_size: int, processes: int | None) -> None:
    shape = (num_images, image_size, image_size, 3)
    needed = int(np.prod(shape)) + 4096
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise SceneCacheError(f"scene cache {path} needs {needed / 2**30:.2f} GiB, its disk has "
                              f"{free / 2**30:.2f} GiB free: free some space, or unset data.cache_dir")
    tmp = path.with_name(path.name + ".tmp")
    tasks = [(seed, start, min(start + CHUNK, num_images), image_size) for start in range(0, num_images, CHUNK)]
    log.info("generating %d scenes of %d px into %s (%.2f GiB), once", num_images, image_size, path, needed / 2**30)
    try:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if num_images < IN_PROCESS_BELOW:
            chunks = map(_scene_pixels, tasks)
            _fill(pixels, tasks, chunks)
        else:
            workers = processes or min(os.cpu_count() or 1, 32)
            # spawn: the pool's children start clean, whatever threads this process (torch, a loader) runs
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                _fill(pixels, tasks, pool.imap(_scene_pixels, tasks))
        pixels.flush()
        del pixels
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fill(pixels: np.ndarray, tasks, chunks) -> None:
    for (_, start, stop, _), chunk in zip(tasks, chunks):
        pixels[start:stop] = chunk
