"""Loading what the engine serves: adapter folders grouped by base (one loaded model per group, an adapter per batch
row), fully fine-tuned folders as models of their own, and the base entry. See finetune/serving/engine.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.config.model import ModelConfig
from finetune.data.prompt_record import PromptRecord
from finetune.data.prompting import stop_token_ids, uses_chat_template
from finetune.errors import FinetuneError
from finetune.lifecycle.fit import check_adapter_fits
from finetune.lifecycle.folder import base_source, load_adapter, load_base, read_adapter
from finetune.model import load_model, set_pad_token
from finetune.serving.batcher import Batcher, Batching
from finetune.serving.entries import BASE, AdapterCard, Entry, Limits
from finetune.serving.lora_rows import BASE_SLOT, install_row_lora


def load_entries(folders: Sequence[str | Path], base: str | None, limits: Limits, batching: Batching) -> dict[str, Entry]:
    """Load every adapter folder; those sharing task, base and labels share one loaded model. Text-generation
    adapters must share a base; with no folder, `base` alone is served. A fully fine-tuned folder (lora.enabled:
    false) is a model of its own, served in its own batch and compared with its base (the BASE entry)."""
    if not folders and not base:
        raise FinetuneError("nothing to serve: give one or more adapter folders, or --base MODEL for a base model alone")
    infos = [read_adapter(f) for f in folders]
    _check_names(infos)
    full = [i for i in infos if i.full]
    groups = _grouped([i for i in infos if not i.full], base)
    _check_one_text_base(groups, full, base)
    entries: dict[str, Entry] = {}
    full_text = next((i for i in full if i.task == "causal_lm"), None)
    if not any(key[0] == "causal_lm" for key in groups) and (full_text is not None or not infos):
        entries[BASE] = (_full_base_entry(full_text, base, limits, batching) if full_text is not None
                         else _base_only_entry(str(base), limits, batching))
    for key, members in groups.items():
        if key[0] == "causal_lm":
            entries.update(_load_causal_group(members, base, limits, batching))
        else:
            entries.update(_load_classifiers(members, base))
    for info in full:
        entries[info.name] = _full_entry(info, limits, batching)
    return entries


def _check_one_text_base(groups: dict[tuple[str, str, tuple[str, ...]], list[Any]], full: list[Any],
                         base: str | None) -> None:
    """Every text-generation entry decodes next to the one BASE entry, so all must share that base."""
    by_base: dict[str, list[str]] = {}
    for key, members in groups.items():
        if key[0] == "causal_lm":
            by_base.setdefault(key[1], []).extend(i.name for i in members)
    for info in full:
        if info.task == "causal_lm":
            by_base.setdefault(base_source(info, base)[0].ref, []).append(info.name)
    if len(by_base) > 1:
        raise FinetuneError("the text-generation adapters were trained on different bases ("
                            + "; ".join(f"{ref}: {', '.join(names)}" for ref, names in by_base.items())
                            + "). Serve one base per process, or pass --base to run them all on one.")


def _check_names(infos: list[Any]) -> None:
    seen: dict[str, Any] = {}
    for info in infos:
        if info.name == BASE or info.name in seen:
            other = seen.get(info.name, "the base entry")
            raise FinetuneError(f"two adapters are named '{info.name}' ({other} and {info.folder}): the picker needs "
                                "distinct folder names; rename one")
        seen[info.name] = info.folder


def _grouped(infos: list[Any], base: str | None) -> dict[tuple[str, str, tuple[str, ...]], list[Any]]:
    groups: dict[tuple[str, str, tuple[str, ...]], list[Any]] = {}
    for info in infos:
        key = (info.task, base_source(info, base)[0].ref, tuple(info.run.get("labels") or ()))
        groups.setdefault(key, []).append(info)
    return groups


def _load_members(members: list[Any], base: str | None) -> tuple[Any, list[tuple[Any, Any, str]]]:
    """The first adapter loads the base (through finetune.lifecycle.folder); the others are added to it by name.
    Returns the model and (info, tokenizer, peft name) per adapter."""
    from transformers import AutoTokenizer

    model, tok, first = load_adapter(members[0].folder, base)
    loaded = [(first, tok, "default")]
    for i, info in enumerate(members[1:], start=1):
        check_adapter_fits(info, *base_source(info, base))
        result = model.load_adapter(str(info.folder), adapter_name=f"adapter_{i}")
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise FinetuneError(f"{info.folder}: {len(unexpected)} adapter weights match no layer of the base loaded "
                                f"for {first.folder} (e.g. {unexpected[0]}); was it trained on another base?")
        other_tok = AutoTokenizer.from_pretrained(str(info.folder))
        set_pad_token(other_tok)
        loaded.append((info, other_tok, f"adapter_{i}"))
    model.eval()
    return model, loaded


def _load_causal_group(members: list[Any], base: str | None, limits: Limits, batching: Batching) -> dict[str, Entry]:
    model, loaded = _load_members(members, base)
    peft_names: list[str | None] = [None] + [name for _, _, name in loaded]
    batcher = _batcher(model, install_row_lora(model, peft_names), peft_names, loaded[0][1], limits, batching)
    first_info, first_tok, _ = loaded[0]
    stop_ids = stop_token_ids(first_tok, getattr(model, "generation_config", None))
    card = AdapterCard(name=BASE, base=first_info.base, task="causal_lm", chat=first_info.chat)
    entries = {BASE: Entry(model, first_tok, "causal_lm", first_info.chat, None, stop_ids, card,
                           PromptRecord(first_info.chat), BASE_SLOT, batcher)}
    for slot, (info, tok, name) in enumerate(loaded, start=1):
        stops = stop_token_ids(tok, getattr(model, "generation_config", None))
        entries[info.name] = Entry(model, tok, "causal_lm", info.chat, name, stops, _card(info), info.prompt, slot,
                                   batcher)
    return entries


def _load_classifiers(members: list[Any], base: str | None) -> dict[str, Entry]:
    model, loaded = _load_members(members, base)
    lock = threading.Lock()  # one peft model: its active adapter is global state
    return {info.name: Entry(model, tok, info.task, info.chat, name, [], _card(info), info.prompt, lock=lock)
            for info, tok, name in loaded}


def _full_entry(info: Any, limits: Limits, batching: Batching) -> Entry:
    """A fully fine-tuned model: its own weights, no adapter; a text model gets a batch of its own."""
    model, tok, info = load_adapter(info.folder)
    model.eval()
    if info.task != "causal_lm":
        return Entry(model, tok, info.task, info.chat, None, [], _card(info), info.prompt, full=True)
    stops = stop_token_ids(tok, getattr(model, "generation_config", None))
    return Entry(model, tok, "causal_lm", info.chat, None, stops, _card(info), info.prompt, BASE_SLOT,
                 _batcher(model, None, [None], tok, limits, batching), full=True)


def _full_base_entry(info: Any, base: str | None, limits: Limits, batching: Batching) -> Entry:
    """The base a fully fine-tuned text model started from (or --base), with that model's tokenizer, as eval does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(info.folder))
    set_pad_token(tok)
    model = load_base(info, tok, base)
    card = AdapterCard(name=BASE, base=info.base, task="causal_lm", chat=info.chat)
    return Entry(model, tok, "causal_lm", info.chat, None, stop_token_ids(tok, getattr(model, "generation_config", None)),
                 card, PromptRecord(info.chat), BASE_SLOT, _batcher(model, None, [None], tok, limits, batching))


def _base_only_entry(base: str, limits: Limits, batching: Batching) -> Entry:
    model, tok, source = load_model(ModelConfig(name_or_path=base))
    model.eval()
    chat = uses_chat_template(tok)
    card = AdapterCard(name=BASE, base=source.ref, task="causal_lm", chat=chat)
    batcher = _batcher(model, None, [None], tok, limits, batching)
    return Entry(model, tok, "causal_lm", chat, None, stop_token_ids(tok, model.generation_config), card,
                 PromptRecord(chat), BASE_SLOT, batcher)


def _batcher(model: Any, row_lora: Any, peft_names: list[str | None], tok: Any, limits: Limits,
             batching: Batching) -> Batcher:
    config = model.config
    _check_attention(model, limits)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Batcher(model, row_lora, peft_names, pad, batching, getattr(config, "max_position_embeddings", None))


def _check_attention(model: Any, limits: Limits) -> None:
    """The batch runs full causal attention with its own 4D masks (sdpa or eager kernels)."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    longest = limits.max_prompt_tokens + limits.max_new_tokens
    window = getattr(config, "sliding_window", None)
    if kinds - {"full_attention", "sliding_attention"}:
        raise FinetuneError(f"{config.model_type}: layers of kind {', '.join(sorted(kinds))} are not supported by "
                            "the batched engine (full or sliding attention only)")
    if "sliding_attention" in kinds and window is not None and window < longest:
        raise FinetuneError(f"{config.model_type} attends over a sliding window of {window} tokens, shorter than "
                            f"--max-prompt-tokens + --max-new-tokens = {longest}: lower them to at most {window}")
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")


def _card(info: Any) -> AdapterCard:
    eval_file = info.folder / "eval.json"
    report = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
    # eval.json (finetune/evaluation/report.py): metrics -> {base, adapter, delta, better}; scalars only here
    eval_metrics = {name: {k: m.get(k) for k in ("base", "adapter", "delta")}
                    for name, m in (report.get("metrics") or {}).items() if isinstance(m, dict) and "delta" in m}
    return AdapterCard(
        name=info.name, base=info.base, task=info.task, rank=info.adapter_config.get("r"),
        alpha=info.adapter_config.get("lora_alpha"), chat=info.chat, labels=info.run.get("labels"),
        metrics=dict(info.run.get("metrics") or {}), eval_metrics=eval_metrics,
        eval_decoding=dict(report.get("decoding") or {}), prompt=info.prompt, full=info.full,
    )
