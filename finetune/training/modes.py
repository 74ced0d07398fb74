"""Switching a model to evaluation mode for no-grad forwards inside training (validation, DPO's reference)."""

from __future__ import annotations

from typing import Any


def eval_mode(model: Any) -> None:
    """model.eval(), except that bitsandbytes 4-bit layers keep training=True on CPU: in eval mode their first no-grad
    forward repacks the weight in place, and later training forwards misread the packed weight (bnb 0.50: the
    reloaded adapter's logits then differed by 0.09). The flag changes nothing else in those layers."""
    model.eval()
    if next(model.parameters()).device.type != "cpu":
        return
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.training = True
