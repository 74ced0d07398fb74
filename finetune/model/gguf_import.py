"""GGUF checkpoint -> an ordinary Hugging Face folder, converted once and cached.

transformers can read a GGUF file directly, but it de-quantizes every tensor on each load (~45 s for a 135M model
on 2 CPU cores) and the resulting model cannot be saved as-is (its config carries a GGUF quantization_config).
So we convert once into a plain folder (weights without quantization_config, tokenizer with its chat template,
generation config) that later runs load in about a second. The folder is written through finetune.files.atomic_dir,
so an interrupted import never leaves a half folder that looks finished.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import ModelError
from finetune.files import atomic_dir, cache_root, write_json

if TYPE_CHECKING:
    from finetune.config.model import ModelConfig

STAMP = "gguf_source.json"  # names the GGUF file a folder came from; its presence marks a finished import
SAVE_DTYPES = ("bfloat16", "float32", "float16")
KIND = "gguf-import"


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file as the import cache knows it: resolved path, size and mtime (either changing means a new file)."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def at(cls, path: str | Path) -> GgufFile:
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        stat = path.stat()
        return cls(path, stat.st_size, stat.st_mtime_ns)

    def stamp(self, dtype: str) -> dict[str, object]:
        return {"file": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns, "dtype": dtype}

    def cache_key(self, dtype: str) -> str:
        """Changes whenever the file is replaced or edited (size/mtime), so a stale conversion is never reused."""
        return hashlib.sha256(json.dumps(self.stamp(dtype), sort_keys=True).encode()).hexdigest()[:12]


def locate_gguf(cfg: ModelConfig) -> GgufFile:
    """model.gguf_file is a path, or a file name inside the folder model.name_or_path."""
    assert cfg.gguf_file is not None
    direct = Path(cfg.gguf_file).expanduser()
    if direct.is_file():
        return GgufFile.at(direct)
    inside = Path(cfg.name_or_path).expanduser() / cfg.gguf_file
    if inside.is_file():
        return GgufFile.at(inside)
    raise ModelError(
        f"model.gguf_file: '{cfg.gguf_file}' is neither a file nor a file inside model.name_or_path "
        f"('{cfg.name_or_path}'). Give the path of a .gguf file."
    )


def gguf_folder(cfg: ModelConfig) -> Path:
    """The cached HF folder for model.gguf_file, importing it first if this exact file was never imported."""
    gguf = locate_gguf(cfg)
    folder = cache_root() / "gguf" / f"{gguf.path.stem}-{gguf.cache_key('bfloat16')}"
    return import_gguf(gguf.path, folder).resolve()


def is_imported(folder: Path, gguf: GgufFile, dtype: str) -> bool:
    """Whether `folder` holds a finished import of exactly this file at `dtype` (its gguf_source.json stamp matches)."""
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == gguf.stamp(dtype)


def import_gguf(file: str | Path, out_dir: str | Path, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Convert `file` into the HF folder `out_dir` unless it already holds this exact file's conversion."""
    gguf = GgufFile.at(file)
    out = Path(out_dir).expanduser().resolve()
    if dtype not in SAVE_DTYPES:
        raise ModelError(f"dtype '{dtype}' is not one of {', '.join(SAVE_DTYPES)}")
    if is_imported(out, gguf, dtype):
        return out
    if out.exists() and not force:
        raise ModelError(
            f"{out} already exists and is not an import of {gguf.path} (size {gguf.size}, this mtime, {dtype}). "
            "Choose another folder, delete it, or pass --force to replace it."
        )
    # Replacing is safe: anything but a previous import is refused by atomic_dir, and another process that won a
    # race to import the same file wrote the same folder.
    with atomic_dir(out, KIND, overwrite=True, flag="--force") as tmp:
        _convert(gguf, tmp, dtype)
        write_json(tmp / STAMP, gguf.stamp(dtype))
    return out


def _convert(gguf: GgufFile, tmp: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf.path.parent), gguf.path.name
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot read {gguf.path} as a GGUF causal LM (is the `gguf` package installed?): {exc}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-quantized config; the weights are dense now
    # A fresh model built from the clean config, so no quantizer state from the GGUF load survives into the save.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _check_tokenizer(tok, tmp, gguf)


def _check_tokenizer(tok: object, folder: Path, gguf: GgufFile) -> None:
    """The saved tokenizer must give the same ids and keep the chat template, or chat training would silently differ."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    probe = "Hello, world! {\"name\": \"Zoë\", \"age\": 42}\n  tabs\tand spaces"
    if saved(probe)["input_ids"] != tok(probe)["input_ids"]:  # type: ignore[operator]
        raise ModelError(f"{gguf.path}: the converted tokenizer encodes differently from the GGUF one")
    if getattr(tok, "chat_template", None) and saved.chat_template != tok.chat_template:  # type: ignore[attr-defined]
        raise ModelError(f"{gguf.path}: the chat template was lost while saving the converted tokenizer")
