"""What the page says about an adapter: a one-line summary for the first screen and the full card as a key: value
list (it wraps at phone width, where a two-column table did not). Plain Python, no gradio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.serving.engine import BASE, AdapterCard

# The metric the summary line shows: the first one eval.json has, task metric before loss.
HEADLINE = ("json_exact_match", "exact_match", "accuracy", "macro_f1", "token_f1", "rouge_l", "chrf", "loss")
DEFAULT_TEMPERATURE = 0.7  # sampling, for adapters whose eval did not decode greedily (or was never run)


def model_name(ref: str) -> str:
    """A base shown by its name: a hub id as is, a local folder (or file) by its last path component."""
    if not ref:
        return "unknown base"
    path = Path(ref).expanduser()
    looks_local = ref.startswith(("/", ".", "~")) or path.exists() or ref.count("/") > 1
    return path.name if looks_local else ref


def summary_line(card: AdapterCard) -> str:
    """`quickstart · SmolLM2-135M-Instruct · LoRA r16 · json_exact_match 0.90 (base 0.00)`."""
    if card.name == BASE:
        return f"{model_name(card.base)} · the base model alone (every adapter off)"
    parts = [card.name, model_name(card.base)]
    if card.rank is not None:
        parts.append(f"LoRA r{card.rank}")
    elif card.full:
        parts.append("full fine-tuning")
    metric = next((m for m in HEADLINE if m in card.eval_metrics), None)
    if metric is not None:
        values = card.eval_metrics[metric]
        parts.append(f"{metric} {fmt(values.get('adapter'))} (base {fmt(values.get('base'))})")
    elif "train_loss" in card.metrics:
        parts.append(f"train_loss {fmt(card.metrics['train_loss'])} (not evaluated yet)")
    return " · ".join(parts)


def card_rows(card: AdapterCard) -> list[tuple[str, str]]:
    """The full card, key -> value, in reading order."""
    rows = [("base", model_name(card.base)), ("task", card.task), ("chat template", "yes" if card.chat else "no")]
    if card.prompt is not None and card.task == "causal_lm":
        rows.append(("system prompt", _system_source(card)))
        if card.prompt.examples:
            rows.append(("examples", f"{len(card.prompt.examples)} from the {card.prompt.examples_source} data"))
    if card.rank is not None:
        rows.append(("LoRA", f"rank {card.rank}, alpha {fmt(card.alpha)}"))
    elif card.full:
        rows.append(("method", "full fine-tuning (a whole model; compared with its base)"))
    if card.labels:
        rows.append(("labels", ", ".join(card.labels)))
    rows += [(k if k.startswith("train") else f"train {k}", fmt(v)) for k, v in card.metrics.items()]
    rows += _eval_rows(card)
    if card.eval_decoding:
        decoding = card.eval_decoding
        rows.append(("eval decoding", f"{decoding.get('strategy', '?')}, up to {decoding.get('max_new_tokens', '?')} "
                                      "new tokens"))
    return rows


def card_markdown(card: AdapterCard) -> str:
    """The card as a Markdown key: value list."""
    return "\n".join(f"- **{key}**: {value}" for key, value in card_rows(card))


def default_temperature(card: AdapterCard) -> float:
    """Greedy (0) for adapters whose eval decoded greedily, so the page shows what eval measured."""
    return 0.0 if card.eval_decoding.get("strategy") == "greedy" else DEFAULT_TEMPERATURE


def fmt(value: Any) -> str:
    """Numbers as a person reads them: two decimals in the usual range, three significant digits outside it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if value == 0 or 0.01 <= abs(value) < 1000 else f"{value:.3g}"


def signed(value: Any) -> str:
    """A delta with its sign: +0.90, -4.56, +0.00."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:+.2f}" if value == 0 or 0.01 <= abs(value) < 1000 else f"{value:+.3g}"


def _system_source(card: AdapterCard) -> str:
    assert card.prompt is not None
    source = card.prompt.system_prompt_source
    if card.prompt.system_prompt:
        return f"recorded from {source} (pre-filled in the System prompt boxes)"
    if source == "varies":
        return "none recorded (the training rows use different ones)"
    return "none (training used none)" if card.chat else "not used (plain-text prompts)"


def _eval_rows(card: AdapterCard) -> list[tuple[str, str]]:
    metrics = dict(card.eval_metrics)
    exact, json_exact = metrics.get("exact_match"), metrics.get("json_exact_match")
    same = exact is not None and json_exact is not None and all(exact.get(k) == json_exact.get(k) for k in ("base", "adapter"))
    if same:  # one line instead of two identical ones
        metrics.pop("exact_match")
    rows = []
    for name, values in metrics.items():
        label = "eval json_exact_match = exact_match" if same and name == "json_exact_match" else f"eval {name}"
        rows.append((label, f"{fmt(values.get('adapter'))} (base {fmt(values.get('base'))}, {signed(values.get('delta'))})"))
    return rows
