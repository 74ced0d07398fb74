"""`finetune train JOB.yaml [section.key=value ...]` (also under `accelerate launch`)."""

from __future__ import annotations

import argparse

HELP = "Train a LoRA adapter from a job YAML and save it, verified, under adapters/<run_name>/."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="The job YAML.")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")


def run(args: argparse.Namespace) -> int:
    from finetune.config import load_config

    cfg = load_config(args.file, args.overrides)  # every config problem surfaces before torch is imported
    from finetune.pipeline import run_train

    run_train(cfg)
    return 0
