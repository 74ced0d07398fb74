"""`finetune demo [ADAPTER_DIR ...] [--base MODEL]`: serve the demo page (finetune/serving/demo/) on this machine,
loopback by default, and print its address."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.serving.demo import build_app, launch
from finetune.serving.engine import Limits, load_engine

HELP = "Try adapters in a local web page: generate, chat, compare with the base, classify (gradio)."
AUTH_ENV = "FINETUNE_DEMO_AUTH"  # "user:password", so the password stays out of `ps` and shell history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER_DIR",
                        help="Adapter folders written by `finetune train`; text-generation adapters must share a base.")
    parser.add_argument("--base", help="Base model folder or hub id: replaces the adapters' recorded base (e.g. a "
                        "local copy), or is served alone when no adapter is given.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: loopback only).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: the first free one from 7860).")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="Longer prompts are refused (default 1024).")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="Upper bound on generated tokens (default 512).")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="Requests run at once; the rest wait in the queue (default 1: one model, one CPU).")
    parser.add_argument("--queue-size", type=int, default=64, help="Waiting requests beyond this are refused.")
    parser.add_argument("--auth-file", type=Path,
                        help=f"File of user:password lines for HTTP basic auth (or set {AUTH_ENV}=user:password).")


def run(args: argparse.Namespace) -> int:
    auth = read_auth(args.auth_file, os.environ.get(AUTH_ENV))
    _check_limits(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: serving on {args.host} without --auth-file: anyone who can reach this port can use it",
              file=sys.stderr)
    engine = load_engine(args.adapters, args.base, Limits(args.max_prompt_tokens, args.max_new_tokens))
    app = build_app(engine, concurrency_limit=args.concurrency, queue_size=args.queue_size)
    url = launch(app, host=args.host, port=args.port, auth=auth, block=False)
    print(f"demo: serving {', '.join(engine.names())}", flush=True)
    print(f"demo: open {url} (Ctrl+C stops it)", flush=True)
    try:
        app.block_thread()  # returns on Ctrl+C (gradio closes the server)
    finally:
        app.close()
    return 0


def read_auth(path: Path | None, env_value: str | None) -> list[tuple[str, str]] | None:
    """user:password pairs from --auth-file (one per line, # comments) or the environment; None for no auth."""
    lines = _auth_lines(path) if path else [env_value] if env_value else []
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.strip().partition(":")
        if not sep or not user or not password:
            where = f"{path}:{number}" if path else AUTH_ENV
            raise FinetuneError(f"{where}: expected user:password, got '{user}{sep}***'")
        pairs.append((user, password))
    if path and not pairs:
        raise FinetuneError(f"{path}: no user:password line found")
    return pairs or None


def _auth_lines(path: Path) -> list[str]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise FinetuneError(f"--auth-file {path}: {what} (looked for {path.resolve()}); give a file of user:password "
                            f"lines, or set {AUTH_ENV}=user:password")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FinetuneError(f"--auth-file {path}: not a UTF-8 text file of user:password lines") from None
    except OSError as exc:
        raise FinetuneError(f"--auth-file {path}: cannot read it ({exc.strerror})") from None


# Upper bounds that keep one request from holding the machine: far above any real use.
UPPER = {"max_prompt_tokens": 1_048_576, "max_new_tokens": 1_048_576, "concurrency": 256, "queue_size": 100_000}


def _check_limits(args: argparse.Namespace) -> None:
    for flag, upper in UPPER.items():
        value = getattr(args, flag)
        if value < 1:
            raise FinetuneError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        if value > upper:
            raise FinetuneError(f"--{flag.replace('_', '-')} must be at most {upper:,}, got {value}")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise FinetuneError(f"--port must be between 1 and 65535, got {args.port}")
