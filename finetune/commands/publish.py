"""`finetune publish ADAPTER_DIR --repo-id USER/NAME [--private] [--dry-run]`: adapter + model card to the Hub."""

from __future__ import annotations

import argparse

from finetune.lifecycle.publish import PublishRequest, publish

HELP = "Publish an adapter to the Hugging Face Hub with a model card (--dry-run: build the folder and list it)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="Adapter folder written by `finetune train`.")
    parser.add_argument("--repo-id", required=True, help="Target repository, USER/NAME or ORG/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--dry-run", action="store_true", help="Only build the folder (default ./publish/<name>) and list what would be sent.")
    parser.add_argument("--out", default=None, help="Build the Hub folder here (must be empty or absent).")
    parser.add_argument("--base-model", default=None, help="Hub id of the base, when the adapter was trained on a local folder.")
    parser.add_argument("--license", default="apache-2.0", help="License for the card metadata (default apache-2.0).")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id for the card metadata (repeatable).")


def run(args: argparse.Namespace) -> int:
    req = PublishRequest(args.adapter, args.repo_id, args.private, args.dry_run, args.out, args.base_model,
                         args.license, args.dataset)
    print(publish(req).describe(args.dry_run))
    return 0
