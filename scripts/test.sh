#!/usr/bin/env bash
# The test run CI does: offline unit and end-to-end tests, then lint and types.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check finetune tests bench demo
.venv/bin/mypy finetune
