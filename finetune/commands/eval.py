"""`finetune eval ADAPTER_DIR|JOB.yaml [--data FILE] [--split validation] [--max-samples N] ...`"""

from __future__ import annotations

import argparse

from finetune.evaluation import EvalOptions, run_eval
from finetune.evaluation.report import terminal_table

HELP = "Compare an adapter with its base model on the same data: metrics with deltas, eval.json, eval.md, eval.png."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="An adapter folder (adapters/<run>), or the job YAML that trained it.")
    parser.add_argument("--data", help="Data to evaluate on: a file (.jsonl/.json/.csv/.parquet/.txt), glob or folder, read with the job's data.format and data.columns (default: the job's data for --split).")
    parser.add_argument("--split", default="validation", choices=["validation", "train"],
                        help="Which of the job's data files to use when --data is not given (default: validation).")
    parser.add_argument("--max-samples", type=_positive, help="Evaluate only the first N rows.")
    parser.add_argument("--base", help="The base model to load instead of the recorded one (checked to fit the adapter).")
    parser.add_argument("--out", help="Folder for eval.json, eval.md and eval.png (default: the adapter folder).")
    parser.add_argument("--general", metavar="FILE",
                        help="A general dataset (text, prompt/completion or chat rows): reports the loss the adapter costs there.")
    parser.add_argument("--max-new-tokens", type=_positive, help="Generation length limit (default: longest reference + 16).")
    parser.add_argument("--batch-size", type=_positive, default=8, help="Prompts per generation batch (default: 8).")
    parser.add_argument("--json", dest="json_match", action=argparse.BooleanOptionalAction, default=None,
                        help="Add json_exact_match, comparing parsed JSON (default: when every reference is JSON).")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    opts = EvalOptions(adapter=args.adapter, data=args.data, split=args.split, max_samples=args.max_samples,
                       base=args.base, out=args.out, general=args.general, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, json_match=args.json_match)
    result = run_eval(opts)
    print(terminal_table(result.report))
    print("wrote " + ", ".join(str(p) for p in result.files))
    return 0
