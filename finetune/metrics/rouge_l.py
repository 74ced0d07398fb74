"""ROUGE-L: per example, the F1 of the longest common subsequence of words (rouge_score's tokenizer: lower case,
runs of letters and digits, no stemming); averaged over examples."""

import datasets
import evaluate

from finetune.metrics._text import rouge_tokens


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    # One row of the dynamic programme at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def _rouge_l(pred: str, ref: str) -> float:
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


class RougeL(evaluate.Metric):
    """compute(predictions, references) over strings -> {'rouge_l': 0..1}, the mean of per-example LCS F1."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin 2004, ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str. Returns {'rouge_l': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [_rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0}
