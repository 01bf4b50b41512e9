"""Serve many adapters on one base behind an OpenAI-compatible API (FastAPI on uvicorn, with
continuous batching: a request joins the running batch at the next step, whatever its adapter).

    qvera serve --model smollm2-135m --adapters adapters/
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
    #           model="<adapter folder name>", messages=[...])

The sampling flags are the defaults for requests that leave a setting out. Flags take dashes
or underscores (--max-batch-size, --max_batch_size). docs/serving.md has the details.
`python scripts/serve.py` is the same command.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from qvera.cli.command import Command, Failed, required
from qvera.core.base import load_base
from qvera.core.config import ModelConfig, option
from qvera.generation.decode import Sampling
from qvera.serving.app import ServeOptions, Server, bind_address
from qvera.serving.store import adapter_folders

API_KEY_VARIABLE = "QVERA_API_KEY"


@dataclass
class Listen:
    """Where `qvera serve` finds its adapters and takes requests."""

    _argument_group_name = "listen"

    adapters: str = required("folder of adapter folders; a request's `model` names one")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "0: any free port (printed)")


def serve(base: ModelConfig, listen: Listen, options: ServeOptions, sampling: Sampling) -> None:
    """Serve until interrupted. Everything checkable without the base (the adapters folder, the
    port) is checked before it loads (minutes for 7B)."""
    options = dataclasses.replace(
        options, api_key=options.api_key or os.environ.get(API_KEY_VARIABLE), defaults=sampling
    )
    adapter_folders(listen.adapters)
    try:
        sock = bind_address(listen.host, listen.port)
    except (ValueError, OSError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ValueError(
            f"cannot listen on {listen.host}:{listen.port} ({reason}); choose another --port or --host"
        ) from err
    try:
        model, tokenizer = load_base(base)
        server = Server(model, tokenizer, listen.adapters, options)
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as err:
        raise Failed(str(err)) from err
    print(
        f"serving {server.base_name} and the adapters in {listen.adapters} at "
        f"http://{listen.host}:{sock.getsockname()[1]}/v1",  # the port taken, for --port 0 too
        flush=True,
    )
    server.serve(sock)


SERVE = Command(
    "serve",
    "serve many adapters on one base behind an OpenAI-compatible API",
    __doc__,
    serve,
    options=(ModelConfig, Listen, ServeOptions, Sampling),
    script="serve.py",
)
main = SERVE.main
