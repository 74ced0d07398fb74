"""`finetune export ADAPTER_DIR --format gguf`: a llama.cpp LoRA GGUF, verified by reading it back."""

from __future__ import annotations

import argparse

from finetune.lifecycle.gguf_export import export_lora_gguf

HELP = "Export an adapter for llama.cpp as a LoRA GGUF (llama-cli --lora FILE), verified by reading it back."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="Adapter folder written by `finetune train`.")
    parser.add_argument("--format", required=True, choices=["gguf"], help="Export format.")
    parser.add_argument("--out", default=None, help="Output file (default: ADAPTER_DIR/<name>-lora-<outtype>.gguf).")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16"], help="Dtype of the LoRA tensors.")
    parser.add_argument("--base", default=None, help="Base checkpoint folder, if the recorded one is not on this machine.")


def run(args: argparse.Namespace) -> int:
    print(export_lora_gguf(args.adapter, args.out, args.outtype, args.base).describe())
    return 0
