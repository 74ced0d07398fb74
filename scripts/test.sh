#!/usr/bin/env bash
# The test run CI does: offline unit and end-to-end tests (the real quickstart included: ~7 of its ~10 minutes on a
# 2-core CPU), then lint and types. For a quick loop: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -m "slow or not slow" "$@"  # the slow tests too; a later -m in "$@" wins
.venv/bin/ruff check finetune tests bench demo
.venv/bin/mypy finetune
.venv/bin/lint-imports --no-cache  # the layer order of docs/architecture.md
