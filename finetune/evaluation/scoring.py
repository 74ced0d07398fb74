"""Model-side measurements (loss, class predictions) and the metric modules applied to predictions.

Examples are encoded by the training data stage's Encoder, so the loss covers exactly the tokens training put in
its loss (answers and their end-of-turn token; every token of text rows)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from finetune.data.collate import PadCollator
from finetune.data.encode import Counts, Encoder
from finetune.errors import DataError
from finetune.evaluation.examples import Example
from finetune.metrics import GENERATION, load_metric
from finetune.metrics._text import parse_json
from finetune.training.loss import loss_sum

if TYPE_CHECKING:
    from finetune.config.data import DataConfig


def encode(examples: list[Example], cfg: DataConfig, tok: Any, chat: bool, labels: list[str] | None) -> list[dict[str, Any]]:
    """Token examples, one Encoder call per run of same-kind records (the Encoder takes one kind per call)."""

    encoder, counts = Encoder(cfg, tok, chat, labels), Counts()
    out: list[dict[str, Any]] = []
    start = 0
    while start < len(examples):
        end = start
        while end < len(examples) and examples[end].record["kind"] == examples[start].record["kind"]:
            end += 1
        chunk = examples[start:end]
        out.extend(encoder.encode([e.record for e in chunk], [e.where for e in chunk], counts))
        start = end
    if not out:
        raise DataError(f"{examples[0].where if examples else 'eval data'}: no example has a token to score after "
                        "formatting and the length policy (data.max_seq_len / data.overlong)")
    return out


def forward(model: Any, tok: Any, encoded: list[dict[str, Any]], batch_size: int) -> tuple[dict[str, float], list[int]]:
    """({loss, perplexity, tokens}, predicted class per example for classification examples)."""
    import torch


    collate, device = PadCollator(tok.pad_token_id), next(model.parameters()).device
    total, count, preds = 0.0, 0, list[int]()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size]).items()}
            total += float(loss_sum(model, batch))
            if "label" in batch:
                count += len(batch["label"])
                inputs = {k: v for k, v in batch.items() if k != "label"}
                preds.extend(int(i) for i in model(**inputs).logits.argmax(-1))
            else:
                count += int((batch["labels"][:, 1:] != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}, preds


def generation_metrics(predictions: list[str], references: list[str], json_match: bool) -> dict[str, float]:
    """Exact match, token F1, ROUGE-L and chrF of predictions against references (plus JSON exact match when
    `json_match`), all in [0, 1], merged into one dict."""
    names = list(GENERATION) + (["json_exact_match"] if json_match else [])
    out: dict[str, float] = {}
    for name in names:
        out.update(load_metric(name).compute(predictions=predictions, references=references))
    return out


def classification_metrics(predictions: list[int], references: list[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision and recall, and the confusion matrix, over class indices
    0..num_labels-1."""
    out: dict[str, Any] = load_metric("accuracy").compute(predictions=predictions, references=references)
    out.update(load_metric("macro_f1").compute(predictions=predictions, references=references))
    out.update(load_metric("per_class").compute(predictions=predictions, references=references, labels=list(range(num_labels))))
    cm = load_metric("confusion_matrix").compute(predictions=predictions, references=references, labels=list(range(num_labels)))
    out["confusion_matrix"] = cm["confusion_matrix"]
    return out


def references_are_json(references: list[str]) -> bool:
    """JSON exact match is added when every reference is a JSON object or list (an extraction task)."""

    parsed = [parse_json(r) for r in references]
    return bool(parsed) and all(ok and isinstance(v, (dict, list)) for ok, v in parsed)
