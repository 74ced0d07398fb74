"""A job with its local paths made absolute: what an adapter folder records (finetune.yaml), so that eval, merge,
export and the demo work from any directory, not only from the one training ran in."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config.data import SourceConfig
from finetune.config.job import JobConfig


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """A copy of `cfg` whose local paths (model folder, GGUF file, chat template file, data files and globs, data
    cache, output folder) are absolute. Hub ids, built-in template names and hub datasets stay as they are."""
    model, data = cfg.model, cfg.data
    name = model.name_or_path
    is_folder = Path(name).expanduser().is_dir() or name.startswith((".", "/", "~"))
    model = model.model_copy(update={
        "name_or_path": _absolute(name) if is_folder else name,
        "gguf_file": _absolute(model.gguf_file) if model.gguf_file and Path(model.gguf_file).expanduser().is_file()
        else model.gguf_file,
        "chat_template": _absolute(model.chat_template) if model.chat_template and model.chat_template.endswith(".jinja")
        else model.chat_template,
    })
    data = data.model_copy(update={
        "train": _sources(data.train),
        "validation": _sources(data.validation) if data.validation is not None else None,
        "cache_dir": _absolute(data.cache_dir) if data.cache_dir else None,
    })
    output = cfg.output.model_copy(update={"dir": _absolute(cfg.output.dir)})
    return cfg.model_copy(update={"model": model, "data": data, "output": output})


def _sources(value: str | list[SourceConfig]) -> str | list[SourceConfig]:
    if isinstance(value, str):
        return _absolute(value)
    return [s.model_copy(update={"path": _absolute(s.path)}) if s.path is not None else s for s in value]


def _absolute(path: str) -> str:
    """Absolute and normalised, without resolving symlinks (a glob's wildcards are kept)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))
