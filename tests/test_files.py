"""Atomic writes: a full disk is a clear error that loses nothing, and pre-training resumes after one."""

import errno
import shutil

import pytest
import torch

from densecl import files
from densecl.files import DiskFullError, write_atomic, write_json
from densecl.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from densecl.training.pretrain import pretrain
from tests.test_engine import tiny_config


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = write_json(tmp_path / "sub" / "a.json", {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["a.json"]


def disk_with_free_space(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_a_disk_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    path = write_json(tmp_path / "metrics.json", {"AP": 1.0})
    disk_with_free_space(monkeypatch, free=3 * 2**20)
    with pytest.raises(DiskFullError) as err:
        write_atomic(path, lambda f: f.write(bytes(5 * 2**20)))
    assert err.value.errno == errno.ENOSPC
    assert f"no space to write 5.0 MiB into {tmp_path}: 3.0 MiB left on its disk" in str(err.value)
    assert path.read_text() == '{\n  "AP": 1.0\n}\n'  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_write_that_runs_out_of_space_removes_its_temporary(tmp_path, monkeypatch):
    """The space can go between the check and the write (another job writes too): the disk answers ENOSPC."""
    path = write_json(tmp_path / "metrics.json", {"AP": 1.0})

    class FillsUp:
        def __init__(self, name, mode):
            self.file = open(name, mode)  # noqa: SIM115

        def write(self, data):
            self.file.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(files, "open", FillsUp, raising=False)
    with pytest.raises(DiskFullError, match=f"no space to write .* into {tmp_path}"):
        write_atomic(path, lambda f: f.write(bytes(4096)))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert path.read_text() == '{\n  "AP": 1.0\n}\n'


def test_pretraining_on_a_full_disk_stops_keeps_its_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    reference = pretrain(tiny_config(ckpt_every=100), tmp_path / "straight")  # the final checkpoint only
    out = tmp_path / "full"
    saved = []
    real_write = files.write_atomic

    def fill_up_after_first(path, write):
        if saved:  # the first checkpoint fits; then the disk is full
            disk_with_free_space(monkeypatch, free=2**20)
        saved.append(path)
        return real_write(path, write)

    monkeypatch.setattr("densecl.training.checkpoint.write_atomic", fill_up_after_first)
    with pytest.raises(DiskFullError, match=f"into {out}: 1.0 MiB left"):
        pretrain(tiny_config(), out)
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2  # the last good checkpoint is intact
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME]  # no temporary file left behind
    monkeypatch.undo()
    resumed = pretrain(tiny_config(), out)
    a, b = load_checkpoint(reference.checkpoint_path)["model"], load_checkpoint(resumed.checkpoint_path)["model"]
    assert resumed.iterations == 6 and a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
