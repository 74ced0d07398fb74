"""`finetune eval ADAPTER_DIR|JOB.yaml [--data FILE] [--split validation] [--max-samples N] [--harness TASKS] ...`"""

from __future__ import annotations

import argparse

from finetune.errors import FinetuneError
from finetune.evaluation import EvalOptions, run_eval
from finetune.evaluation.harness import HarnessOptions, parse_tasks
from finetune.evaluation.report import terminal_table

HELP = ("Compare an adapter (or a fully fine-tuned model) with its base on the same data and, with --harness, on "
        "lm-evaluation-harness tasks: metrics with deltas, eval.json, eval.md, eval.png, and the model card.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="An adapter folder (adapters/<run>), a fully fine-tuned one, or the job YAML that trained it.")
    parser.add_argument("--data", help="Data to evaluate on: a file (.jsonl/.json/.csv/.parquet/.txt), glob or folder, read with the job's data.format and data.columns (default: the job's data for --split).")
    parser.add_argument("--split", default="validation", choices=["validation", "train"],
                        help="Which of the job's data files to use when --data is not given (default: validation).")
    parser.add_argument("--max-samples", type=_positive, help="Evaluate only the first N rows.")
    parser.add_argument("--base", help="The base model to load instead of the recorded one (checked to fit the adapter).")
    parser.add_argument("--out", help="Folder for eval.json, eval.md and eval.png (default: the adapter folder).")
    parser.add_argument("--general", metavar="FILE",
                        help="A general dataset (text, prompt/completion or chat rows): reports the loss the adapter costs there.")
    parser.add_argument("--max-new-tokens", type=_positive, help="Generation length limit (default: longest reference + 16).")
    parser.add_argument("--batch-size", type=_positive, default=8, help="Examples per batch, for generation, loss and the harness (default: 8).")
    parser.add_argument("--harness", metavar="TASK[,TASK...]",
                        help="Also run lm-evaluation-harness (pip install 'finetune[harness]') on base and adapter with "
                        "identical settings: registry task names (their datasets cached or reachable) or task YAML files "
                        "(e.g. configs/harness/quickstart_extract.yaml). The chat template and system prompt are the ones "
                        "training used (prompt.json). Without --data or a job validation file, only the harness runs.")
    parser.add_argument("--limit", type=_limit, help="Harness: the first N examples of each task (a share when < 1).")
    parser.add_argument("--num-fewshot", type=_non_negative, help="Harness: few-shot examples per prompt (default: each task's own).")
    parser.add_argument("--json", dest="json_match", action=argparse.BooleanOptionalAction, default=None,
                        help="Add json_exact_match, comparing parsed JSON (default: when every reference is JSON).")


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples (or a share below 1), got {text}") from None
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a whole number of examples or a share in (0, 1), got {text}")
    return int(value) if value >= 1 else value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    if (args.limit is not None or args.num_fewshot is not None) and not args.harness:
        raise FinetuneError("--limit and --num-fewshot apply to --harness tasks; add --harness TASK (for the task "
                            "data, --max-samples N limits the rows)")
    harness = HarnessOptions(parse_tasks(args.harness), args.limit, args.num_fewshot, args.batch_size) if args.harness else None
    opts = EvalOptions(adapter=args.adapter, data=args.data, split=args.split, max_samples=args.max_samples,
                       base=args.base, out=args.out, general=args.general, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, json_match=args.json_match, harness=harness)
    result = run_eval(opts)
    print(terminal_table(result.report))
    print("wrote " + ", ".join(str(p) for p in result.files))
    return 0
