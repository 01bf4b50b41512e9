"""The adapters folder behind a server: which adapters this base can serve, and which stay
resident.

Every sub-folder holding a qvera adapter or a peft VeRA one is read and checked against the
base once (again when one of its files changes), so `/v1/models` lists only adapters that load
here; hidden folders (leftovers of interrupted writes) and unservable ones (a peft LoRA among
them) are skipped with one warning line. At most `max_resident` adapters stay in memory, the
least recently used leaving first, but never one that a running request holds (`acquire` /
`release`).

A rewritten adapter folder is read again by the next request that names it: requests that
arrive once its write is complete get the new vectors, while requests already running keep
the version they started with (each version is resident under its own key until its last
request releases it).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from qvera.adapters.fit import check_fits
from qvera.adapters.format import CONFIG_FILE, PEFT_CONFIG_FILE, Adapter
from qvera.adapters.loading import is_adapter_folder, read_any
from qvera.core.attach import attach_vera, has_vera
from qvera.generation.bank import AdapterBank

ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^/\s,;:()'\"]+)+")


class AdapterNotFound(LookupError):
    """No adapter folder of that name is served here."""


class AdapterUnservable(ValueError):
    """An adapter folder that cannot be read, or whose adapter does not fit this base; the
    message names the adapter, never where the server keeps it."""


def adapter_folders(folder: str | Path, *, at_least_one: bool = True) -> list[str]:
    """The names of the adapter folders in `folder`, hidden ones left out. Raises in one line
    for a folder that does not exist or, with `at_least_one`, holds no adapter: a bare base
    needs one to size the shared projections. Needs no model, so a server checks it first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapters folder {folder} does not exist; create it and save adapters into it")
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and is_adapter_folder(p))
    if at_least_one and not names:
        raise ValueError(f"{folder} holds no adapter; save one there with qvera.adapters.save_adapter")
    return names


class AllSlotsHeld(Exception):
    """Every resident slot is held by running requests: try again once one finishes."""


class AdapterStore:
    def __init__(self, model: nn.Module, folder: str | Path, max_resident: int = 64, log=None):
        self.model, self.folder = model, Path(folder)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        names = adapter_folders(self.folder, at_least_one=not has_vera(model))
        self.lock = threading.Lock()
        self.verdicts: dict[str, tuple[tuple, str | None]] = {}  # name -> (stamp, why unservable)
        self.pins: Counter[str] = Counter()  # version key -> requests holding it
        self.current: dict[str, tuple[str, tuple]] = {}  # name -> (its newest version's key, stamp)
        self.versions = 0
        if not has_vera(model):
            self._attach_shared(names)
        # Vectors kept in the compute dtype (bf16 for an NF4 base): half the memory, same results.
        self.bank = AdapterBank(model, max_resident=max_resident, dtype=model.dtype)
        skipped = [f"{name} ({reason})" for name, reason in self._skipped_at_start()]
        skipped += [f"{name} ({why})" for name in names if (why := self._verdict(name)) is not None]
        if skipped:
            self.log(f"warning: skipped {len(skipped)} adapter folder(s) this base cannot serve: {'; '.join(skipped)}")

    def servable(self) -> list[str]:
        """The adapters that load on this base, as the folder holds them now."""
        with self.lock:
            names = self._visible()
            for gone in set(self.verdicts) - set(names):
                del self.verdicts[gone]
            return [name for name in names if self._verdict(name, warn=True) is None]

    def check(self, name: str) -> None:
        """Raise AdapterNotFound or AdapterUnservable if a request naming this adapter cannot be served."""
        with self.lock:
            if name.startswith(".") or "/" in name or "\\" in name or not self._is_folder(name):
                known = [n for n in self._visible() if self._verdict(n) is None]
                raise AdapterNotFound(
                    f"the model {name!r} does not exist; available adapters: {', '.join(known[:10]) or 'none'}"
                )
            why = self._verdict(name, warn=True)
            if why is not None:
                raise AdapterUnservable(f"adapter {name!r} cannot be served on this base: {why}")

    def acquire(self, name: str | None) -> str | None:
        """Make the adapter's newest version resident and hold it there until `release`;
        return its key in the bank (None for the base). Raises AllSlotsHeld when every
        resident slot is held by running requests, AdapterUnservable when it cannot be read."""
        if name is None:
            return None
        with self.lock:
            stamp = self._stamp(name)
            key, loaded = self.current.get(name, (None, None))
            if key not in self.bank.adapters or loaded != stamp:
                held = [k for k in self.bank.adapters if self.pins[k]]
                if len(held) >= self.bank.max_resident:
                    raise AllSlotsHeld
                adapter = self._read(name)
                if key in self.bank.adapters and not self.pins[key]:
                    self.bank.remove(key)  # superseded and unused
                self.versions += 1
                key = f"{name}@{self.versions}"
                self.bank.touch(held)  # the least recently used adapter that leaves is one nobody holds
                self.bank.add(key, adapter.vectors, adapter.config.method)
                self.current[name] = (key, stamp)
            self.pins[key] += 1
            self.bank.touch([key])
            return key

    def release(self, key: str | None) -> None:
        """Let go of a version `acquire` returned; a superseded one leaves once nobody holds it."""
        if key is None:
            return
        with self.lock:
            self.pins[key] -= 1
            if not self.pins[key]:
                del self.pins[key]
                name = key.rpartition("@")[0]
                if self.current.get(name, (None,))[0] != key and key in self.bank.adapters:
                    self.bank.remove(key)

    def resident(self) -> list[str]:
        """The names of the adapters whose newest version is in memory."""
        with self.lock:
            return sorted(name for name, (key, _) in self.current.items() if key in self.bank.adapters)

    # --- reading and checking ------------------------------------------------------------

    def _visible(self) -> list[str]:
        return adapter_folders(self.folder, at_least_one=False)

    def _skipped_at_start(self) -> list[tuple[str, str]]:
        skipped = []
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith("."):
                skipped.append((path.name, "hidden: a leftover of an interrupted write?"))
            elif path.is_dir() and not is_adapter_folder(path):
                skipped.append((path.name, f"no {CONFIG_FILE} (nor peft's {PEFT_CONFIG_FILE})"))
        return skipped

    def _is_folder(self, name: str) -> bool:
        try:
            return is_adapter_folder(self.folder / name)
        except (OSError, ValueError):  # a name no folder can have: too long, a NUL in it
            return False

    def _stamp(self, name: str) -> tuple:
        """Which version of the adapter the folder holds: the folder itself (qvera replaces it
        whole) and its newest file (peft rewrites its config and its vectors in place)."""
        try:
            folder = self.folder / name
            newest = max(path.stat().st_mtime_ns for path in folder.iterdir() if path.is_file())
            return folder.stat().st_ino, newest
        except (OSError, ValueError):  # gone, or empty
            return ()

    def _verdict(self, name: str, warn: bool = False) -> str | None:
        """Why the adapter cannot be served here (None: it can), read once per version of its files."""
        stamp = self._stamp(name)
        if self.verdicts.get(name, (None,))[0] != stamp:
            try:
                self._read(name)
                self.verdicts[name] = (stamp, None)
            except AdapterUnservable as err:
                self.verdicts[name] = (stamp, str(err))
                if warn:
                    self.log(f"warning: adapter folder {name} cannot be served on this base: {err}")
        return self.verdicts[name][1]

    def _read(self, name: str) -> Adapter:
        """The adapter in the folder `name`, read and checked against the model once."""
        with self._as_unservable(name):
            adapter = read_any(self.folder / name)
            check_fits(adapter, self.model, source=name)
        return adapter

    @contextmanager
    def _as_unservable(self, name: str):
        """ValueError and OSError become an AdapterUnservable whose message names the adapter, never
        where the server keeps it (nor other local paths)."""
        path = self.folder / name
        try:
            yield
        except (ValueError, OSError) as err:
            message = str(err).replace(str(path.resolve()), name).replace(str(path), name)
            message = ABSOLUTE_PATH.sub(lambda match: Path(match.group()).name, message)
            raise AdapterUnservable(message) from err

    def _attach_shared(self, names: list[str]) -> None:
        """Attach VeRA to the bare model as most adapters were trained (ties: the first name):
        every served adapter shares A and B, so one rank, seed and set of targets serves. The
        layers are plain VeRA: the bank runs each adapter as rows of its own method. The first
        adapter of that shape that fits this base is checked here, once, and its check's A and
        B are the ones attached."""
        groups, errors = {}, []
        for name in names:
            stamp = self._stamp(name)
            try:
                with self._as_unservable(name):
                    adapter = read_any(self.folder / name)
            except AdapterUnservable as err:
                errors.append(str(err))
                continue
            config = adapter.config.vera_config
            key = (config.rank, config.projection_seed, config.d_initial, tuple(config.target_modules))
            groups.setdefault(key, []).append((name, stamp, adapter))
        for group in sorted(groups.values(), key=len, reverse=True):  # stable: ties keep the first name
            for name, stamp, adapter in group:
                try:
                    with self._as_unservable(name):
                        fit = check_fits(adapter, self.model, source=name)
                except AdapterUnservable as err:
                    errors.append(str(err))
                    continue
                vera = dataclasses.replace(adapter.config.vera_config, method="vera")
                attach_vera(self.model, vera, projections=fit.projections)
                self.verdicts[name] = (stamp, None)
                return
        raise ValueError(f"no adapter in {self.folder} fits this base; the first says: {errors[0]}")
