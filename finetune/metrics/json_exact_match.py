"""JSON exact match: a prediction counts when it parses to the same JSON value as its reference (key order and
spacing do not matter); when either side is not valid JSON, the whitespace-collapsed texts must be equal.

Also returns json_valid, the fraction of predictions that parse as JSON. A ``` fence around the JSON is tolerated."""

import datasets
import evaluate

from finetune.metrics._text import parse_json, squeeze


class JsonExactMatch(evaluate.Metric):
    """compute(predictions, references) over strings -> {'json_exact_match': 0..1, 'json_valid': 0..1}."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of str. "
            "Returns {'json_exact_match': 0..1, 'json_valid': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits, valid = 0, 0
        for pred, ref in zip(predictions, references, strict=True):
            p_ok, p_val = parse_json(pred)
            r_ok, r_val = parse_json(ref)
            valid += p_ok
            hits += (p_val == r_val) if (p_ok and r_ok) else (squeeze(pred) == squeeze(ref))
        n = len(predictions)
        return {"json_exact_match": hits / n if n else 0.0, "json_valid": valid / n if n else 0.0}
