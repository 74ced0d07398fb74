"""Each shipped metric, loaded by path with evaluate (offline), against values computed by hand."""

from __future__ import annotations

import pytest

from finetune.errors import FinetuneError
from finetune.metrics import available, load_metric

CASES = [
    # exact match: whitespace is collapsed, case counts -> hits 1, 0, 1
    ("exact_match", ["Paris", " paris", "a  b\n"], ["Paris", "Paris", "a b"], {}, {"exact_match": 2 / 3}),
    # JSON: key order and spacing ignored; {"a":1} != {"a":2}; "x" is no JSON, compared as text
    ("json_exact_match", ['{"a": 1, "b": 2}', '```json\n{"a":1}\n```', "x"], ['{"b":2,"a":1}', '{"a":2}', "x"], {},
     {"json_exact_match": 2 / 3, "json_valid": 2 / 3}),
    # token F1: "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P=1, R=2/3, F1=0.8; empty/empty=1
    ("token_f1", ["the cat sat", ""], ["a cat sat down", ""], {}, {"token_f1": (0.8 + 1.0) / 2}),
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 and 6 -> 5/6; "a b c" vs "c b a": LCS 1 -> 1/3
    ("rouge_l", ["The cat sat on the mat.", "a b c"], ["the cat is on the mat", "c b a"], {}, {"rouge_l": (5 / 6 + 1 / 3) / 2}),
    # chrF: "abc" vs "abd": order 1 P=R=2/3, order 2 P=R=1/2, order 3 P=R=0, orders 4-6 absent on both sides
    # -> mean P = mean R = (2/3 + 1/2 + 0) / 3 = 7/18, and F-beta of equal P and R is that value
    ("chrf", ["abc"], ["abd"], {}, {"chrf": 7 / 18}),
    ("chrf", ["a b", "xyz"], ["ab", "xyz"], {}, {"chrf": 1.0}),  # whitespace is removed before n-grams
    ("accuracy", [0, 1, 1, 2], [0, 1, 2, 2], {}, {"accuracy": 0.75}),
    # per class F1 = 2tp / (2tp + fp + fn): class 0 -> 1, class 1 -> 2/3, class 2 -> 2/3
    ("macro_f1", [0, 1, 1, 2], [0, 1, 2, 2], {}, {"macro_f1": 7 / 9}),
    ("macro_f1", [0, 0], [0, 0], {"labels": [0, 1]}, {"macro_f1": 0.5}),  # a class never seen scores 0
    # precision = tp / predicted, recall = tp / present: class 0 -> 1/1, 1/1; class 1 -> 1/2, 1/1; class 2 -> 1/1, 1/2
    ("per_class", [0, 1, 1, 2], [0, 1, 2, 2], {"labels": [0, 1, 2]},
     {"per_class_precision": [1.0, 0.5, 1.0], "per_class_recall": [1.0, 1.0, 0.5], "macro_precision": 2.5 / 3,
      "macro_recall": 2.5 / 3}),
    # a class never predicted nor present scores 0 on both and still counts in the macro means
    ("per_class", [0, 0], [0, 0], {"labels": [0, 1]},
     {"per_class_precision": [1.0, 0.0], "per_class_recall": [1.0, 0.0], "macro_precision": 0.5, "macro_recall": 0.5}),
    ("confusion_matrix", [0, 1, 1, 2], [0, 1, 2, 2], {"labels": [0, 1, 2]},
     {"confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 1, 1]], "labels": [0, 1, 2]}),
]


@pytest.mark.parametrize(("name", "predictions", "references", "kwargs", "expected"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_metric_matches_hand_computed_value(name, predictions, references, kwargs, expected):
    got = load_metric(name).compute(predictions=predictions, references=references, **kwargs)
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert got[key] == (pytest.approx(want, abs=1e-12) if isinstance(want, float) else want), key


def test_all_metrics_ship_and_unknown_names_list_them():
    assert {"exact_match", "json_exact_match", "token_f1", "rouge_l", "chrf", "accuracy", "macro_f1", "per_class",
            "confusion_matrix"} <= set(available())
    with pytest.raises(FinetuneError, match="unknown metric 'bleu'.*accuracy"):
        load_metric("bleu")


def test_rouge_lcs_and_chrf_corpus_statistics():
    from finetune.metrics.chrf import chrf_score, corpus_stats
    from finetune.metrics.rouge_l import lcs_length

    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example (e.g. "b c b a")
    stats = corpus_stats(["ab", "c"], ["ab", "d"])  # summed over sentences, not averaged per sentence
    assert stats[0] == [3, 3, 2] and stats[1] == [1, 1, 1]
    # order 1: P=R=2/3; order 2: P=R=1; orders 3-6 absent -> F = (2/3 + 1) / 2
    assert chrf_score(stats) == pytest.approx(5 / 6)


def test_chrf_equals_sacrebleu_when_installed():
    """sacrebleu is not a dependency; where it is installed, our chrF must equal its corpus_chrf / 100."""
    sacrebleu = pytest.importorskip("sacrebleu")
    preds = ["the cat sat on the mat", "hello world", '{"name": "Alice"}']
    refs = ["the cat is on the mat", "hello there world", '{"name":"Alice"}']
    got = load_metric("chrf").compute(predictions=preds, references=refs)["chrf"]
    assert got == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score / 100, abs=1e-9)


def test_per_class_and_macro_recall_equal_scikit_learn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    import random

    rng = random.Random(3)
    refs = [rng.randrange(3) for _ in range(60)]
    preds = [r if rng.random() < 0.6 else rng.randrange(3) for r in refs]
    got = load_metric("per_class").compute(predictions=preds, references=refs, labels=[0, 1, 2])
    precision, recall, _, _ = metrics.precision_recall_fscore_support(refs, preds, labels=[0, 1, 2], zero_division=0)
    assert got["per_class_precision"] == pytest.approx(list(precision))
    assert got["per_class_recall"] == pytest.approx(list(recall))
    assert got["macro_recall"] == pytest.approx(metrics.recall_score(refs, preds, average="macro", zero_division=0))
