"""`finetune config validate|show|schema`: check a job and print it resolved, answered without importing torch."""

from __future__ import annotations

import argparse
import json

from finetune.config import JobConfig, dump_config, load_config
from finetune.config.reference import markdown_reference

HELP = "Validate a job config, show it resolved with every default, or print its JSON schema."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("validate", "Report every problem in a job file at once."),
                         ("show", "Print the resolved YAML with defaults, each field's description as a comment.")):
        p = sub.add_parser(action, help=text, description=text)
        p.add_argument("file", help="The job YAML.")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides.")
    sub.add_parser("schema", help="Print the JSON schema of a job config.")
    sub.add_parser("reference", help="Print the config reference as Markdown (what the README embeds).")


def run(args: argparse.Namespace) -> int:
    if args.action == "schema":
        print(json.dumps(JobConfig.model_json_schema(), indent=2))
        return 0
    if args.action == "reference":
        print(markdown_reference(), end="")
        return 0
    cfg = load_config(args.file, args.overrides)
    if args.action == "validate":
        print(f"{args.file}: OK")
    else:
        print(dump_config(cfg), end="")
    return 0
