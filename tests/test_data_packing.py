"""Packing: a packed batch gives the same loss and gradients as its examples run one by one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.data.collate import PadCollator
from finetune.data.packing import pack, pack_stream
from finetune.testing import chat_rows, qa_rows, write_jsonl


def _examples(n: int, lengths: list[int]) -> list[dict[str, Any]]:
    return [{"input_ids": [i] * k, "labels": [i] * k} for i, k in zip(range(n), lengths, strict=False)]


def test_best_fit_keeps_every_example_once_and_fits() -> None:
    lengths = [5, 9, 3, 12, 7, 1, 16, 2, 8, 4] * 3
    exs = _examples(len(lengths), lengths)
    rows = pack(exs, 16)
    assert all(sum(r["seq_lens"]) == len(r["input_ids"]) <= 16 for r in rows)
    assert Counter(t for r in rows for t in r["input_ids"]) == Counter(t for e in exs for t in e["input_ids"])
    assert len(rows) == -(-sum(lengths) // 16)  # these lengths pack perfectly: no row wasted
    streamed = list(pack_stream(iter(exs), 16))
    assert [t for r in streamed for t in r["input_ids"]] == [t for e in exs for t in e["input_ids"]]  # order kept


def summed_loss(model: Any, batch: dict[str, Any]) -> Any:
    """As the training loop computes it (every key but labels goes to the model), kept in float64."""
    import torch.nn.functional as F

    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


@pytest.mark.parametrize(("attn", "mask"), [("sdpa", "float64"), ("eager", "float64"), ("sdpa", "bool")])
def test_packed_loss_and_gradients_equal_one_by_one(tmp_path: Path, tiny_lm: Path, attn: str, mask: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    short = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in qa_rows(5)]
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(3) + short)
    base = DataConfig(train=str(f), max_seq_len=96, cache=False, padding_free=False)  # the 4D block-mask path
    single = build_data(base, tok)
    packed = build_data(base.model_copy(update={"packing": True}), tok)
    assert len(packed.train) < len(single.train) and packed.stats["packing_efficiency"] > 0.5
    # float64, so the comparison can be tight: any leak across examples would show far above rounding
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, attn_implementation=attn, dtype=torch.float64)

    def loss_and_grads(batches: list[dict[str, Any]]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        total = sum(summed_loss(model, b) for b in batches)
        total.backward()  # type: ignore[union-attr]
        return float(total.detach()), [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    packed.collator.mask_dtype = mask  # type: ignore[union-attr]
    batch = packed.collator(list(packed.train))  # all rows in one batch: rows of different lengths get padded
    assert batch["attention_mask"].shape[1] == 1 and batch["attention_mask"].dim() == 4
    ref_loss, ref_grads = loss_and_grads([PadCollator(tok.pad_token_id)([ex]) for ex in single.train])
    loss, grads = loss_and_grads([batch])
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_position_ids_alone_would_leak_across_examples(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the 4D mask exists: position ids alone keep packed examples apart only where transformers recognises the
    packing from them (5.23 does, without a KV cache); without that the loss of a packed row differs from the
    examples' own, and the explicit mask does not depend on it."""
    import torch
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.training.loop import loss_sum

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    cfg = DataConfig(train=str(f), max_seq_len=64, cache=False, packing=True, padding_free=False)
    bundle = build_data(cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    masked = bundle.collator(list(bundle.train))
    varlen = {k: v for k, v in masked.items() if k != "attention_mask"}
    with torch.no_grad():
        assert abs(float(loss_sum(model, masked)) - float(loss_sum(model, varlen))) > 1e-3


def test_train_with_packing_end_to_end(tmp_path: Path, tiny_lm: Path, write_job) -> None:
    from finetune.cli import main

    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(32))
    job = write_job(tmp_path, tiny_lm, f, data={"packing": True, "max_seq_len": 64, "cache_dir": str(tmp_path / "c")},
                    train={"max_steps": 6, "micro_batch_size": 2})
    assert main(["train", str(job)]) == 0
    run = json.loads((tmp_path / "adapters" / "tiny" / "run.json").read_text())
    assert run["data"]["packed_rows"] < run["data"]["examples"] == 32
    losses = [json.loads(line)["loss"] for line in (tmp_path / "adapters" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
