"""The docs name only what exists: every repository path, `qvera.` module or attribute, and
command-line flag that README.md and docs/*.md mention is checked against the tree, an import,
and the commands' own `--help`. History (docs/benchmark-log.md) is exempt: it tells what was."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

from qvera import cli

ROOT = Path(__file__).resolve().parents[1]
HISTORY = {"benchmark-log.md"}
DOCS = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in HISTORY)]

TOP = ("qvera", "scripts", "experiments", "configs", "data", "docs", "tests")
PATH = re.compile(rf"(?<![\w/.$-])((?:{'|'.join(TOP)})/[\w./-]*\w)(::\w+)?")
MODULE = re.compile(r"(?<![\w./])qvera(?:\.\w+)+")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
# Paths the docs name as what a command writes or a user makes, not as files of the repository.
WRITTEN = re.compile(r"^(?:data/mine|docs/_)")
# Flags of other programs that the docs show beside qvera's own (pip, pytest, accelerate, vLLM, git).
FOREIGN_FLAGS = {
    "--no-index", "--no-deps", "--no-compile", "--target", "--upgrade",
    "--config_file", "--num_processes", "--num-processes", "--main_process_port",
    "--enable-lora", "--lora-modules", "--max-lora-rank", "--max-loras", "--max-cpu-loras", "--quantization",
    "--durations", "--help",
}  # fmt: skip


def doc_text() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in DOCS}


def test_every_path_the_docs_name_exists():
    missing = []
    for name, text in doc_text().items():
        for match in PATH.finditer(text):
            path, node = match.group(1).rstrip("."), match.group(2)
            if WRITTEN.match(path):
                continue
            target = ROOT / path
            if not target.exists():
                missing.append(f"{name}: {path}")
            elif node and f"def {node[2:]}(" not in target.read_text(encoding="utf-8"):
                missing.append(f"{name}: {path}{node}")
    assert not missing, missing


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_module_and_attribute_the_docs_name_imports():
    names = {m.group(0) for text in doc_text().values() for m in MODULE.finditer(text)}
    assert names, "the docs name no qvera module: the pattern is broken"
    assert not [n for n in sorted(names) if not resolves(n)]


def help_text(run) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run()
    return out.getvalue()


def script_help(script: Path, *command: str) -> str:
    """The script's --help, and each subcommand's (`{run,sweep,...}` in its usage) after it."""
    argv = sys.argv
    sys.argv = [str(script), *command, "--help"]
    try:
        text = help_text(lambda: runpy.run_path(str(script), run_name="__main__"))
    finally:
        sys.argv = argv
    subcommands = re.search(r"\{(\w[\w,-]*)\}", text) if not command else None
    return text + "".join(script_help(script, sub) for sub in (subcommands.group(1).split(",") if subcommands else ()))


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    benchmarks = [ROOT / "experiments" / name for name in ("bench.py", "bench_serving.py", "load_test.py")]
    texts = [script_help(s) for s in [*sorted((ROOT / "scripts").glob("*.py")), *benchmarks]]
    root = cli.parser()
    texts.append(root.format_help())
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    return {m.group(0) for text in texts for m in FLAG.finditer(text)}


def test_every_flag_the_docs_name_is_a_flag_of_a_command(known_flags):
    assert "--rank" in known_flags and "--adapters" in known_flags  # the help texts were read
    assert "--curve-every" in known_flags  # and the scripts' subcommands' (quality_study.py run)
    unknown = []
    for name, text in doc_text().items():
        unknown += [
            f"{name}: {m.group(0)}" for m in FLAG.finditer(text) if m.group(0) not in known_flags | FOREIGN_FLAGS
        ]
    assert not sorted(set(unknown)), sorted(set(unknown))
