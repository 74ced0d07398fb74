"""Accuracy: the fraction of predicted class ids equal to the reference ids."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """compute(predictions, references) over class ids -> {'accuracy': 0..1}; 0.0 for no examples."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of int; references: list of int. Returns {'accuracy': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        hits = [p == r for p, r in zip(predictions, references, strict=True)]
        return {"accuracy": sum(hits) / len(hits) if hits else 0.0}
