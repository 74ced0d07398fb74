"""`finetune check ADAPTER_DIR --target peft|vllm|sglang|tgi|llama.cpp`: will the adapter load there? One line per
problem."""

from __future__ import annotations

import argparse

from finetune.lifecycle.targets import LEGACY, TARGETS, check_adapter

HELP = "Check an adapter against the loading rules of peft, vLLM, SGLang, TGI (legacy) or llama.cpp; exit 1 on any problem."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="Adapter folder (adapter_config.json + adapter_model.safetensors).")
    parser.add_argument("--target", required=True, choices=TARGETS,
                        help="Where the adapter will be loaded (tgi is legacy: in maintenance mode since December 2025).")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="vLLM's --max-lora-rank you will serve with (default 16).")


def run(args: argparse.Namespace) -> int:
    result = check_adapter(args.adapter, args.target, args.max_lora_rank)
    for problem in result.problems:
        print(problem.line())
    n = len(result.problems)
    verdict = "ok" if result.ok else f"{n} problem{'s' if n != 1 else ''}"
    print(f"{args.target}: {verdict} ({result.rules} rules checked) for {args.adapter}")
    if args.target in LEGACY:
        print(f"note: {LEGACY[args.target]}")
    return 0 if result.ok else 1
