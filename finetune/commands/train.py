"""`finetune train JOB.yaml [section.key=value ...]` (also under `accelerate launch`)."""

from __future__ import annotations

import argparse

from finetune.config import load_config
from finetune.pipeline import run_train
from finetune.training.processes import maybe_relaunch

HELP = "Train a LoRA adapter from a job YAML and save it, verified, under adapters/<run_name>/."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="The job YAML.")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="Profile N optimizer steps with torch.profiler; the top-ops table goes to profile.txt.")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.profile_steps={args.profile}"] if args.profile else [])
    cfg = load_config(args.file, overrides)  # every config problem surfaces before torch is imported
    import sys


    status = maybe_relaunch(sys.argv[1:])  # `accelerate launch --num_processes N` on CPU started only one process
    if status is not None:
        return status

    run_train(cfg)
    return 0
