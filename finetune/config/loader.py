"""Read a YAML job strictly: overrides applied, every problem collected with its line and a "did you mean"."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config.base import CROSS_FIELD
from finetune.config.environment import environment_problems
from finetune.config.errors import ConfigError, ConfigProblem
from finetune.config.job import JobConfig

# Fields that name local files which must exist before any model is loaded.
FILE_FIELDS = ("data.train", "data.validation", "model.adapter")

# Names other tools use for our keys: spelling distance alone would not suggest these.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lr": "learning_rate",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "model_name_or_path": "name_or_path", "base_model": "name_or_path", "sequence_len": "max_seq_len",
    "max_length": "max_seq_len", "output_dir": "dir", "lr_scheduler": "schedule", "lr_scheduler_type": "schedule",
}


# Keys that earlier versions of finetune accepted and wrote into an adapter's finetune.yaml, and that no longer exist.
# A saved job (`saved=True`) still loads without them (none changed the trained weights); a job being written gets
# told to remove the key instead of a bare "unknown key".
RETIRED_KEYS = {
    "train.num_workers": "removed in finetune 0.1 (examples are collated in the training process); delete the line",
}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True,
                saved: bool = False) -> JobConfig:
    """Parse, override and validate a job file; raises ConfigError listing every problem at once.

    check_files=False skips the data-file existence check and saved=True drops RETIRED_KEYS (both for reading the
    job saved with an adapter, possibly by an older finetune)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(str(path), [ConfigProblem("", f"{path.resolve()} is a folder; give the job YAML file")])
    if not path.is_file():
        raise ConfigError(str(path), [ConfigProblem("", f"config file not found: {path.resolve()}")])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [ConfigProblem(
            "", f"not a text file: byte {data[exc.start]:#04x} at offset {exc.start} is not UTF-8", line,
            "give the job YAML (a UTF-8 text file), e.g. configs/tiny.yaml")]) from None
    if "\x00" in text:
        raise ConfigError(str(path), [ConfigProblem("", "not a text file: it contains NUL bytes", 1,
                                                    "give the job YAML (a UTF-8 text file), e.g. configs/tiny.yaml")])
    return load_config_text(text, str(path), overrides, check_files, saved)


def load_config_text(
    text: str, source: str = "<config>", overrides: list[str] | tuple[str, ...] = (), check_files: bool = True,
    saved: bool = False,
) -> JobConfig:
    """`load_config` on YAML text already read; `source` names it in the problems (as the file would).

    Raises ConfigError listing every problem at once."""
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(source, [ConfigProblem("", f"not valid YAML: {exc}", line)]) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(source, [ConfigProblem("", f"expected a mapping of sections, got {type(raw).__name__}", 1)])
    lines = _line_index(node)
    problems = _duplicate_keys(node) + _retired_keys(raw, lines, drop=saved)
    problems += [p for o in overrides for p in _apply_override(raw, o)]
    cfg = None
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as exc:
        problems += [_problem_from_pydantic(e, lines) for e in exc.errors()]
    if check_files:
        problems += _missing_files(raw, lines)
        if cfg is not None:
            problems += environment_problems(cfg, lines)
    if problems:
        raise ConfigError(source, problems)
    assert cfg is not None
    return cfg


def _retired_keys(raw: dict[str, Any], lines: dict[str, int], drop: bool) -> list[ConfigProblem]:
    """Drop RETIRED_KEYS from a saved job; in a job being written, one problem per retired key found."""
    problems = []
    for dotted, why in RETIRED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            if drop:
                del raw[section][key]
            else:
                problems.append(ConfigProblem(dotted, f"this key was {why}", lines.get(dotted)))
                del raw[section][key]  # reported once, here, not again as an unknown key
    return problems


def _apply_override(raw: dict[str, Any], override: str) -> list[ConfigProblem]:
    """`a.b=value` sets raw['a']['b'] to the YAML value; unknown keys are caught later by validation."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        return [ConfigProblem(override, "an override must look like section.key=value", hint="e.g. train.max_steps=10")]
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value
    return []


def _problem_from_pydantic(err: Any, lines: dict[str, int]) -> ConfigProblem:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc)
    line = _nearest_line(lines, loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = [SYNONYMS[loc[-1]]] if SYNONYMS.get(loc[-1]) in allowed else []
        close = close or difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
        prefix = ".".join(loc[:-1])
        hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else None
        msg = f"unknown key (value: {err['input']!r}). Allowed keys here: {', '.join(allowed)}"
        return ConfigProblem(dotted, msg, line, hint)
    if kind == "missing":
        return ConfigProblem(dotted, "required field is missing", line, f"add '{loc[-1]}:' to the config")
    if kind == CROSS_FIELD:
        ctx = err.get("ctx") or {}
        where = [*loc, *str(ctx.get("field", "")).split(".")]
        candidates = [where] + [[*loc, *o.split(".")] for o in str(ctx.get("others", "")).split(",") if o]
        line = next((lines[".".join(c)] for c in candidates if ".".join(c) in lines), None) or _nearest_line(lines, where)
        return ConfigProblem(".".join(p for p in where if p), err["msg"], line, ctx.get("hint") or None)
    hint = None
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", err["msg"])
        close = difflib.get_close_matches(str(err["input"]), options, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else None
    return ConfigProblem(dotted, f"{err['input']!r} is invalid: {err['msg']}", line, hint)


def _allowed_keys(loc: list[str]) -> list[str]:
    cls: type[BaseModel] = JobConfig
    for part in loc:
        field = cls.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def _missing_files(raw: dict[str, Any], lines: dict[str, int]) -> list[ConfigProblem]:
    problems = []
    for dotted in FILE_FIELDS:
        value: Any = raw
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and not any(c in value for c in "*?[") and not Path(value).exists():
            problems.append(
                ConfigProblem(
                    dotted,
                    f"file not found: {value} (looked for {Path(value).resolve()})",
                    _nearest_line(lines, dotted.split(".")),
                    "paths are relative to the directory you run finetune from",
                )
            )
    return problems


def _duplicate_keys(node: yaml.Node | None, prefix: str = "") -> list[ConfigProblem]:
    """YAML keeps the last of two equal keys without a word; the first one's value would be silently ignored."""
    problems: list[ConfigProblem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(ConfigProblem(dotted, f"key given twice (lines {seen[key]} and {line}); only the "
                                              "last value would be used", line, "keep one of them"))
            seen[key] = line
            problems += _duplicate_keys(value_node, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{prefix}.{i}")
    return problems


def _line_index(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Map each dotted key path in the YAML document to its 1-based line number."""
    index: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            index[dotted] = key_node.start_mark.line + 1
            index.update(_line_index(value_node, dotted))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            dotted = f"{prefix}.{i}"
            index[dotted] = item.start_mark.line + 1
            index.update(_line_index(item, dotted))
    return index


def _nearest_line(lines: dict[str, int], loc: list[str]) -> int | None:
    for end in range(len(loc), 0, -1):
        line = lines.get(".".join(loc[:end]))
        if line:
            return line
    return None


def dump_config(cfg: BaseModel, comments: bool = True) -> str:
    """The resolved config as YAML, each field preceded by its description (the one place it is documented)."""
    return "\n".join(_dump_section(cfg, 0, comments)) + "\n"


def _dump_section(section: BaseModel, indent: int, comments: bool) -> list[str]:
    out: list[str] = []
    pad = "  " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if comments and field.description:
            out.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:")
            out.extend(_dump_section(value, indent + 1, comments))
        else:
            if isinstance(value, list):  # e.g. data.train as a list of sources (models yaml cannot represent)
                value = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
            rendered = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
            out.append(f"{pad}{name}: {rendered}")
    return out
