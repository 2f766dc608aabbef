"""A free-disk floor: below it, new data is refused instead of acknowledged and lost.

An instance acknowledged on a disk that fills before its bytes reach the blob store, or a
spool segment that cannot be prepared, loses data the sender believes is safe. `DiskFloor`
checks the free space of the directories a write will use before the write; under the floor
the caller refuses the data (gRPC RESOURCE_EXHAUSTED, DICOM 0xA700 Out of Resources) and the
sender keeps it and retries later.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from atlasflow.common.errors import ResourceExhausted

DOMAIN = "atlasflow"


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
