"""Text normalisation shared by the generation metrics (plain functions, no heavy imports)."""

from __future__ import annotations

import json
import re
import string
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def squeeze(text: str) -> str:
    """Whitespace-insensitive form used by exact match: trimmed, internal runs of whitespace collapsed to one space."""
    return " ".join(text.split())


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming: lower case, runs of [a-z0-9] are the tokens."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed?, value) for a JSON text, tolerating a surrounding ``` fence as chat models often add."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None
