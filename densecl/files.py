"""Files written atomically: a crash or a full disk mid-write leaves the previous file, never half of one."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class DiskFullError(OSError):
    """Not enough space to write a file; names the folder, the size needed and the space left."""

    def __init__(self, folder: Path, needed: int, free: int):
        super().__init__(
            errno.ENOSPC,
            f"no space to write {needed / 2**20:.1f} MiB into {folder}: {free / 2**20:.1f} MiB left on its disk. "
            f"Free some space (or point the output folder elsewhere) and run again: the previous file is intact",
        )


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """`write(file)` into memory, then onto disk as `<name>.tmp` renamed over `path`.

    Serialising first tells the size before the disk is touched: a disk without room for it is an error
    (DiskFullError) before anything is written, and a write that still runs out of space removes its
    temporary file. Either way the previous `path` is left as it was."""
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getbuffer()
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if len(data) > free:
        raise DiskFullError(folder, len(data), free)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(folder, len(data), shutil.disk_usage(folder).free) from err
        raise
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """`payload` as indented JSON with sorted keys, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return write_atomic(path, lambda file: file.write(text.encode()))
