"""Serve many adapters on one base behind an OpenAI-compatible API.

python scripts/serve.py --model smollm2-135m --adapters adapters/
# then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
#           model="<adapter folder name>", messages=[...])
"""

import argparse
import sys

from qvera import ModelConfig, load_base
from qvera.serving.generation import Sampling
from qvera.serving.server import ChatServer


def main() -> None:
    defaults, model_defaults = Sampling(), ModelConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=model_defaults.name, help="base: a local folder, a hub id or the built-in smollm2-135m"
    )
    parser.add_argument("--quantization", default=model_defaults.quantization, choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--adapters", required=True, help="folder of adapter folders; a request's `model` names one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-resident", type=int, default=64, help="adapters kept in memory; the least recently used leave"
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-window-ms", type=float, default=20, help="how long a batch waits for more requests")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="when a request gives none")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="when a request gives none")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_new_tokens, help="when a request gives none")
    args = parser.parse_args()

    model, tokenizer = load_base(ModelConfig(name=args.model, quantization=args.quantization))
    try:
        server = ChatServer(
            model,
            tokenizer,
            args.adapters,
            host=args.host,
            port=args.port,
            max_resident=args.max_resident,
            max_batch_size=args.max_batch_size,
            batch_window=args.batch_window_ms / 1000,
            defaults=Sampling(args.temperature, args.top_p, args.max_tokens),
        )
    except (ValueError, FileNotFoundError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"serving {server.base_name} and the adapters in {args.adapters} at {server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
