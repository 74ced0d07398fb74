"""Where a checkpoint comes from: a local folder made absolute, a hub id resolved through the local cache (offline
honoured), or a GGUF file imported once into a cached folder. Tokenizer and weights are always read from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.config.model import ModelConfig
from finetune.errors import ModelError
from finetune.model.gguf_import import gguf_folder


@dataclass(frozen=True)
class Source:
    """Where tokenizer and weights come from: `folder` is local; `ref` is what we record (hub id or absolute path)."""

    folder: str
    ref: str
    revision: str | None = None


def resolve_source(cfg: ModelConfig) -> Source:
    """A local folder becomes an absolute path; anything else is a hub id looked up in the local cache when offline."""
    if cfg.gguf_file:
        ref = str(gguf_folder(cfg))
        return Source(ref, ref)
    path = Path(cfg.name_or_path).expanduser()
    if path.is_dir():
        return Source(str(path.resolve()), str(path.resolve()))
    if cfg.name_or_path.startswith((".", "/", "~")) or path.suffix:
        raise ModelError(f"model.name_or_path: folder not found: {path.resolve()}")
    return Source(_hub_snapshot(cfg.name_or_path, cfg.revision), cfg.name_or_path, cfg.revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types; all mean "not available"
        raise ModelError(
            f"model.name_or_path: cannot get '{repo_id}' (revision {revision or 'main'}) from the hub or the local "
            f"cache: {type(exc).__name__}: {exc}\n  Offline? Download it once where the hub is reachable "
            f"(`hf download {repo_id}`), or point model.name_or_path at a local folder."
        ) from None


