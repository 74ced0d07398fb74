"""`finetune data preview JOB.yaml [overrides]`: rendered examples with the trained tokens highlighted, and stats."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from finetune import model
from finetune.config import load_config
from finetune.data import build_data

HELP = "Preview the data of a job: a few rendered examples with the trained tokens highlighted, and statistics."
OPEN, CLOSE = "«", "»"  # marks trained text when the output is not a terminal (no colours)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("preview", help=HELP, description=HELP)
    p.add_argument("file", help="The job YAML.")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.packing=true")
    p.add_argument("-n", "--examples", type=int, default=3, help="How many examples to show (default 3).")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)

    tok = model.load_tokenizer(model.resolve_source(cfg.model), cfg.model)
    bundle = build_data(cfg.data, tok, cfg.task)
    color = sys.stdout.isatty()
    shown = bundle.train[: args.examples]
    for i, ex in enumerate(shown, 1):
        for title, side in _sides(ex):
            print(f"── example {i}{title} ({len(side['input_ids'])} tokens) " + "─" * 20)
            _print(render_example(tok, side, bundle.labels, color), color)
    print("── stats " + "─" * 30)
    print(format_stats(bundle.stats, bundle.fingerprint))
    if not color:
        print(f"(trained tokens are shown between {OPEN} and {CLOSE}; examples of a packed row are separated by │)")
    return 0


def _sides(ex: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A preference pair is shown as its two sides, each with its own trained tokens."""
    if "chosen_input_ids" not in ex:
        return [("", ex)]
    return [(f" {name}", {"input_ids": ex[f"{name}_input_ids"], "labels": ex[f"{name}_labels"]})
            for name in ("chosen", "rejected")]


def render_example(tok: Any, ex: dict[str, Any], labels: list[str] | None, color: bool) -> str:
    """The example's text, trained spans marked; rich markup when `color`."""
    if "label" in ex:
        name = labels[ex["label"]] if labels and ex["label"] < len(labels) else ex["label"]
        return f"{_escape(tok.decode(ex['input_ids']), color)}\n  -> label {name}"
    starts = _example_starts(ex)
    out: list[str] = []
    run_ids: list[int] = []
    run_trained: bool | None = None
    for i, (tid, lab) in enumerate(zip(ex["input_ids"], ex["labels"], strict=True)):
        trained = lab != -100
        if i in starts or trained != run_trained:
            out.append(_span(tok, run_ids, bool(run_trained), color))
            run_ids, run_trained = [], trained
            if i in starts:
                out.append("│")
        run_ids.append(tid)
    out.append(_span(tok, run_ids, bool(run_trained), color))
    return "".join(out)


def _example_starts(ex: dict[str, Any]) -> set[int]:
    """Positions where a new example of a packed row begins (not the first)."""
    starts, pos = set(), 0
    for n in ex.get("seq_lens", [])[:-1]:
        pos += n
        starts.add(pos)
    return starts


def _span(tok: Any, ids: list[int], trained: bool, color: bool) -> str:
    if not ids:
        return ""
    text = _escape(tok.decode(ids), color)
    if not trained:
        return f"[dim]{text}[/dim]" if color else text
    return f"[bold green]{text}[/bold green]" if color else f"{OPEN}{text}{CLOSE}"


def _escape(text: str, color: bool) -> str:
    if not color:
        return text
    from rich.markup import escape

    return escape(text)


def _print(text: str, color: bool) -> None:
    if not color:
        print(text)
        return
    from rich.console import Console

    Console().print(text, highlight=False)


def format_stats(stats: dict[str, Any], fingerprint: str) -> str:
    """The `finetune data` report: fingerprint and cache state, the counts present in `stats`, per-source use, and the
    length histogram drawn in #."""
    lines = [f"fingerprint: {fingerprint}   cache: {stats.get('cache', 'n/a')}"]
    for key in ("format", "chat_template", "rows", "examples", "train_examples", "validation_examples", "tokens", "trained_tokens",
                "truncated", "dropped_too_long", "dropped_no_target", "bad_rows", "packed_rows", "packing_efficiency"):
        if key in stats:
            lines.append(f"{key}: {stats[key]}")
    for src in stats.get("sources", []):
        lines.append(f"source {src['source']} ({src['format']}, weight {src['weight']}): used {src['used']} of {src['examples']}")
    hist = stats.get("length_histogram") or {}
    if hist:
        lines.append("length histogram (tokens: examples):")
        top = max(hist.values())
        lines += [f"  {k:>11}: {v:>7} {'#' * max(1, round(40 * v / top))}" for k, v in hist.items()]
    return "\n".join(lines)
