"""Per-class precision and recall, and their unweighted means over classes (macro recall is TweetEval's official
sentiment metric). A class never predicted has precision 0; a class absent from the references has recall 0 (as
scikit-learn's zero_division=0). The classes are `labels` when given, else those seen, sorted."""

import datasets
import evaluate


def _ratio(hits: int, total: int) -> float:
    return hits / total if total else 0.0


class PerClass(evaluate.Metric):
    """compute(predictions, references, labels=None) over class ids -> precision and recall per class (sorted class
    order) and their macro means."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of int; references: list of int; labels: optional list of int. "
            "Returns {'per_class_precision': [..], 'per_class_recall': [..] in class order, 'macro_precision', "
            "'macro_recall': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        classes = sorted(labels if labels is not None else set(predictions) | set(references))
        pairs = list(zip(predictions, references, strict=True))
        hits = [sum(p == c and r == c for p, r in pairs) for c in classes]
        precision = [_ratio(h, sum(p == c for p, _ in pairs)) for h, c in zip(hits, classes, strict=True)]
        recall = [_ratio(h, sum(r == c for _, r in pairs)) for h, c in zip(hits, classes, strict=True)]
        return {"per_class_precision": precision, "per_class_recall": recall,
                "macro_precision": sum(precision) / len(classes) if classes else 0.0,
                "macro_recall": sum(recall) / len(classes) if classes else 0.0}
