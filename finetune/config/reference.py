"""The config reference in Markdown, generated from the field descriptions (the README embeds it)."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from finetune.config.job import JobConfig


def markdown_reference() -> str:
    """A Markdown table with one row per leaf field of JobConfig: dotted key, type, default, description."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += _rows(JobConfig, "")
    return "\n".join(lines) + "\n"


def _rows(cls: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, dotted + ".")
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "required"
        else:
            default = f"`{field.get_default(call_default_factory=True)!r}`"
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{dotted}` | {_type_name(ann)} | {default} | {desc} |")
    return rows


def _type_name(ann: object) -> str:
    """Readable type: `a` / `b` for a Literal, `int or null` for an Optional, module paths dropped."""
    import re
    import typing

    if typing.get_origin(ann) is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(ann))
    text = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("None", "null")
    text = re.sub(r"\b[\w.]+\.(\w+)", r"\1", text)
    return re.sub(r"Literal\[([^\]]*)\]", lambda m: m.group(1).replace("'", "").replace(", ", "/"), text).replace(" | ", " or ")
