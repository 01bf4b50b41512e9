"""Concurrent writers and readers of one adapter folder: every writer succeeds, the last
complete write wins, and a reader sees one whole version, never a mix, with or without an
atomic exchange on the file system."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
import torch
from conftest import adapted

import qvera.adapters.atomic as atomic
from qvera.adapters.format import read_adapter, save_adapter, write_adapter

# "exchange": the Linux path (renameat2 RENAME_EXCHANGE); "renames": file systems without
# it (NFS, older ZFS), where a write is two renames.
MODES = ["exchange", "renames"]
READ_SECONDS = 3.0


@pytest.fixture(scope="module")
def source(tiny_llama_dir, tmp_path_factory):
    model, _ = adapted(tiny_llama_dir)
    return read_adapter(save_adapter(model, tmp_path_factory.mktemp("concurrent") / "source"))


@pytest.fixture
def mode(request, monkeypatch):
    if request.param == "renames":
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)  # forked writers inherit it
    return request.param


def _version(adapter, step: float):
    return type(adapter)(adapter.config, {k: v + step for k, v in adapter.vectors.items()})


def _step_of(found, source) -> float:
    """Which version `found` is; asserts every vector is of that one version."""
    key = next(iter(source.vectors))
    step = round(float((found.vectors[key] - source.vectors[key]).mean()), 3)
    assert all(torch.equal(found.vectors[k], source.vectors[k] + step) for k in source.vectors), "mixed versions"
    return step


def _write_forever(source, target, steps, ready):
    versions = [_version(source, step) for step in steps]
    ready.set()
    for n in range(10**6):
        write_adapter(versions[n % 2], target)


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_a_reader_never_sees_a_corrupt_adapter_while_two_writers_swap_it(source, tmp_path, mode):
    """Two writer processes rewrite one path as fast as they can (four versions in all); a
    reader reads it in a loop for a few seconds: every read is one whole version."""
    target = tmp_path / "adapter"
    fork = multiprocessing.get_context("fork")
    ready = [fork.Event(), fork.Event()]
    writers = [
        fork.Process(target=_write_forever, args=(source, target, steps, event), daemon=True)
        for steps, event in zip([(1.0, 2.0), (3.0, 4.0)], ready)
    ]
    for writer in writers:
        writer.start()
    try:
        assert all(event.wait(30) for event in ready)
        while not target.exists():
            time.sleep(0.001)
        seen, reads, errors = set(), 0, []
        deadline = time.monotonic() + READ_SECONDS
        while time.monotonic() < deadline:
            try:
                seen.add(_step_of(read_adapter(target), source))
            except (ValueError, OSError) as err:
                errors.append(str(err))
            reads += 1
        assert all(writer.is_alive() for writer in writers), "a writer failed"
    finally:
        for writer in writers:
            writer.kill()
            writer.join()
    assert errors == [], f"{len(errors)} of {reads} reads failed, first: {errors[0]}"
    assert seen <= {1.0, 2.0, 3.0, 4.0} and len(seen) >= 2, seen
    _step_of(read_adapter(target), source)  # whole after the writers are killed mid-write too


def _write_at_the_barrier(version, target, barrier, errors):
    """write_adapter, its first rename of the staged folder onto the target held until every
    writer is there: all have found the target missing, and all publish at one instant."""
    real_rename = os.rename

    def rename_at_the_barrier(source, destination):
        if os.fspath(destination) == os.fspath(target) and not held:
            held.append(True)
            barrier.wait()
        return real_rename(source, destination)

    held = []
    os.rename = rename_at_the_barrier  # in this forked writer only
    try:
        write_adapter(version, target)
    except Exception as err:  # noqa: B902 - any failure of a writer fails the test
        errors.put(f"{type(err).__name__}: {err}")


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_simultaneous_first_writes_of_a_folder_all_succeed(source, tmp_path, mode):
    """Six writer processes publish the first version of one new folder at the same instant,
    three times over: each succeeds, the folder is one whole version, nothing else is left."""
    writers, rounds = 6, 3
    fork = multiprocessing.get_context("fork")
    versions = [_version(source, float(step)) for step in range(1, writers + 1)]
    errors = fork.Queue()
    for round_ in range(rounds):
        target = tmp_path / f"adapter-{round_}"
        barrier = fork.Barrier(writers)
        processes = [
            fork.Process(target=_write_at_the_barrier, args=(version, target, barrier, errors)) for version in versions
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        assert errors.empty(), f"round {round_}: {errors.get()}"
        assert [process.exitcode for process in processes] == [0] * writers
        assert _step_of(read_adapter(target), source) in range(1, writers + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"adapter-{n}" for n in range(rounds))


def test_a_write_between_reading_the_description_and_the_vectors_is_not_a_corruption(source, tmp_path, monkeypatch):
    """The worst instant for a reader, made certain: the folder is replaced right after its
    qvera_adapter.json has been read. The reader returns one whole version."""
    target = write_adapter(_version(source, 1.0), tmp_path / "adapter")
    real_loads = json.loads

    def loads_then_replace(text, *args, **kwargs):
        monkeypatch.setattr(json, "loads", real_loads)
        write_adapter(_version(source, 2.0), target)
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", loads_then_replace)
    assert _step_of(read_adapter(target), source) == 1.0
    assert _step_of(read_adapter(target), source) == 2.0
