"""The scene cache (densecl.data.scene_cache): generate_scene's pixels bit for bit, made once, shared by waiting
makers, never left half written, and a bad file named; a pre-training reads the same images through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import tiny_config

from densecl.data import scene_cache
from densecl.data.scene_cache import SceneCacheError, cache_path, cached_scenes
from densecl.data.settings import DataConfig
from densecl.data.sources import SyntheticScenes
from densecl.data.synthetic import generate_scene
from densecl.training.pretrain import pretrain
from densecl.weights.published import load_backbone_weights


def test_cached_pixels_are_the_generated_ones_in_and_out_of_process(tmp_path, monkeypatch):
    monkeypatch.setattr(scene_cache, "CHUNK", 5)  # several chunks, the last one short
    small = cached_scenes(tmp_path / "a", seed=3, num_images=12, image_size=40)  # in this process
    monkeypatch.setattr(scene_cache, "IN_PROCESS_BELOW", 0)
    pooled = cached_scenes(tmp_path / "b", seed=3, num_images=12, image_size=40, processes=2)  # a pool
    for i in range(12):
        expected = np.asarray(generate_scene(3, i, 40).image)
        assert np.array_equal(small[i], expected) and np.array_equal(pooled[i], expected), i
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_the_cache_is_made_once_and_its_name_holds_what_its_pixels_depend_on(tmp_path, monkeypatch):
    first = cached_scenes(tmp_path, seed=0, num_images=4, image_size=32)
    monkeypatch.setattr(scene_cache, "_make", lambda *a: pytest.fail("made a second time"))
    again = cached_scenes(tmp_path, seed=0, num_images=4, image_size=32)
    assert np.array_equal(first, again)
    names = {cache_path(tmp_path, *args).name for args in [(0, 4, 32), (1, 4, 32), (0, 5, 32), (0, 4, 33)]}
    assert len(names) == 4


def _race(cache_dir, barrier, out) -> None:
    barrier.wait()
    pixels = cached_scenes(cache_dir, seed=0, num_images=4, image_size=32)
    np.save(out, np.asarray(pixels))


def test_two_processes_racing_for_the_cache_make_it_once(tmp_path, monkeypatch):
    """Jobs started side by side: the file lock makes one of them the maker; the other waits, then reads what
    it made (a slow maker leaves time for the race)."""
    import multiprocessing
    import time

    makes = tmp_path / "makes.txt"
    real = scene_cache._make

    def slow_make(path, *args):
        with open(makes, "a") as log:
            log.write(f"{path}\n")
        time.sleep(0.5)
        real(path, *args)

    monkeypatch.setattr(scene_cache, "_make", slow_make)
    context = multiprocessing.get_context("fork")  # the children keep the slow, counting maker
    barrier = context.Barrier(2)
    racers = [context.Process(target=_race, args=(tmp_path / "cache", barrier, tmp_path / f"out{k}.npy"))
              for k in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert [racer.exitcode for racer in racers] == [0, 0]
    assert len(makes.read_text().splitlines()) == 1
    expected = np.stack([np.asarray(generate_scene(0, i, 32).image) for i in range(4)])
    assert all(np.array_equal(np.load(tmp_path / f"out{k}.npy"), expected) for k in range(2))


def test_a_failed_make_leaves_no_file_and_the_next_call_makes_it(tmp_path, monkeypatch):
    real = scene_cache._scene_pixels

    def crash(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(scene_cache, "_scene_pixels", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_scenes(tmp_path, seed=0, num_images=4, image_size=32)
    assert not cache_path(tmp_path, 0, 4, 32).exists() and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(scene_cache, "_scene_pixels", real)
    assert cached_scenes(tmp_path, seed=0, num_images=4, image_size=32).shape == (4, 32, 32, 3)


def test_a_file_of_the_wrong_shape_or_a_broken_one_is_named(tmp_path):
    path = cache_path(tmp_path, 0, 4, 32)
    np.save(path, np.zeros((3, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(SceneCacheError, match=f"{path}.*expected uint8 \\(4, 32, 32, 3\\)"):
        cached_scenes(tmp_path, seed=0, num_images=4, image_size=32)
    path.write_bytes(b"not an array")
    with pytest.raises(SceneCacheError, match=f"{path} is unreadable"):
        cached_scenes(tmp_path, seed=0, num_images=4, image_size=32)


def test_a_disk_without_room_is_an_error_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(scene_cache.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(SceneCacheError, match="needs .* GiB, its disk has"):
        cached_scenes(tmp_path, seed=0, num_images=4, image_size=32)
    assert not list(tmp_path.glob("scenes-*.npy")) and not list(tmp_path.glob("*.tmp"))


def test_the_dataset_returns_the_same_images_with_and_without_the_cache(tmp_path):
    plain, cached = SyntheticScenes(6, 48, seed=2), SyntheticScenes(6, 48, seed=2, cache_dir=tmp_path)
    for i in (0, 5, -1):
        assert np.array_equal(np.asarray(plain[i]), np.asarray(cached[i]))
        assert np.array_equal(plain.pixels(i), cached.pixels(i))
    with pytest.raises(IndexError):
        cached[6]


def test_pretraining_through_the_cache_gives_the_same_weights(tmp_path):
    data = dict(kind="synthetic", num_images=16, image_size=64, seed=0)
    direct = pretrain(tiny_config(data=DataConfig(**data), iters=2), tmp_path / "direct")
    cached = pretrain(tiny_config(data=DataConfig(**data, cache_dir=str(tmp_path / "cache")), iters=2),
                      tmp_path / "cached")
    assert cache_path(tmp_path / "cache", 0, 16, 64).is_file()
    (a, _), (b, _) = load_backbone_weights(direct.backbone_path), load_backbone_weights(cached.backbone_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
