"""Preference metrics of `finetune eval` on pairs (prompt/chosen/rejected): how often the model gives the chosen answer
a higher log-probability than the rejected one, and by how much on average, measured for the base and the adapter.

Pairs are encoded by the training data stage (finetune.data.preference) and scored by the training objective's own
`sequence_logps` (answer tokens only), so eval measures exactly what preference training optimises."""

from __future__ import annotations

from typing import Any

from finetune.config.data import DataConfig
from finetune.data.encode import Counts
from finetune.data.preference import PreferenceCollator, PreferenceEncoder
from finetune.errors import DataError
from finetune.evaluation.examples import Example
from finetune.training.preference import sequence_logps


def encode_pairs(examples: list[Example], cfg: DataConfig, tok: Any, chat: bool) -> list[dict[str, Any]]:
    """The pairs of an eval set as training encodes them (a pair whose answer is truncated away is left out)."""
    pairs = [e for e in examples if e.record["kind"] == "preference"]
    encoded = PreferenceEncoder(cfg, tok, chat).encode([e.record for e in pairs], [e.where for e in pairs], Counts())
    if pairs and not encoded:
        raise DataError(f"{pairs[0].where}: no preference pair keeps an answer token on both sides after the length "
                        "policy (data.max_seq_len)")
    return encoded


def preference_metrics(model: Any, tok: Any, pairs: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """preference_accuracy: share of pairs where log p(chosen) > log p(rejected) (summed over the answer tokens, as
    DPO's reward); preference_margin: the mean of that difference; preference_accuracy_per_token: the same test on
    the mean log-probability per answer token (the length-normalised score ORPO and SimPO use)."""
    import torch

    collate, device = PreferenceCollator(tok.pad_token_id), next(model.parameters()).device
    sums, means = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate(pairs[start: start + batch_size]).items()}
            logps, tokens = sequence_logps(model, batch)
            sums.append(torch.stack(logps.chunk(2), dim=1).double().cpu())
            means.append(torch.stack((logps / tokens.clamp(min=1)).chunk(2), dim=1).double().cpu())
    total, mean = torch.cat(sums), torch.cat(means)
    return {"preference_accuracy": float((total[:, 0] > total[:, 1]).double().mean()),
            "preference_margin": float((total[:, 0] - total[:, 1]).mean()),
            "preference_accuracy_per_token": float((mean[:, 0] > mean[:, 1]).double().mean())}
