"""Atomic adapter writes: the path always holds a whole adapter, leftovers are cleaned, and
files get the permissions a plain write would."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, adapted

import qvera.adapters.atomic as atomic
from qvera.adapters.atomic import FolderWriteError, atomic_folder, recover
from qvera.adapters.format import read_adapter, save_adapter, write_adapter

# Writes two versions of an adapter to one path, alternately, until killed.
WRITER = """
import sys
from qvera.adapters.format import read_adapter, write_adapter
adapter = read_adapter(sys.argv[1])
versions = [{k: v + step for k, v in adapter.vectors.items()} for step in (1.0, 2.0)]
print("ready", flush=True)
for n in range(100000):
    adapter.vectors = versions[n % 2]
    write_adapter(adapter, sys.argv[2])
"""


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    model, _ = adapted(tiny_llama_dir)
    folder = save_adapter(model, tmp_path_factory.mktemp("atomic") / "source")
    return folder, read_adapter(folder).vectors


def test_the_path_holds_a_whole_adapter_whenever_the_writer_stops(saved, tmp_path):
    """Freeze the writer at random instants (what a kill would leave), read the path, go on;
    then kill it mid-write: every read is a complete adapter, one of the two versions."""
    source, vectors = saved
    target = tmp_path / "adapter"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(source), str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        rng = random.Random(0)
        seen, key = set(), next(iter(vectors))
        deadline = time.monotonic() + 60
        for _ in range(40):
            time.sleep(rng.uniform(0.0, 0.05))
            writer.send_signal(signal.SIGSTOP)
            try:
                if seen or target.exists():  # once written, the path is never empty
                    found = read_adapter(target).vectors  # raises on a partial or mixed folder
                    step = round(float((found[key] - vectors[key]).mean()), 3)
                    assert step in (1.0, 2.0)
                    assert all(torch.equal(found[k], vectors[k] + step) for k in vectors)
                    seen.add(step)
            finally:
                writer.send_signal(signal.SIGCONT)
        assert seen == {1.0, 2.0}, "the writer never got through both versions"
        assert time.monotonic() < deadline
        writer.kill()
        writer.wait()
        read_adapter(target)  # whole after a kill too
    finally:
        writer.kill()
    recover(target)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "the killed writer's staging folder remains"


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def test_the_next_write_removes_leftovers_of_dead_writers(saved, tmp_path):
    source, _ = saved
    target = tmp_path / "adapter"
    dead = _dead_pid()
    stale = tmp_path / f".adapter.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "vectors.safetensors").write_bytes(b"half")
    live = tmp_path / f".adapter.tmp-{os.getpid()}-xyz"  # a writer still running: left alone
    live.mkdir()
    stranded = tmp_path / f".adapter.old-{dead}-abc"  # old copy stranded between two renames
    stranded.mkdir()
    writing = tmp_path / f".adapter.old-{os.getpid()}-xyz"  # a live writer's, between its renames: left alone
    writing.mkdir()
    with atomic_folder(target) as staging:
        (staging / "file").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, writing.name, "adapter"])
    assert (target / "file").read_text() == "new"


def test_a_stranded_old_folder_comes_back_when_the_path_is_empty(tmp_path):
    stranded = tmp_path / f".adapter.old-{_dead_pid()}-abc"
    stranded.mkdir()
    (stranded / "file").write_text("old")
    recover(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "file").read_text() == "old"


def test_written_files_follow_the_umask(saved, tmp_path):
    source, _ = saved
    previous = os.umask(0o022)
    try:
        folder = write_adapter(read_adapter(source), tmp_path / "a")
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


WHERE = r"writing {folder} \(vectors.safetensors\)"


@pytest.mark.parametrize(
    "code, message",
    [
        (
            errno.ENOSPC,
            rf"no space left on device {WHERE} \({{needed}} kB needed, [\d.]+ [kMG]B free\): "
            "free space there or choose another folder",
        ),
        (errno.EDQUOT, rf"disk quota exceeded {WHERE}: free space within your quota or choose another folder"),
        (errno.EROFS, rf"read-only file system {WHERE}: choose a folder on a writable file system"),
        (errno.EIO, rf"input/output error {WHERE}: check the disk and write again, or choose another folder"),
    ],
    ids=["full", "quota", "read-only", "io"],
)
def test_a_disk_error_while_writing_is_one_line_naming_the_folder_and_the_cause(
    saved, tmp_path, monkeypatch, code, message
):
    source, vectors = saved
    folder = write_adapter(read_adapter(source), tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_write = Path.write_bytes

    def half_then_fail(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(FolderWriteError) as err:
        write_adapter(read_adapter(source), folder)
    needed = -(-sum(map(len, before.values())) // 1000)
    assert re.fullmatch(message.format(folder=re.escape(str(folder)), needed=needed), str(err.value)), str(err.value)
    assert isinstance(err.value, OSError) and (err.value.errno, err.value.strerror) == (code, os.strerror(code))
    assert err.value.filename == str(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old adapter, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the staging folder is gone


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (needs the right to mount, as root in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the monkeypatched test covers it")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_keeps_the_old_adapter_and_says_so_in_one_line(saved, tiny_disk):
    source, vectors = saved
    adapter = read_adapter(source)
    folder = write_adapter(adapter, tiny_disk / "runs" / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    filler = os.open(tiny_disk / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):  # fill the disk up to the last page
        while True:
            os.write(filler, b"\0" * 4096)
    os.close(filler)
    adapter.vectors = {k: v + 1 for k, v in vectors.items()}
    with pytest.raises(FolderWriteError) as err:
        write_adapter(adapter, folder)
    assert re.fullmatch(
        rf"no space left on device writing {re.escape(str(folder))}( \(\S+\))? \(\d+ kB needed, 0 kB free\): "
        "free space there or choose another folder",
        str(err.value),
    ), str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == ["adapter"]
    with pytest.raises(FolderWriteError, match=r"^no space left on device writing \S+/peft \(0 kB free\): free space"):
        with atomic_folder(tiny_disk / "peft") as staging:  # as export_peft and merge write: through safetensors
            safetensors.torch.save_file(vectors, staging / "adapter_model.safetensors")
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "runs"]
    (tiny_disk / "filler").unlink()
    write_adapter(adapter, folder)  # space freed: the same call now succeeds
    assert all(torch.equal(read_adapter(folder).vectors[k], vectors[k] + 1) for k in vectors)


def test_a_failed_second_rename_puts_the_old_adapter_back(saved, tmp_path, monkeypatch):
    """Without an atomic exchange a write takes two renames; when the second fails the path
    must not stay empty."""
    source, _ = saved
    folder = write_adapter(read_adapter(source), tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_rename = os.rename

    def second_rename_fails(source, destination):
        staged = os.path.basename(source).startswith(".adapter.tmp-")
        if staged and os.fspath(destination) == str(folder) and any(tmp_path.glob(".adapter.old-*")):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(destination))
        return real_rename(source, destination)

    monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(FolderWriteError, match=f"^input/output error writing {re.escape(str(folder))}: "):
        write_adapter(read_adapter(source), folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
