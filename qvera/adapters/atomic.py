"""Folder writes that never leave a half-written folder at the target path.

Every write goes to a staging folder beside the target and replaces it by rename, so a killed
write leaves the previous folder (or nothing), never a mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_folder(folder: str | Path, replaceable: set[str] | None = None):
    """Yield an empty staging folder; on success it takes `folder`'s place by rename.

    `replaceable`: file names an existing `folder` may hold and still be replaced (an older
    adapter); None allows only a missing or empty folder. The staging folder is a sibling, so
    the rename never crosses file systems; a killed write leaves only a hidden `.name.tmp-*`.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder} is a file; give a folder path to write to")
        present = {p.name for p in folder.iterdir()}
        if present and not present <= (replaceable or set()):
            raise ValueError(
                f"{folder} already holds other files ({', '.join(sorted(present - (replaceable or set()))[:3])}); "
                "write to a new or empty folder"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        yield staging
        _fsync_tree(staging)
        if folder.exists():
            # Two renames: the window between them is microseconds, and a crash there leaves
            # the old adapter whole under its hidden name.
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old)
        else:
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
