"""Evaluation stage: base vs adapter on the same examples (`run_eval`), written up as eval.json / eval.md / eval.png."""

from finetune.evaluation.runner import EvalOptions, EvalResult, run_eval

__all__ = ["EvalOptions", "EvalResult", "run_eval"]
