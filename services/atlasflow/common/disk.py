"""A free-disk floor: below it, new data is refused instead of acknowledged and lost.

An instance acknowledged on a disk that fills before its bytes reach the blob store, or a
spool segment that cannot be prepared, loses data the sender believes is safe. `DiskFloor`
checks the free space of the directories a write will use before the write; under the floor
the caller refuses the data (gRPC RESOURCE_EXHAUSTED, DICOM 0xA700 Out of Resources) and the
sender keeps it and retries later.

`write_atomically` / `atomic_write`: a file is written whole or not at all (temp file in the
same folder, fsync, rename, fsync the folder): a reader or a killed writer never sees half of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from atlasflow.common.errors import ResourceExhausted

DOMAIN = "atlasflow"


def write_atomically(dest: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create or replace ``dest`` with what ``write`` writes to the open file, atomically and
    durably (the folder is created if missing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(path: Path, data: bytes) -> None:
    """`write_atomically` of ``data``."""
    write_atomically(Path(path), lambda f: f.write(data))


class DiskFloor:
    """Refuses writes while any of ``paths`` has less than ``min_free_bytes`` free (0: off)."""

    def __init__(self, paths: Iterable[Path | str], min_free_bytes: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.min_free_bytes = int(min_free_bytes)

    def free_bytes(self) -> int:
        """The least free space, in bytes, over the watched directories."""
        return min(shutil.disk_usage(p).free for p in self.paths)

    def check(self) -> None:
        """ResourceExhausted("DISK_FULL") when the free space is below the floor."""
        if self.min_free_bytes <= 0 or not self.paths:
            return
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise ResourceExhausted(
                "DISK_FULL",
                "not enough free disk space to accept new data; retry later",
                domain=DOMAIN,
                metadata={"free_mb": str(free // (1024 * 1024)), "floor_mb": str(self.min_free_bytes // (1024 * 1024))},
            )
