"""Regenerate the config reference embedded in README.md from the config models (run after changing a field)."""

from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def render(text: str) -> str:
    from finetune.config.reference import markdown_reference

    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{markdown_reference()}{END}{tail}"


if __name__ == "__main__":
    new = render(README.read_text())
    if "--check" in sys.argv:
        sys.exit(0 if new == README.read_text() else "README.md config reference is stale: run python scripts/update_readme.py")
    README.write_text(new)
