"""The repository stands alone: a fresh clone has every file it needs and names no path outside it."""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "/work" + "/")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    offenders = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders, offenders


def test_bundled_data_matches_its_checksums_and_carries_its_license():
    data = ROOT / "data"
    sums = dict(line.split()[::-1] for line in (data / "SHA256SUMS").read_text().splitlines())
    assert {"alpaca_en_demo.json", "lima_eval50.json", "general_knowledge.json"} <= set(sums)
    for name, digest in sums.items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name
    readme = (data / "README.md").read_text()
    assert "CC BY-NC 4.0" in readme and "inherits" in readme
    assert (data / "ALPACA_DATA_LICENSE_CC_BY_NC_4.0.txt").is_file()


# Which qvera packages each package may import: arrows run one way.
MAY_IMPORT = {
    "core": {"core"},
    "adapters": {"core", "adapters"},
    "generation": {"core", "adapters", "generation"},
    "serving": {"core", "adapters", "generation", "serving"},
    "training": {"core", "adapters", "generation", "training"},
}


def qvera_imports(path: Path) -> set[str]:
    """The qvera modules a source file imports (`qvera.core.vera`), at any depth in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("qvera.")}


def test_imports_run_one_way_between_the_packages():
    offenders = []
    for package, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT / "qvera" / package).glob("*.py")):
            for name in qvera_imports(path):
                if name.split(".")[1] not in allowed | {"version"}:
                    offenders.append(f"qvera/{package}/{path.name} imports {name}")
    assert not offenders, offenders
    # And the test sees an arrow when there is one.
    assert "qvera.generation.decode" in qvera_imports(ROOT / "qvera" / "training" / "demo.py") | qvera_imports(
        ROOT / "qvera" / "training" / "evaluate.py"
    )


def module_level_imports(path: Path) -> set[str]:
    """The qvera modules a source file imports when it is imported (or type-checked): statements at
    its top level and inside top-level `if`/`try` blocks (TYPE_CHECKING too), not inside functions."""
    names, pending = set(), list(ast.parse(path.read_text(encoding="utf-8")).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            pending += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            pending += node.body
    return {n for n in names if n.startswith("qvera.")}


def import_cycles(root: Path) -> list[list[str]]:
    """Every cycle of module-level imports between the modules under `root`/qvera, one per cycle."""
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (root / "qvera").rglob("*.py")
    }
    graph = {
        name: {n for n in module_level_imports(path) if n in modules and n != name} for name, path in modules.items()
    }
    cycles, done = [], set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name) :]
            if set(cycle) not in [set(c) for c in cycles]:
                cycles.append(cycle + [name])
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_no_module_level_import_cycle_inside_qvera(tmp_path):
    assert import_cycles(ROOT) == []
    # And the test sees a cycle when there is one: two modules importing each other, one only for typing.
    package = tmp_path / "qvera" / "adapters"
    package.mkdir(parents=True)
    (package / "fit.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qvera.adapters.format import Adapter\n"
    )
    (package / "format.py").write_text("from qvera.adapters.fit import check_fits\n")
    assert import_cycles(tmp_path) == [["qvera.adapters.fit", "qvera.adapters.format", "qvera.adapters.fit"]]
