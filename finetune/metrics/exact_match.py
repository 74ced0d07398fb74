"""Exact match: the fraction of predictions equal to their reference after trimming and collapsing whitespace.

Case and punctuation count (an extraction answer with the wrong case is wrong)."""

import datasets
import evaluate

from finetune.metrics._text import squeeze


class ExactMatch(evaluate.Metric):
    """compute(predictions, references) over strings -> {'exact_match': 0..1}; 0.0 for no examples."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of str. Returns {'exact_match': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits = [squeeze(p) == squeeze(r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
