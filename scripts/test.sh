#!/usr/bin/env bash
# The test run CI does: offline unit and end-to-end tests on tiny models (about 8 minutes on a 2-core CPU), then lint,
# types and the layer order. The tests on the real model (the quickstart trained and evaluated, the server and the demo
# scored against eval on it: ~15 minutes more) are marked slow: bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"  # pyproject's addopts deselect the slow tests; a -m in "$@" overrides that
.venv/bin/ruff check finetune tests bench demo scripts
.venv/bin/mypy finetune
.venv/bin/lint-imports --no-cache  # the layer order of docs/architecture.md
