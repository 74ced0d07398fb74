"""Per-example attention for padding-free batches (finetune.data.collate.PaddingFreeCollator).

A padding-free row holds several examples one after another, with their boundaries in `cu_seq_lens_q`. Flash
attention's varlen kernels read those boundaries themselves. On sdpa (the CPU default) transformers would let every
token attend to the examples before it in the row (position ids alone do not separate them, and a 4D block mask makes
the row cost attention as one long sequence), so `SEGMENTS` runs sdpa once per example with `is_causal=True`:
sum(n_i^2) attention instead of (sum n_i)^2, and no mask to build. Any batch without boundaries (padded batches,
generation) goes to transformers' sdpa unchanged.
"""

from __future__ import annotations

from typing import Any

SEGMENTS = "finetune_segments"
NATIVE = ("flash_attention_2", "flash_attention_3", "flash_attention_4")  # read cu_seq_lens_q themselves


def segment_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature: (batch, heads, length, dim) in, (batch, length, heads, dim) out."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    cuts = bounds.tolist()
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                   scaling=scaling, is_causal=True)[0] for a, b in zip(cuts[:-1], cuts[1:], strict=False)]
    return torch.cat(outs, dim=1), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTS, segment_attention)
    AttentionMaskInterface.register(SEGMENTS, sdpa_mask)  # padded batches get exactly sdpa's mask


def use_segment_attention(model: Any) -> str | None:
    """Make `model` (a transformers model, or a peft model around one) keep the examples of a padding-free row apart;
    returns the implementation to restore afterwards (None: nothing was changed). Raises ValueError for kernels that
    cannot (eager, flex_attention, models with their own attention classes)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    if current in NATIVE or current == SEGMENTS:
        return None
    if current == "sdpa":
        _register()
        base.set_attn_implementation(SEGMENTS)
        if base.config._attn_implementation == SEGMENTS:
            return current
    raise ValueError(f"{type(base).__name__} with attention '{current}' cannot keep the examples of a padding-free "
                     "batch apart")


def restore_attention(model: Any, previous: str | None) -> None:
    """Undo use_segment_attention: set back the implementation it returned (None: nothing to undo)."""
    if previous is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(previous)
