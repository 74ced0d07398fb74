"""Read an adapter folder written by `finetune train`: its metadata (no torch needed) or base + adapter loaded.

Eval, merge, export, publish and the demo all load adapters through here, so they see the same base, tokenizer
and chat template that training used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import JobConfig, load_config
from finetune.config.model import ModelConfig
from finetune.data.prompt_record import PROMPT_FILE, PromptRecord, describe_prompts
from finetune.errors import FinetuneError
from finetune.files import recover
from finetune.lifecycle.fit import check_adapter_fits
from finetune.model import Source, check_pair, load_base_model, resolve_source, set_pad_token

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class AdapterInfo:
    folder: Path
    adapter_config: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)  # run.json, {} when absent
    job: JobConfig | None = None  # finetune.yaml, None for adapters trained elsewhere

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def base(self) -> str:
        return str(self.adapter_config.get("base_model_name_or_path") or "")

    @property
    def task(self) -> str:
        if self.job is not None:
            return self.job.task
        return "classification" if self.adapter_config.get("task_type") == "SEQ_CLS" else "causal_lm"

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template (as recorded at training time)."""
        return bool(self.run.get("data", {}).get("chat_template", False))

    @property
    def prompt(self) -> PromptRecord:
        """How training built prompts (prompt.json). Adapters saved before that record existed get what their
        finetune.yaml and data still tell: the system prompt and examples when the data files are here, else
        data.system_prompt, else nothing."""
        path = self.folder / PROMPT_FILE
        if path.is_file():
            return PromptRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if self.job is None:
            return PromptRecord(self.chat)
        try:
            return describe_prompts(self.job.data, self.chat)
        except (FinetuneError, OSError, ValueError):
            system = self.job.data.system_prompt
            return PromptRecord(self.chat, system, "data.system_prompt" if system else "none")


def read_adapter(folder: str | Path) -> AdapterInfo:
    """Metadata only: adapter_config.json, run.json and finetune.yaml. Fails clearly on a folder that is no adapter."""
    folder = Path(folder)
    recover(folder)  # an overwrite interrupted between its two renames
    if not folder.is_dir():
        raise FinetuneError(f"adapter folder not found: {folder.resolve()}")
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    if missing:
        raise FinetuneError(f"{folder}: not an adapter folder, missing {', '.join(missing)}")
    info = AdapterInfo(folder.resolve(), json.loads((folder / "adapter_config.json").read_text()))
    if (folder / "run.json").is_file():
        info.run = json.loads((folder / "run.json").read_text())
    if (folder / "finetune.yaml").is_file():
        info.job = load_config(folder / "finetune.yaml", check_files=False)  # data files need not exist any more
    return info


def base_source(info: AdapterInfo, base: str | None = None) -> tuple[Source, Any]:
    """The base checkpoint the adapter was trained on (or `base`, e.g. a local copy), with its model config."""
    if info.job is not None:
        model_cfg = info.job.model.model_copy(update={"name_or_path": base} if base else {})
        if base:
            model_cfg = model_cfg.model_copy(update={"gguf_file": None})
    else:
        model_cfg = ModelConfig(name_or_path=base or info.base)
    return resolve_source(model_cfg), model_cfg


def load_adapter(folder: str | Path, base: str | None = None, quantized: bool = False) -> tuple[Any, Any, AdapterInfo]:
    """(PeftModel in eval mode, tokenizer saved with the adapter, info). The base loads unquantized unless asked."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    info = read_adapter(folder)
    source, model_cfg = base_source(info, base)
    check_adapter_fits(info, source, model_cfg)  # before any weight is loaded
    tok = AutoTokenizer.from_pretrained(str(info.folder))
    set_pad_token(tok)
    quantization = info.job.lora.quantization if (info.job is not None and quantized) else "none"
    labels = info.run.get("labels")
    model = load_base_model(source, model_cfg, info.task, quantization, labels)
    check_pair(model, tok, source, info.task)
    peft_model = PeftModel.from_pretrained(model, str(info.folder))
    peft_model.eval()
    return peft_model, tok, info
