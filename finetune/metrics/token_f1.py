"""Token F1 (as in SQuAD): per example, the F1 of the bag of normalised words of prediction and reference
(lower case, no punctuation, no articles); averaged over examples. Two empty answers score 1, one empty 0."""

from collections import Counter

import datasets
import evaluate

from finetune.metrics._text import squad_normalize


def _f1(pred: str, ref: str) -> float:
    p, r = squad_normalize(pred).split(), squad_normalize(ref).split()
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


class TokenF1(evaluate.Metric):
    """compute(predictions, references) over strings -> {'token_f1': 0..1}, the mean of per-example F1."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Rajpurkar et al. 2016, SQuAD: 100,000+ Questions for Machine Comprehension of Text.",
            inputs_description="predictions: list of str; references: list of str. Returns {'token_f1': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [_f1(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"token_f1": sum(scores) / len(scores) if scores else 0.0}
