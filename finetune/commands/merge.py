"""`finetune merge ADAPTER_DIR --out DIR [--dtype bf16|fp16|fp32]`: a merged, verified standalone checkpoint."""

from __future__ import annotations

import argparse

from finetune.lifecycle.merge import merge_adapter

HELP = "Merge an adapter into its base (float32, cast at the end), save it, and verify it against base + adapter."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="Adapter folder written by `finetune train` (or any peft LoRA folder).")
    parser.add_argument("--out", required=True, help="Folder for the merged model (must not exist unless --overwrite).")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="Dtype of the saved weights (default: bf16). The merge itself always runs in float32.")
    parser.add_argument("--base", default=None, help="Use this base checkpoint (e.g. a local copy) instead of the recorded one.")
    parser.add_argument("--prompt", action="append", default=None, help="A verification prompt (repeatable).")
    parser.add_argument("--max-shard-size", default="2GB", help="Largest safetensors shard, e.g. 500MB.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out once the new merge has passed verification.")


def run(args: argparse.Namespace) -> int:
    report = merge_adapter(args.adapter, args.out, args.dtype, args.base, args.prompt, args.max_shard_size, args.overwrite)
    print(report.describe())
    return 0
