"""Serve many adapters on one base behind an OpenAI-compatible API (FastAPI on uvicorn, with
continuous batching: a request joins the running batch at the next step, whatever its adapter).

    python scripts/serve.py --model smollm2-135m --adapters adapters/
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
    #           model="<adapter folder name>", messages=[...])

Flags take dashes or underscores (--max-tokens, --max_tokens). docs/serving.md has the details.
"""

import argparse
import dataclasses
import os
import sys

from qvera import ModelConfig, load_base
from qvera.core.config import HelpFormatter, spellings
from qvera.core.hardware import COMPUTE_DTYPES
from qvera.generation.decode import Sampling
from qvera.serving.app import ServeOptions, Server, bind_address
from qvera.serving.store import adapter_folders


def main() -> None:
    defaults, model_defaults, options = Sampling(), ModelConfig(), ServeOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model", default=model_defaults.name, help="base: a local folder, a hub id or the built-in smollm2-135m"
    )
    parser.add_argument(
        "--quantization",
        default=model_defaults.quantization,
        choices=["nf4", "int8", "bf16", "fp32"],
        help="of the base",
    )
    parser.add_argument(
        *spellings("compute-dtype"),
        default=model_defaults.compute_dtype,
        choices=COMPUTE_DTYPES,
        help="auto: bf16 where the hardware has it, else fp16 (GPU) or fp32 (CPU)",
    )
    parser.add_argument("--adapters", required=True, help="folder of adapter folders; a request's `model` names one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument(
        *spellings("api-key"),
        default=os.environ.get("QVERA_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 routes (default: $QVERA_API_KEY; none: open)",
    )
    parser.add_argument(
        *spellings("max-resident"),
        type=int,
        default=options.max_resident,
        help="adapters kept in memory; the least recently used leave",
    )
    parser.add_argument(
        *spellings("max-batch-size"), type=int, default=options.max_batch_size, help="requests generating at once"
    )
    parser.add_argument(
        *spellings("prefill-tokens"),
        type=int,
        default=options.prefill_tokens,
        help="prompt tokens fed per prefill step",
    )
    parser.add_argument(
        *spellings("max-body-bytes"), type=int, default=options.max_body_bytes, help="larger request bodies get a 413"
    )
    parser.add_argument(
        *spellings("request-timeout"), type=float, default=options.request_timeout, help="seconds a generation may take"
    )
    parser.add_argument(
        *spellings("read-timeout"),
        type=float,
        default=options.read_timeout,
        help="seconds a client has to send a whole request; slower ones are closed",
    )
    parser.add_argument(
        *spellings("max-pending"),
        type=int,
        default=options.max_pending,
        help="requests waiting or generating at once; more get a 503",
    )
    parser.add_argument(
        *spellings("batch-invariant"),
        action="store_true",
        help="a reply is bit for bit that of its request alone, whatever shares the batch (slower)",
    )
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="when a request gives none")
    parser.add_argument(*spellings("top-p"), type=float, default=defaults.top_p, help="when a request gives none")
    parser.add_argument(
        *spellings("max-tokens"), type=int, default=defaults.max_new_tokens, help="when a request gives none"
    )
    args = parser.parse_args()

    # Everything checkable without the base is checked before it loads (minutes for 7B).
    try:
        flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions) if hasattr(args, f.name)}
        options = ServeOptions(**flags, defaults=Sampling(args.temperature, args.top_p, args.max_tokens))
        adapter_folders(args.adapters)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    try:
        sock = bind_address(args.host, args.port)
    except (ValueError, OSError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        parser.error(f"cannot listen on {args.host}:{args.port} ({reason}); choose another --port or --host")
    try:
        model, tokenizer = load_base(
            ModelConfig(name=args.model, quantization=args.quantization, compute_dtype=args.compute_dtype)
        )
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    try:
        server = Server(model, tokenizer, args.adapters, options)
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as err:
        sys.exit(f"error: {err}")
    print(
        f"serving {server.base_name} and the adapters in {args.adapters} at "
        f"http://{args.host}:{sock.getsockname()[1]}/v1",  # the port taken, for --port 0 too
        flush=True,
    )
    server.serve(sock)


if __name__ == "__main__":
    main()
