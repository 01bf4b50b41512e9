"""The `qvera` command and the scripts: one declaration per sub-command, the same `--help` under
either name, and the same exit codes and one-line errors in every sub-command."""

from __future__ import annotations

import contextlib
import importlib
import io
import runpy
import sys

import pytest
from conftest import DATA_DIR, REPO

from qvera import cli
from qvera.generation.decode import Sampling

SCRIPTS = {"sft.py": "train", "chat.py": "chat", "serve.py": "serve", "eval.py": "eval"}


def refused(script: str, argv: list[str], monkeypatch, capsys, loader: str | None = "load_base") -> tuple[int, str]:
    """Run scripts/<script>'s main() in this process, its command's model `loader` made to fail
    the test if called; return the exit code and the last line on stderr (the error)."""
    command = cli.COMMANDS[SCRIPTS[script]]
    if loader:
        module = importlib.import_module(command.work.__module__)
        monkeypatch.setattr(module, loader, lambda *a, **k: pytest.fail(f"{script} loaded the model first"))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    main = runpy.run_path(str(REPO / "scripts" / script), run_name=script)["main"]
    capsys.readouterr()
    try:
        code = main()
    except SystemExit as exit_:  # argparse's refusal
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def output(run) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of `run()` (a main that returns its code or exits)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run()
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def script_output(script: str, argv: list[str], monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    return output(lambda: runpy.run_path(str(REPO / "scripts" / script), run_name="__main__"))


def test_qvera_help_lists_every_command():
    code, out, _ = output(lambda: cli.main(["--help"]))
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line[4] != " "]
    assert code == 0 and listed == list(cli.COMMANDS)
    assert listed == ["train", "chat", "serve", "eval", "inspect", "export", "convert", "merge", "load-check"]
    code, _, err = output(lambda: cli.main(["bench"]))
    assert code == 2 and "qvera: error: argument COMMAND: invalid choice: 'bench'" in err


@pytest.mark.parametrize("script", [*SCRIPTS, "export.py"])
def test_each_script_shows_the_help_of_its_command(script, monkeypatch):
    """Word for word, but for the name in the usage line (where argparse wraps it differently);
    export.py is the whole `qvera` command."""
    code, shown, _ = script_output(script, ["--help"], monkeypatch)
    name = SCRIPTS.get(script)
    _, expected, _ = output(lambda: cli.main([name, "--help"] if name else ["--help"]))
    prog, named = (f"qvera {name}", script) if name else ("qvera", "qvera")
    assert code == 0 and shown.startswith(f"usage: {named} [-h]") and len(shown) > 1000
    assert " ".join(shown.split()) == " ".join(expected.split()).replace(f"usage: {prog} ", f"usage: {named} ", 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--rank", "many"], "argument --rank: invalid int value: 'many'"),
        (["chat", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["chat", "--adapter", "a", "--adapter", "b", "--prompt", "Hi"], "got 2 --adapter for 1 --prompt; give one"),
        (["chat", "--seed", str(2**64)], f"--seed {2**64} is outside"),
        (["serve", "--adapters", "x", "--max-pending", "0"], "max_pending must be at least 1, got 0"),
        (["serve", "--max-batch-size", "2"], "the following arguments are required: --adapters"),
        (["eval", "--data", "x.json", "--quantization", "q4"], "argument --quantization: invalid choice: 'q4'"),
        (["inspect"], "the following arguments are required: adapter"),
        (["export", "a", "b", "--to", "gguf"], "argument --to: invalid choice: 'gguf'"),
        (["convert", "a", "b"], "the following arguments are required: --base"),
        (["merge", "a", "b", "--compute-dtype", "bfloat16"], "unrecognized arguments: --compute-dtype bfloat16"),
        (["load-check", "a", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    ],
    ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else "",
)
def test_a_usage_error_exits_2_with_one_error_line(argv, message):
    code, out, err = output(lambda: cli.main(argv))
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and out == "" and len(errors) == 1
    assert errors[0].startswith(f"qvera {argv[0]}: error: ") and message in errors[0]


@pytest.mark.parametrize("script", ["chat.py", "serve.py", "eval.py"])
def test_a_model_that_does_not_load_exits_1_with_one_line(script, tmp_path, monkeypatch, capsys):
    """The input was accepted and the work began: the base fails to load (here: a folder with no
    model in it), which is a failure of the run, not of the command line."""
    empty = tmp_path / "no-model"
    empty.mkdir()
    argv = {
        "serve.py": ["--adapters", str(tmp_path), "--port", "0"],
        "eval.py": ["--data", f"{DATA_DIR}/tarnwick_eval.jsonl"],
    }
    monkeypatch.setattr("qvera.cli.serve.adapter_folders", lambda folder: [])  # any folder will do here
    code, line = refused(script, ["--model", str(empty), *argv.get(script, [])], monkeypatch, capsys, loader=None)
    assert code == 1 and line.startswith(f"{script}: error: ") and str(empty) in line


def test_serve_hands_its_flags_and_the_environments_api_key_to_the_server(tmp_path, monkeypatch):
    """The sampling flags become the defaults of requests; the key comes from $QVERA_API_KEY
    unless --api-key gives one."""
    built = []

    class Built(Exception):
        pass

    def server(model, tokenizer, folder, options):
        built.append(options)
        raise Built  # stop before serving

    monkeypatch.setattr("qvera.cli.serve.adapter_folders", lambda folder: ["a"])
    monkeypatch.setattr("qvera.cli.serve.load_base", lambda config: (None, None))
    monkeypatch.setattr("qvera.cli.serve.Server", server)
    monkeypatch.setenv("QVERA_API_KEY", "from-env")
    argv = ["serve", "--adapters", str(tmp_path), "--port", "0", "--temperature", "0", "--max-new-tokens", "7"]
    for extra in ([], ["--api-key", "given"]):
        with pytest.raises(Built):
            cli.main([*argv, *extra])
    assert [options.api_key for options in built] == ["from-env", "given"]
    assert built[0].defaults == Sampling(temperature=0.0, top_p=0.9, max_new_tokens=7)
