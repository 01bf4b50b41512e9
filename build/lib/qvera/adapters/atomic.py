"""Folder writes that never leave the target path without a complete folder.

A write goes to a staging folder beside the target. A new target appears by one rename; an
existing one is swapped with the staging folder in one step (Linux `renameat2` with
RENAME_EXCHANGE), so at every instant the path holds either the old folder or the new one.
Where that call is missing, two renames are used, and the next write (or read through
`recover`) puts a folder stranded between them back. Leftovers of killed writes are removed
by the next write to the same path.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system has no such call."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(a))


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (threads may be running)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publishable(staging: Path) -> None:
    """mkdtemp makes a private folder; give it, and its files, the permissions a plain mkdir would."""
    mask = _umask()
    staging.chmod(0o777 & ~mask)
    for path in staging.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _staging_prefix(folder: Path) -> str:
    return f".{folder.name}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(folder: str | Path) -> None:
    """Clean up after killed writes to `folder`: put back a folder stranded between two renames
    (systems without an atomic exchange), and remove staging folders whose writer is gone."""
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return
    old_prefix = f".{folder.name}.old-"
    for path in sorted(parent.glob(f"{old_prefix}*")):
        if not folder.exists():
            os.rename(path, folder)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(f"{_staging_prefix(folder)}*"):
        pid = path.name.removeprefix(_staging_prefix(folder)).split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_folder(folder: str | Path, replaceable: set[str] | None = None):
    """Yield an empty staging folder; on success it takes `folder`'s place atomically.

    `replaceable`: file names an existing `folder` may hold and still be replaced (an older
    adapter); None allows only a missing or empty folder. The staging folder is a sibling, so
    the rename never crosses file systems; a killed write leaves only a hidden
    `.name.tmp-<pid>-*`, removed by the next write.
    """
    folder = Path(folder)
    recover(folder)
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
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{_staging_prefix(folder)}{os.getpid()}-"))
    try:
        yield staging
        _publishable(staging)
        _fsync_tree(staging)
        if not folder.exists():
            os.rename(staging, folder)
        elif not _exchange(staging, folder):
            # No atomic exchange here: two renames; a crash between them leaves the old folder
            # whole under its hidden name, and `recover` puts it back.
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the old folder
