"""Batched greedy generation: prompts rendered by finetune.data.prompting (as in training), left-padded, stopped at
EOS / end of turn. Greedy decoding is deterministic, so base and adapter differ only by their weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.data.prompting import Messages, prompt_ids

if TYPE_CHECKING:
    import torch


@dataclass
class Decoding:
    """Recorded in eval.json: everything that decides which tokens come out."""

    max_new_tokens: int
    batch_size: int
    chat_template: bool
    stop_token_ids: list[int] = field(default_factory=list)
    strategy: str = "greedy"
    padding_side: str = "left"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_prompts(tok: Any, prompts: list[str | Messages], chat: bool) -> list[list[int]]:
    """Token ids of each prompt, rendered by prompting.prompt_ids exactly as training rendered them."""
    return [prompt_ids(tok, p, chat=chat) for p in prompts]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the left so every prompt ends at the last column, where generation continues."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def generate(model: Any, tok: Any, prompts: list[list[int]], decoding: Decoding) -> list[list[int]]:
    """New token ids per prompt, cut before the first stop token; same order as `prompts`."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), decoding.batch_size):
        out.extend(generate_batch(model, tok, prompts[start : start + decoding.batch_size], decoding))
    return out


def generate_batch(model: Any, tok: Any, prompts: list[list[int]], decoding: Decoding) -> list[list[int]]:
    """Greedy continuations of one left-padded batch of prompts, each cut before its first stop token."""
    import torch
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, tok.pad_token_id)
    device = next(model.parameters()).device
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=decoding.max_new_tokens, eos_token_id=decoding.stop_token_ids,
        pad_token_id=tok.pad_token_id,
    )
    with torch.no_grad():
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return [cut_at_stop(row[ids.shape[1] :].tolist(), decoding.stop_token_ids) for row in seqs]


def cut_at_stop(ids: list[int], stop: list[int]) -> list[int]:
    """`ids` up to (not including) the first id in `stop`."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def decode(tok: Any, rows: list[list[int]]) -> list[str]:
    """Generated ids as text, special tokens dropped and surrounding whitespace stripped."""
    return [tok.decode(r, skip_special_tokens=True).strip() for r in rows]
