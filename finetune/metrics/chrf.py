"""chrF (Popović 2015) as sacrebleu computes it by default (character n-grams 1..6, beta 2, whitespace removed,
statistics summed over the corpus, precision and recall averaged over the orders both sides have), on a 0..1
scale (sacrebleu's score / 100)."""

from collections import Counter

import datasets
import evaluate

ORDER, BETA = 6, 2.0
EPS = 1e-16


def _ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def corpus_stats(predictions: list[str], references: list[str]) -> list[list[int]]:
    """Per order n: [hypothesis n-grams, reference n-grams, matched n-grams], summed over the corpus."""
    stats = [[0, 0, 0] for _ in range(ORDER)]
    for pred, ref in zip(predictions, references, strict=True):
        hyp, gold = "".join(pred.split()), "".join(ref.split())
        for n in range(1, ORDER + 1):
            h, r = _ngrams(hyp, n), _ngrams(gold, n)
            stats[n - 1][0] += sum(h.values())
            stats[n - 1][1] += sum(r.values())
            stats[n - 1][2] += sum((h & r).values())
    return stats


def chrf_score(stats: list[list[int]]) -> float:
    """chrF (beta 2) on 0..1 from corpus_stats' counts, precision and recall averaged over the orders both have."""
    factor = BETA**2
    avg_p = avg_r = 0.0
    effective = 0
    for n_hyp, n_ref, n_match in stats:
        avg_p += n_match / n_hyp if n_hyp else EPS
        avg_r += n_match / n_ref if n_ref else EPS
        effective += int(n_hyp > 0 and n_ref > 0)
    if effective == 0:
        return 0.0
    avg_p, avg_r = avg_p / effective, avg_r / effective
    if avg_p + avg_r == 0:
        return 0.0
    return (1 + factor) * avg_p * avg_r / (factor * avg_p + avg_r)


class Chrf(evaluate.Metric):
    """compute(predictions, references) over strings -> {'chrf': 0..1}, one corpus-level score (not a mean of rows)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Popović 2015, chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description="predictions: list of str; references: list of str. Returns {'chrf': 0..1}.",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return {"chrf": chrf_score(corpus_stats(predictions, references))}
