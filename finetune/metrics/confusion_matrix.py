"""Confusion matrix: matrix[i][j] counts examples of reference class labels[i] predicted as labels[j].
The classes are `labels` when given, else those seen in predictions or references, sorted."""

import datasets
import evaluate


class ConfusionMatrix(evaluate.Metric):
    """compute(predictions, references, labels=None) over class ids -> {'confusion_matrix', 'labels'}; a pair with a
    class outside `labels` is not counted."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of int; references: list of int; labels: optional list of int. "
            "Returns {'confusion_matrix': list of rows, 'labels': the class ids of rows and columns}.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        classes = sorted(labels if labels is not None else set(predictions) | set(references))
        index = {c: i for i, c in enumerate(classes)}
        matrix = [[0] * len(classes) for _ in classes]
        for p, r in zip(predictions, references, strict=True):
            if p in index and r in index:
                matrix[index[r]][index[p]] += 1
        return {"confusion_matrix": matrix, "labels": classes}
