"""Macro F1: the unweighted mean over classes of each class's F1 (a class never predicted nor present scores 0).
The classes are `labels` when given, else those seen in predictions or references (as scikit-learn does)."""

import datasets
import evaluate


def class_f1(predictions: list[int], references: list[int], label: int) -> float:
    """F1 of class id `label`, 2tp / (2tp + fp + fn); 0 when it has no true positive."""
    tp = sum(p == label and r == label for p, r in zip(predictions, references, strict=True))
    fp = sum(p == label and r != label for p, r in zip(predictions, references, strict=True))
    fn = sum(p != label and r == label for p, r in zip(predictions, references, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


class MacroF1(evaluate.Metric):
    """compute(predictions, references, labels=None) over class ids -> {'macro_f1': 0..1}."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of int; references: list of int; labels: optional list of int. "
            "Returns {'macro_f1': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        classes = sorted(labels if labels is not None else set(predictions) | set(references))
        scores = [class_f1(predictions, references, c) for c in classes]
        return {"macro_f1": sum(scores) / len(scores) if scores else 0.0}
