"""Publish an adapter to the Hugging Face Hub: build the exact folder (allow-listed files + model card), check it
holds no secret, then create_repo + upload_folder. `dry_run` stops after building and lists what would be sent.

Only allow-listed files leave the machine: checkpoints, optimizer state, merged weights, GGUF exports and anything
else in the adapter folder stay home. The token comes from HF_TOKEN or `hf auth login`; it is passed to
huggingface_hub and never printed, written or put in an error message.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config.redact import find_secret, redact
from finetune.data.prompt_record import PROMPT_FILE
from finetune.errors import FinetuneError
from finetune.files import is_hidden, write_json
from finetune.lifecycle.folder import AdapterInfo, read_adapter
from finetune.lifecycle.modelcard import REPO_ID, CardInput, card_for_publish, hub_id

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")  # full FT
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")
RECORD_FILES = ("finetune.yaml", "run.json", "metrics.jsonl")


@dataclass
class PublishRequest:
    """What `finetune publish` was asked: the adapter folder, the repo and its visibility, what the card says (base,
    license, datasets), where the folder is built, and how to reach the Hub (endpoint, token)."""

    adapter: str | Path
    repo_id: str
    private: bool = False
    dry_run: bool = False
    out: str | Path | None = None  # where the Hub folder is built (default: a temp dir, or ./publish/<name> on dry-run)
    base_model: str | None = None  # hub id of the base when the adapter records a local folder
    license: str = "apache-2.0"
    datasets: list[str] = field(default_factory=list)
    endpoint: str | None = None  # default: HF_ENDPOINT or huggingface.co
    token: str | None = None  # default: HF_TOKEN or the saved login


@dataclass
class PublishReport:
    """What was uploaded (or, on a dry run, would be): the built folder, each file with its size in bytes, the adapter
    folder's entries left out, and the repo and commit URLs after an upload."""

    folder: str
    files: list[tuple[str, int]]  # (path in repo, bytes)
    left_out: list[str]
    repo_url: str | None = None
    commit_url: str | None = None

    def describe(self, dry_run: bool) -> str:
        """What `finetune publish` prints: each file and its size, what was left out, and the commit."""
        total = sum(size for _, size in self.files)
        head = "would upload" if dry_run else f"uploaded to {self.repo_url}"
        lines = [f"{head} {len(self.files)} files ({total / 1e6:.2f} MB) from {self.folder}:"]
        lines += [f"  {name}  {size:,} B" for name, size in self.files]
        if self.left_out:
            lines.append(f"left out (never uploaded): {', '.join(self.left_out)}")
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def publish(req: PublishRequest) -> PublishReport:
    """Build the Hub folder of `req.adapter` (allow-listed files, redacted finetune.yaml, model card), refuse it if it
    holds a credential, then create the repo and upload it, unless `req.dry_run`.

    Raises FinetuneError (bad repo id, no token, a base only on this machine, a secret found, a failed upload); nothing
    is sent before every check passes, and a refused --out folder is left as it was found."""
    if not REPO_ID.match(req.repo_id):
        raise FinetuneError(f"--repo-id {req.repo_id!r} must look like USER/NAME (letters, digits, - _ .)")
    info = read_adapter(req.adapter)
    base_model = _hub_base(info, req)
    token = None if req.dry_run else _token(req)
    staging = Path(req.out) if req.out else (Path("publish") / info.name if req.dry_run else None)
    folder = staging or Path(tempfile.mkdtemp(prefix=f"finetune-publish-{info.name}-"))
    existed = folder.exists()
    ours = staging is None or not existed or not any(folder.iterdir())  # empty or new: whatever is in it is ours
    done = False
    try:
        report = build_hub_folder(info, folder, CardInput(req.repo_id, base_model, req.license, list(req.datasets)))
        _refuse_secrets(folder, token)
        if not req.dry_run:
            assert token is not None
            report.repo_url, report.commit_url = _upload(folder, req, token, info.kind)
        done = True
    finally:
        if staging is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif not done and ours:  # a refused or failed publish leaves --out as it found it
            _unstage(folder, existed)
    return report


def _unstage(folder: Path, existed: bool) -> None:
    if not existed:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _hub_base(info: AdapterInfo, req: PublishRequest) -> str | None:
    """The base as a hub id: --base-model, else the recorded base when it is not a local path."""
    if req.base_model:
        return req.base_model
    recorded = info.base
    if hub_id(recorded):
        return hub_id(recorded)
    if req.dry_run or info.full:  # a whole model loads without its base: the base is only named in the card
        return None
    raise FinetuneError(
        f"the adapter's base is the local folder {recorded}; others cannot load that. Pass --base-model with the "
        "hub id of the same checkpoint (e.g. --base-model HuggingFaceTB/SmolLM2-135M-Instruct)."
    )


def _token(req: PublishRequest) -> str:
    from huggingface_hub import get_token

    token = req.token or get_token()
    if not token:
        raise FinetuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then publish again")
    return token


def build_hub_folder(info: AdapterInfo, folder: Path, card: CardInput) -> PublishReport:
    """Copy the allow-listed files, point adapter_config at the hub base, redact the config, write the card."""
    if folder.exists() and any(folder.iterdir()):
        raise FinetuneError(f"{folder.resolve()} is not empty; choose an empty --out folder")
    folder.mkdir(parents=True, exist_ok=True)
    shards = tuple(p.name for p in info.folder.glob("model-*-of-*.safetensors")) if info.full else ()
    allowed = (*(MODEL_FILES + shards if info.full else ADAPTER_FILES), *TOKENIZER_FILES, *RECORD_FILES)
    for name in allowed:
        if (info.folder / name).is_file():
            shutil.copy2(info.folder / name, folder / name)
    # The prompt format travels with the adapter (users need its system prompt); its example rows may be private.
    write_json(folder / PROMPT_FILE, info.prompt.to_dict(with_examples=False))
    if card.base_model and not info.full:
        _set_base(folder / "adapter_config.json", card.base_model)
    if (folder / "finetune.yaml").is_file():
        text = (folder / "finetune.yaml").read_text(encoding="utf-8")
        (folder / "finetune.yaml").write_text(redact(text), encoding="utf-8")
    (folder / "README.md").write_text(card_for_publish(info, card), encoding="utf-8")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    left_out = sorted(p.relative_to(info.folder).as_posix() + ("/" if p.is_dir() else "")
                      for p in info.folder.iterdir()
                      if p.name not in (*allowed, "README.md", PROMPT_FILE) and not is_hidden(p))
    return PublishReport(str(folder.resolve()), files, left_out)


def _set_base(path: Path, base_model: str) -> None:
    cfg: dict[str, Any] = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model  # a local path would make the published adapter unloadable
    write_json(path, cfg)


def _refuse_secrets(folder: Path, token: str | None) -> None:
    """Refuse to send a folder that contains the token itself or anything shaped like a credential."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix == ".safetensors":
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        found = "the Hugging Face token itself" if token and token in text else find_secret(text)
        if found:
            raise FinetuneError(f"{path.name} contains {found}; remove it from the adapter folder (e.g. "
                                "data.system_prompt) before publishing. Nothing was uploaded.")


def _upload(folder: Path, req: PublishRequest, token: str, info_kind: str) -> tuple[str, str]:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise FinetuneError("HF_HUB_OFFLINE=1 is set: unset it to publish (or use --dry-run to only build the folder)")
    api = HfApi(endpoint=req.endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        repo = api.create_repo(req.repo_id, private=req.private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=req.repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=f"Upload {info_kind} with finetune")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        message = str(exc).replace(token, "***")
        raise FinetuneError(f"publishing to {req.repo_id} failed: {type(exc).__name__}: {message}") from None
    return str(repo), str(commit.commit_url)
