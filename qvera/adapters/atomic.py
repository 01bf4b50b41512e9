"""Folder writes that never leave the target path without a complete folder, and reads that
see one version of it, whatever writers do meanwhile.

A write goes to a staging folder beside the target and is published whole: a new target
appears by one rename; an existing one is swapped with the staging folder in one step (Linux
`renameat2` with RENAME_EXCHANGE), so at every instant the path holds either the old folder or
the new one. Where the file system cannot exchange (NFS, older ZFS), two renames are used: the
path is missing for an instant, `read_files` waits that instant out, and the next write puts
back a folder stranded between them by a killed writer. Concurrent writers each succeed; the
last to publish wins. Leftovers of killed writes are removed by the next write to the path.

A published folder is never written into again (a later write replaces it whole): that is what
lets `read_files` read several files of one version without a lock.

Every disk error while writing is a `FolderWriteError`: one line naming the folder and the
cause, with what the path held before left untouched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

AT_FDCWD = -100
RENAME_EXCHANGE = 2
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)
READ_ATTEMPTS = 100  # reads started over because writers replaced the folder meanwhile
SWAP_WAIT_S = 0.01  # between looks at a path two renames have emptied for an instant

# What to do about a failed write, by its cause; any other cause gets DEFAULT_FIX.
FIXES = {
    errno.ENOSPC: "free space there or choose another folder",
    errno.EDQUOT: "free space within your quota or choose another folder",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
}
DEFAULT_FIX = "check the disk and write again, or choose another folder"


class FolderWriteError(OSError):
    """A disk error while writing a folder (no space, quota, read-only, permissions, I/O);
    what the folder held before is untouched. `str()` is one line naming the folder, the file
    and the cause, and the fix; as for any OSError, `errno` and `strerror` are the failed
    call's (`errno.ENOSPC`, "No space left on device" for a full disk), `filename` the folder."""

    def __init__(self, folder: Path, err: OSError, staging: Path | None, size: int | None):
        cause = (err.strerror or str(err)).lower()
        failed = os.fspath(err.filename) if err.filename is not None else None
        where = ""
        if failed and staging is not None and failed.startswith(os.fspath(staging) + os.sep):
            where = f" ({Path(failed).relative_to(staging)})"
        elif failed and failed != os.fspath(folder) and not Path(failed).name.startswith(_staging_prefix(folder)):
            where = f" ({failed})"
        sizes = ""
        if err.errno == errno.ENOSPC:
            free = _free_bytes(folder.parent)
            known = [f"{_amount(size)} needed"] if size is not None else []
            known += [f"{_amount(free)} free"] if free is not None else []
            sizes = f" ({', '.join(known)})" if known else ""
        self.message = f"{cause} writing {folder}{where}{sizes}: {FIXES.get(err.errno, DEFAULT_FIX)}"
        super().__init__(err.errno, err.strerror or str(err), os.fspath(folder))

    def __str__(self) -> str:
        return self.message


def _amount(size: int) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.1f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{-(-size // 1000)} kB"


def _free_bytes(folder: Path) -> int | None:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system has no such call. Raises
    FileNotFoundError where either is missing."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def _fsync(path: Path) -> None:
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


def _old_prefix(folder: Path) -> str:
    return f".{folder.name}.old-"


def _writer_gone(path: Path, prefix: str) -> bool:
    """Whether the writer that made `path` (named `<prefix><pid>-...`) is no longer running."""
    pid = path.name.removeprefix(prefix).split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover(folder: str | Path) -> None:
    """Clean up after killed writes to `folder`: put back a folder stranded between two renames
    (systems without an atomic exchange), and remove staging folders; only those whose writer
    is gone, so that concurrent writers are left to finish."""
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return
    for path in sorted(parent.glob(f"{_old_prefix(folder)}*")):
        if not _writer_gone(path, _old_prefix(folder)):
            continue
        try:
            os.rename(path, folder)  # only where the path is missing (or an empty folder)
        except OSError:  # the path holds a folder: the stranded one is stale
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(f"{_staging_prefix(folder)}*"):
        if _writer_gone(path, _staging_prefix(folder)):
            shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, folder: Path) -> None:
    """Put the complete `staging` folder at `folder`'s place. Each pass either publishes or
    finds that another writer changed the path meanwhile, so it ends once they stop."""
    old = folder.parent / staging.name.replace(_staging_prefix(folder), _old_prefix(folder), 1)
    while True:
        try:
            os.rename(staging, folder)  # the path is missing (or an empty folder)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            if _exchange(staging, folder):
                return  # the staging path now holds the old folder, removed by the caller
        except FileNotFoundError:  # removed since the rename above: rename again
            continue
        # No atomic exchange here: two renames; a crash between them leaves the old folder
        # whole under its hidden name, and `recover` puts it back.
        try:
            os.rename(folder, old)
        except FileNotFoundError:
            continue
        try:
            os.rename(staging, folder)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                with suppress(OSError):  # the write failed: the old folder goes back
                    os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)  # another writer published between the two renames
            continue
        shutil.rmtree(old, ignore_errors=True)
        return


def _check_replaceable(folder: Path, replaceable: set[str] | None) -> None:
    # One stat: exists() then is_dir() read a folder that another writer's two renames took
    # away between them as a file.
    try:
        is_file = not stat.S_ISDIR(folder.stat().st_mode)
    except FileNotFoundError:
        is_file = False
    if is_file:
        raise ValueError(f"{folder} is a file; give a folder path to write to")
    try:
        present = {p.name for p in folder.iterdir()}
    except FileNotFoundError:
        return
    if present and not present <= (replaceable or set()):
        raise ValueError(
            f"{folder} already holds other files ({', '.join(sorted(present - (replaceable or set()))[:3])}); "
            "write to a new or empty folder"
        )


@contextmanager
def atomic_folder(folder: str | Path, replaceable: set[str] | None = None, *, size: int | None = None):
    """Yield an empty staging folder; on success it takes `folder`'s place atomically.

    `replaceable`: file names an existing `folder` may hold and still be replaced (an older
    adapter); None allows only a missing or empty folder. `size`: the bytes the write needs,
    named in a no-space error. The staging folder is a sibling, so the rename never crosses
    file systems; a killed write leaves only a hidden `.name.tmp-<pid>-*`, removed by the next
    write. Raises FolderWriteError for any OSError while writing (in the caller's block too,
    and safetensors' errors that carry one), once the staging folder is removed; ValueError for
    a folder it must not replace.
    """
    folder = Path(folder)
    staging = None
    try:
        recover(folder)
        _check_replaceable(folder, replaceable)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{_staging_prefix(folder)}{os.getpid()}-"))
        try:
            yield staging
            _publishable(staging)
            for path in [*staging.iterdir(), staging]:
                _fsync(path)
            _publish(staging, folder)
            # So that the rename survives a power cut; published already, so a file system
            # that cannot sync a folder costs only that.
            with suppress(OSError):
                _fsync(folder.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the old folder
    except OSError as err:
        raise FolderWriteError(folder, err, staging, size) from err
    except SafetensorError as err:  # safetensors' own writes (export_peft, merge) report the OS error in text
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise FolderWriteError(folder, OSError(int(code[1]), os.strerror(int(code[1]))), staging, size) from err


def read_files(folder: str | Path, names: list[str]) -> dict[str, bytes | None]:
    """The bytes of the files `names` in `folder`, all of one version of it (None for a file it
    lacks), however writers replace the folder meanwhile.

    The folder is opened once and every file through that handle, so all come from one
    directory, and a published folder is never written into. A writer replacing it deletes the
    old directory's files, so one may vanish before it is opened: the read then starts over
    if the path no longer names the directory read (its device and inode differ; the open
    handle keeps that inode from being reused). An open file stays readable when deleted, so
    a read that found every file is whole even if the folder was replaced after. A lock shared
    with writers would also do, but a stalled reader would then block a training run's save.

    Raises FileNotFoundError (NotADirectoryError for a file) where `folder` is not a folder,
    after waiting out two renames in progress; TimeoutError where writers replaced it on every
    one of READ_ATTEMPTS reads.
    """
    folder = Path(folder)
    for attempt in range(READ_ATTEMPTS):
        try:
            handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            # Missing for an instant between two renames: a writer's old folder beside it says
            # one is under way; the path back already says one just finished.
            if attempt + 1 < READ_ATTEMPTS and any(folder.parent.glob(f"{_old_prefix(folder)}*")):
                time.sleep(SWAP_WAIT_S)
                continue
            if attempt + 1 < READ_ATTEMPTS and folder.exists():
                continue
            raise
        try:
            found = {name: _read_at(handle, name) for name in names}
            if None not in found.values() or _names(folder, handle):
                return found
        finally:
            os.close(handle)
    raise TimeoutError(f"{folder} was replaced by a writer during each of {READ_ATTEMPTS} reads; read it again")


def _read_at(handle: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=handle)  # a FIFO there must not block
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return file.read()


def _names(folder: Path, handle: int) -> bool:
    """Whether the path `folder` still names the open directory `handle`."""
    try:
        now, read = os.stat(folder), os.fstat(handle)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (read.st_dev, read.st_ino)
