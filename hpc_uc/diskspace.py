"""Free space checked before a large write, so a full disk is one line, not a crash mid-write."""
from __future__ import annotations

import shutil
from pathlib import Path

MARGIN = 16 << 20  # what a write needs beyond its payload (HDF5 metadata, manifests)


def require_free(directory: str | Path, need: int, what: str) -> None:
    """UserError unless the file system holding ``directory`` has ``need`` bytes (+ a margin) free."""
    from .errors import UserError

    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need + MARGIN:
        raise UserError(f"not enough disk space for {what} in {path}: about {(need + MARGIN) / 2**20:.0f} MiB "
                        f"needed, {free / 2**20:.0f} MiB free; free some space and run again "
                        f"(earlier outputs are kept)")
