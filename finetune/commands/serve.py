"""`finetune serve [ADAPTER_DIR ...]`: an OpenAI-compatible HTTP API over one base and its adapters, requests
batched together; the gradio demo on the same engine at /demo. See docs/serving.md."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.lifecycle.launch import launch_plan
from finetune.serving.batcher import Batching
from finetune.serving.engine import Limits, load_engine
from finetune.serving.server import create_app
from finetune.serving.server import run as run_server

HELP = "Serve adapters over an OpenAI-compatible HTTP API (batched across adapters), with the demo at /demo."
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER_DIR",
                        help="Adapter folders written by `finetune train`; text-generation adapters must share a base.")
    parser.add_argument("--base", help="Base model folder or hub id: replaces the adapters' recorded base (e.g. a "
                        "local copy), or is served alone when no adapter is given.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Interface to listen on (default: loopback only; any other needs --api-key-file).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    parser.add_argument("--api-key-file", type=Path,
                        help="File of API keys, one per line: clients send 'Authorization: Bearer KEY'.")
    parser.add_argument("--max-batch", type=int, default=8, help="Requests decoded together in one batch (default 8).")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="Requests waiting for a batch row; more get 429 (default 64).")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="Longer prompts get 400 (default 1024).")
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="Upper bound on max_tokens, and its default (default 512).")
    parser.add_argument("--no-merge", action="store_true", help="Never merge an adapter into its own weight copy "
                        "while it runs alone (saves that memory; single-stream decoding gets slower).")
    parser.add_argument("--no-demo", action="store_true", help="Do not mount the gradio demo at /demo.")
    parser.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice).")
    parser.add_argument("--print-vllm", action="store_true",
                        help="Print the equivalent `vllm serve` command (after `finetune check --target vllm`) and exit.")
    parser.add_argument("--print-sglang", action="store_true",
                        help="Print the equivalent SGLang launch command (after `finetune check --target sglang`) "
                             "and exit.")


def run(args: argparse.Namespace) -> int:
    if args.print_vllm or args.print_sglang:
        return print_launch("vllm" if args.print_vllm else "sglang", args)
    _check_limits(args)
    keys = read_api_keys(args.api_key_file) if args.api_key_file else []
    if args.host not in LOOPBACK and not keys:
        raise FinetuneError(f"--host {args.host} makes the API reachable from other machines: give --api-key-file "
                            "(one key per line), or keep the default 127.0.0.1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    limits = Limits(args.max_prompt_tokens, args.max_new_tokens)
    engine = load_engine(args.adapters, args.base, limits, Batching(args.max_batch, args.max_queue,
                                                                     merge=not args.no_merge))
    app = create_app(engine, keys, None if args.no_demo else _demo_builder(args))
    host = f"[{args.host}]" if ":" in args.host else args.host
    models = ", ".join("base" if n == "base model" else n for n in engine.names())
    print(f"serve: {models} on http://{host}:{args.port}/v1" + ("" if args.no_demo else " (demo: /demo)")
          + " - Ctrl+C stops it", flush=True)
    try:
        run_server(app, args.host, args.port)
    finally:
        engine.close()
    return 0


def print_launch(target: str, args: argparse.Namespace) -> int:
    """Print the vLLM or SGLang command that serves these adapters; exit code 1, the problems on stderr, when a rule
    stops it."""
    plan = launch_plan(target, args.adapters, args.base)
    for problem in plan.problems:
        print(problem, file=sys.stderr)
    if plan.problems:
        print(f"{target}: {len(plan.problems)} problem(s): fix them first (the same rules as "
              f"`finetune check --target {target}`)", file=sys.stderr)
        return 1
    print(plan.command)
    return 0


def read_api_keys(path: Path) -> list[str]:
    """Keys one per line; blank lines and # comments skipped. A key is never printed, even in an error."""
    if not path.is_file():
        raise FinetuneError(f"--api-key-file {path}: no such file")
    keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    short = [i for i, k in enumerate(keys, start=1) if len(k) < 16 or any(c.isspace() for c in k)]
    if not keys:
        raise FinetuneError(f"{path}: no API key found (one per line)")
    if short:
        raise FinetuneError(f"{path}: key {short[0]} is shorter than 16 characters or has spaces; use a long random "
                            "one (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return keys


def _demo_builder(args: argparse.Namespace) -> Any:
    """The demo page, batched like the API: the page's requests share the engine's rows."""
    from finetune.serving.demo import build_app

    return lambda engine: build_app(engine, concurrency_limit=args.max_batch, queue_size=args.max_queue)


# Upper bounds that keep one setting from holding the machine: far above any real use (as `finetune demo` has them).
UPPER = {"max_prompt_tokens": 1_048_576, "max_new_tokens": 1_048_576, "max_batch": 256, "max_queue": 100_000,
         "port": 65_535}


def _check_limits(args: argparse.Namespace) -> None:
    for flag, upper in UPPER.items():
        value = getattr(args, flag)
        if not 1 <= value <= upper:
            raise FinetuneError(f"--{flag.replace('_', '-')} must be between 1 and {upper:,}, got {value}")
