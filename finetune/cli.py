"""The `finetune` command line. Each verb lives in finetune/commands/<verb>.py and imports heavy packages
(torch, transformers, gradio) only inside its `run`, so `--help` and config validation stay fast."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune import __version__
from finetune.config.errors import ConfigError
from finetune.config.redact import redact
from finetune.errors import FinetuneError
from finetune.files import cache_root

BUG_EXIT_CODE = 70  # EX_SOFTWARE: an internal error, not the user's input
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# verb -> module exposing HELP, add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, str] = {
    "train": "finetune.commands.train",
    "config": "finetune.commands.config",
    "data": "finetune.commands.data",
    "eval": "finetune.commands.eval",
    "merge": "finetune.commands.merge",
    "check": "finetune.commands.check",
    "export": "finetune.commands.export",
    "publish": "finetune.commands.publish",
    "adapters": "finetune.commands.adapters",
    "demo": "finetune.commands.demo",
    "serve": "finetune.commands.serve",
    "import-gguf": "finetune.commands.import_gguf",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per entry of COMMANDS."""
    parser = argparse.ArgumentParser(prog="finetune", description="LoRA fine-tuning of Hugging Face models from one YAML job.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for verb, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also come after options (`train JOB --profile 2 lora.r=8`):
    argparse alone stops filling a positional list once an option interrupts it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print a message (no traceback) and return their exit code."""
    args = parse_args(argv)
    _quiet_third_party()
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(exc.format(), file=sys.stderr)
        return exc.exit_code
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in MACHINE_ERRNOS:
            return report_bug(exc, argv if argv is not None else sys.argv[1:])
        # The machine, not finetune: a full disk, a read-only or unwritable folder.
        print(f"error: {exc.strerror}: {exc.filename or 'while writing'}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - anything else is our bug: one line for the user, the rest to a file
        return report_bug(exc, argv if argv is not None else sys.argv[1:])
    finally:
        # Without this the process can hang on exit under accelerate launch (open gloo groups).
        if "torch" in sys.modules and os.environ.get("FINETUNE_KEEP_PG") is None:
            _destroy_process_group()


def report_bug(exc: BaseException, argv: Sequence[str]) -> int:
    """An exception no stage turned into a user error is a bug in finetune: say so in one line, keep the traceback
    in a file the user can attach to a report (FINETUNE_DEBUG=1 prints it here instead)."""
    import datetime
    import platform
    import tempfile
    import traceback

    trace = redact("".join(traceback.format_exception(exc)))
    if os.environ.get("FINETUNE_DEBUG", "") not in ("", "0"):
        print(trace, file=sys.stderr, end="")
        return BUG_EXIT_CODE
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    header = (f"finetune {__version__}, Python {platform.python_version()}, {platform.platform()}\n"
              f"command: finetune {' '.join(argv)}\n\n")
    where = "not written"
    for folder in (cache_root() / "crash-reports", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"finetune-crash-{stamp}-{os.getpid()}.txt"
            path.write_text(header + trace, encoding="utf-8")
            where = str(path)
            break
        except OSError:
            continue
    print(f"error: this is a bug in finetune ({type(exc).__name__}: {_first_line(exc)}); the full traceback is in "
          f"{where}. Please report it on finetune's issue tracker with that file attached (FINETUNE_DEBUG=1 prints the "
          "traceback here instead).",
          file=sys.stderr)
    return BUG_EXIT_CODE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no message"


def _quiet_third_party() -> None:
    """Silence deprecation chatter from our dependencies that a user can do nothing about."""
    import logging
    import warnings

    for pattern in (".*is_gradient_checkpointing.*", ".*torch.jit.script_method.*", ".*TRANSFORMERS_CACHE.*"):
        warnings.filterwarnings("ignore", message=pattern)
    # bitsandbytes logs a warning on CPU about an optional kernels package at import time (peft imports it).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
