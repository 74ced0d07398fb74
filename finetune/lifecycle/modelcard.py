"""The Hub model card (README.md) of a published adapter: YAML metadata the Hub indexes, then what a reader needs to
trust and use it (base, data, LoRA settings, training run, eval metrics, a transformers + peft snippet)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from finetune.lifecycle.folder import AdapterInfo

PIPELINE_TAGS = {"causal_lm": "text-generation", "classification": "text-classification"}


@dataclass
class CardInput:
    repo_id: str
    base_model: str | None  # a hub id, or None when the base is a local folder only
    license: str = "apache-2.0"
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def card_metadata(info: AdapterInfo, card: CardInput) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if card.base_model:
        meta["base_model"] = card.base_model
    meta.update(library_name="peft", pipeline_tag=PIPELINE_TAGS.get(info.task, "text-generation"), license=card.license,
                tags=sorted({"lora", "peft", "finetune", "transformers", *card.tags}))
    if card.datasets:
        meta["datasets"] = list(card.datasets)
    return meta


def eval_metrics(info: AdapterInfo) -> dict[str, dict[str, Any]]:
    """`finetune eval` results (eval.json next to the adapter): metric -> {base, adapter, delta, better}."""
    try:
        report = json.loads((info.folder / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    metrics = report.get("metrics") if isinstance(report, dict) else None
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, dict) and _number(v.get("adapter"))}


def train_metrics(info: AdapterInfo) -> dict[str, float]:
    return {k: v for k, v in (info.run.get("metrics") or {}).items() if _number(v)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def render_card(info: AdapterInfo, card: CardInput) -> str:
    meta = yaml.safe_dump(card_metadata(info, card), sort_keys=False).strip()
    parts = [f"---\n{meta}\n---", f"# {card.repo_id.split('/')[-1]}", _summary(info, card), _training(info),
             _metrics(info), _usage(info, card), _files()]
    return "\n\n".join(p for p in parts if p) + "\n"


def _summary(info: AdapterInfo, card: CardInput) -> str:
    base = f"[{card.base_model}](https://huggingface.co/{card.base_model})" if card.base_model else "a local base model"
    what = "text generation" if info.task == "causal_lm" else "text classification"
    return (f"A LoRA adapter for {what} on top of {base}, trained with the `finetune` toolkit and saved with "
            "peft. Only the adapter weights are here; the base model is loaded separately.")


def _training(info: AdapterInfo) -> str:
    cfg = info.adapter_config
    rows = [("LoRA rank r", cfg.get("r")), ("lora_alpha", cfg.get("lora_alpha")),
            ("target modules", _short_targets(cfg.get("target_modules"))), ("rsLoRA", cfg.get("use_rslora")),
            ("DoRA", cfg.get("use_dora"))]
    if info.job is not None:
        t = info.job.train
        rows += [("steps", t.max_steps), ("learning rate", t.learning_rate), ("micro batch size", t.micro_batch_size),
                 ("precision", t.precision), ("quantization", info.job.lora.quantization)]
    objective = info.run.get("objective") or {}
    rows += [("objective", objective.get("name"))] + [(k, v) for k, v in objective.items() if k != "name"]
    rows += [("started from adapter", info.run.get("started_from"))]
    data = info.run.get("data") or {}
    rows += [("data format", data.get("format")), ("training examples", data.get("examples")),
             ("chat template", data.get("chat_template"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    return "## Training\n\n| setting | value |\n|---|---|\n" + table + "\n\nThe full job config is in `finetune.yaml`."


def _short_targets(targets: Any) -> str | None:
    if isinstance(targets, list):
        return ", ".join(sorted({str(t).rsplit(".", 1)[-1] for t in targets}))
    return str(targets) if targets else None


def _metrics(info: AdapterInfo) -> str:
    parts = []
    evals = eval_metrics(info)
    if evals:
        rows = "\n".join(f"| {k} | {_fmt(m.get('base'))} | {_fmt(m['adapter'])} | {_fmt(m.get('delta'))} |"
                         for k, m in sorted(evals.items()))
        parts.append("## Evaluation\n\nBase model vs this adapter on the same held-out examples (`finetune eval`).\n\n"
                     "| metric | base | adapter | delta |\n|---|---:|---:|---:|\n" + rows)
    train = train_metrics(info)
    if train:
        rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(train.items()))
        parts.append("## Training metrics\n\n| metric | value |\n|---|---:|\n" + rows)
    return "\n\n".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def _usage(info: AdapterInfo, card: CardInput) -> str:
    base = card.base_model or "PATH/TO/BASE_MODEL"
    if info.task == "classification":
        head, load = "AutoModelForSequenceClassification", "AutoModelForSequenceClassification.from_pretrained(base)"
        run = 'inputs = tokenizer("an example text", return_tensors="pt")\nprint(model(**inputs).logits.argmax(-1))'
    else:
        head, load = "AutoModelForCausalLM", "AutoModelForCausalLM.from_pretrained(base)"
        if info.chat:
            run = ('messages = [{"role": "user", "content": "Hello!"}]\n'
                   "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                   "return_dict=True)\n")
        else:
            run = 'inputs = tokenizer("Hello!", return_tensors="pt")\n'
        run += ("out = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
                "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
    return (
        "## Usage\n\n```python\n"
        f"from peft import PeftModel\nfrom transformers import AutoTokenizer, {head}\n\n"
        f'base = "{base}"\nadapter = "{card.repo_id}"\n'
        "tokenizer = AutoTokenizer.from_pretrained(adapter)  # the tokenizer and chat template used in training\n"
        f"model = PeftModel.from_pretrained({load}, adapter)\n{run}\n```"
    )


def _files() -> str:
    return ("## Files\n\n`adapter_model.safetensors` + `adapter_config.json` (peft), the tokenizer and chat template, "
            "`finetune.yaml` (the resolved training job) and `run.json` (versions, data fingerprint, metrics).")
