"""Checks of a job against this machine and its files, made when a job is about to run (`config validate`, `train`,
`data preview`), never when an adapter's saved finetune.yaml is read back elsewhere: the model folder, the data
files, the output folder, a GPU for fp16. No torch import: `config validate` answers in well under a second."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from finetune.config.errors import ConfigProblem
from finetune.config.job import JobConfig


def environment_problems(cfg: JobConfig, lines: dict[str, int]) -> list[ConfigProblem]:
    """Every problem of `cfg` on this machine, each with the line of the key it is about."""
    found: list[tuple[str, str, str]] = [*_model_paths(cfg), *_source_paths(cfg), *_output(cfg), *_precision(cfg),
                                         *_resume(cfg)]
    return [ConfigProblem(path, message, _line(lines, path), hint) for path, message, hint in found]


def _model_paths(cfg: JobConfig) -> list[tuple[str, str, str]]:
    model, out = cfg.model, []
    name = model.name_or_path
    # The rule finetune.model.source applies: a path-looking name must be a folder; anything else is a hub id.
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir() and not model.gguf_file:
        out.append(("model.name_or_path", f"folder not found: {name} (looked for {Path(name).expanduser().resolve()})",
                    "give the folder of a Hugging Face checkpoint, or a hub id such as HuggingFaceTB/SmolLM2-135M"))
    if model.gguf_file:
        direct, inside = Path(model.gguf_file).expanduser(), Path(name).expanduser() / model.gguf_file
        if not (direct.is_file() or inside.is_file()):
            out.append(("model.gguf_file", f"file not found: {model.gguf_file} (looked for {direct.resolve()} and "
                        f"{inside.resolve()})", "give the path of a .gguf file"))
    template = model.chat_template
    if template and template.endswith(".jinja") and not Path(template).expanduser().is_file():
        out.append(("model.chat_template", f"file not found: {template} (looked for {Path(template).resolve()})",
                    "give a .jinja file, or a built-in name: chatml, llama3, zephyr"))
    return out


def _source_paths(cfg: JobConfig) -> list[tuple[str, str, str]]:
    """Local paths inside lists of sources (a plain string source is checked by the loader itself)."""
    out = []
    for split in ("train", "validation"):
        value = getattr(cfg.data, split)
        if not isinstance(value, list):
            continue
        for i, src in enumerate(value):
            path = src.path
            if path and not any(c in path for c in "*?[") and not Path(path).expanduser().exists():
                out.append((f"data.{split}.{i}.path", f"file not found: {path} (looked for {Path(path).resolve()})",
                            "paths are relative to the directory you run finetune from"))
    return out


def _output(cfg: JobConfig) -> list[tuple[str, str, str]]:
    """output.dir must be a folder we can create and write in: found now, not after hours of training."""
    folder = Path(cfg.output.dir).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == folder else f"lies under {existing}, which is a file"
        return [("output.dir", f"{cfg.output.dir} {what}, so no adapter folder can be created in it",
                 "choose a folder, e.g. output.dir=adapters")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [("output.dir", f"cannot write in {existing} (permission denied)",
                 "choose a folder you can write to, e.g. output.dir=adapters")]
    return []


def _precision(cfg: JobConfig) -> list[tuple[str, str, str]]:
    if cfg.train.precision == "fp16" and no_gpu():
        return [("train.precision", "fp16 needs a CUDA GPU and this machine has none (on CPU it would be silently "
                 "ignored)", "use train.precision=bf16 (CPUs with bf16 support) or fp32, or auto")]
    return []


def _resume(cfg: JobConfig) -> list[tuple[str, str, str]]:
    resume = cfg.train.resume
    if resume and resume != "auto" and not Path(resume).expanduser().is_dir():
        return [("train.resume", f"checkpoint folder not found: {resume} (looked for {Path(resume).resolve()})",
                 f"use train.resume=auto (the newest checkpoint under {cfg.output.work_dir}/checkpoints), or a "
                 "step-NNNNNNNN folder there")]
    return []


def no_gpu() -> bool:
    """True when this Linux machine clearly has no GPU that CUDA (or ROCm) could use. Elsewhere we cannot tell
    without importing torch, so the answer is False and the training run's own check decides."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    dev = Path("/dev")
    nvidia = any(dev.glob("nvidia[0-9]*")) or Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi")
    return not (nvidia or (dev / "kfd").exists())


def _line(lines: dict[str, int], dotted: str) -> int | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in lines:
            return lines[".".join(parts[:end])]
    return None
