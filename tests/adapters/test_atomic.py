"""Atomic adapter writes: the path always holds a whole adapter, leftovers are cleaned, and
files get the permissions a plain write would."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, adapted

from qvera.adapters.atomic import atomic_folder, recover
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


def test_the_next_write_removes_leftovers_of_dead_writers(saved, tmp_path):
    source, _ = saved
    target = tmp_path / "adapter"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".adapter.tmp-{dead.stdout.strip()}-abc"
    stale.mkdir()
    (stale / "vectors.safetensors").write_bytes(b"half")
    live = tmp_path / f".adapter.tmp-{os.getpid()}-xyz"  # a writer still running: left alone
    live.mkdir()
    stranded = tmp_path / ".adapter.old-1234"  # old copy stranded between two renames
    stranded.mkdir()
    with atomic_folder(target) as staging:
        (staging / "file").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "adapter"]
    assert (target / "file").read_text() == "new"


def test_a_stranded_old_folder_comes_back_when_the_path_is_empty(tmp_path):
    (tmp_path / ".adapter.old-77").mkdir()
    (tmp_path / ".adapter.old-77" / "file").write_text("old")
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
