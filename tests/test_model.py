"""Tokenizer/model pairing and the pad-token policy (the "never stops generating" bug)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config.data import DataConfig
from finetune.config.model import ModelConfig
from finetune.data import build_data
from finetune.data.chat import ChatEncoder
from finetune.errors import ModelError
from finetune.model import check_pair, load_model, resolve_source, set_pad_token


def test_pad_equal_to_eos_still_trains_eos(tiny_lm_plain: Path, tmp_path: Path) -> None:
    """Through the production data path (build_data + its collator), with pad == eos."""
    from transformers import AutoTokenizer

    from finetune.testing import write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_lm_plain)
    tok.pad_token = tok.eos_token  # the common setup that makes other tools mask the EOS out of the loss
    assert set_pad_token(tok) == "eos"
    rows = [{"prompt": "name: bob", "completion": "hello bob"},
            {"prompt": "name: carol", "completion": "hello carol, a longer answer"}]
    # padded batches: padding-free ones have no padding to mask (their EOS targets are checked in test_train_speed)
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), cache=False, use_chat_template="never",
                     padding_free=False)
    bundle = build_data(cfg, tok)
    short = next(e for e in bundle.train if len(e["input_ids"]) == min(len(x["input_ids"]) for x in bundle.train))
    long = next(e for e in bundle.train if e is not short)
    batch = bundle.collator([short, long])
    n = len(short["input_ids"])
    assert batch["labels"][0, n - 1] == tok.eos_token_id  # the example's own EOS is a target
    assert (batch["labels"][0, n:] == -100).all()  # padding (same id as EOS) is not
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()
    assert batch["attention_mask"][0].sum() == n


def test_distinct_pad_is_kept(tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert set_pad_token(tok) == "kept" and tok.pad_token_id != tok.eos_token_id


def test_chat_labels_cover_each_assistant_turn_and_its_eos(tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    messages = [{"role": "user", "content": "who is bob?"}, {"role": "assistant", "content": "a friend"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "the end"}]
    ex = ChatEncoder(tok, "assistant").exact(messages, "test")
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100])
    assert trained == "a friend<|im_end|>\nthe end<|im_end|>\n"
    assert ex["labels"].count(tok.eos_token_id) == 2


def test_tokenizer_bigger_than_embeddings_is_refused(tiny_lm: Path) -> None:
    model, tok, source = load_model(ModelConfig(name_or_path=str(tiny_lm)))
    model.resize_token_embeddings(len(tok) - 10)
    with pytest.raises(ModelError, match=r"has 400 tokens but the model .* has only 390 embedding rows"):
        check_pair(model, tok, source, "causal_lm")


def test_local_source_is_absolute_and_missing_folder_named(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_lm.parent)
    source = resolve_source(ModelConfig(name_or_path=f"./{tiny_lm.name}"))
    assert source.ref == str(tiny_lm.resolve()) and source.folder == source.ref
    with pytest.raises(ModelError, match="folder not found"):
        resolve_source(ModelConfig(name_or_path="./no-such-model"))


def test_hub_id_offline_without_cache_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="cannot get 'someone/absent-model'"):
        resolve_source(ModelConfig(name_or_path="someone/absent-model"))


def test_same_source_for_tokenizer_and_weights(tiny_lm: Path) -> None:
    model, tok, source = load_model(ModelConfig(name_or_path=str(tiny_lm)))
    assert Path(tok.name_or_path).resolve() == Path(source.folder)
    assert Path(model.config._name_or_path).resolve() == Path(source.folder)
    assert model.dtype == torch.float32


def test_pad_equal_to_eos_padding_free_batches_train_every_eos(tiny_lm_plain: Path, tmp_path: Path) -> None:
    """The default padding-free batches: no padding at all, and each example's own EOS is a target."""
    from transformers import AutoTokenizer

    from finetune.testing import write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_lm_plain)
    tok.pad_token = tok.eos_token
    set_pad_token(tok)
    rows = [{"prompt": "name: bob", "completion": "hello bob"},
            {"prompt": "name: carol", "completion": "hello carol, a longer answer"}]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), cache=False, use_chat_template="never")
    bundle = build_data(cfg, tok)
    batch = bundle.collator(list(bundle.train))
    assert batch["input_ids"].numel() == sum(len(e["input_ids"]) for e in bundle.train)  # nothing padded
    assert int((batch["labels"] == tok.eos_token_id).sum()) == 2  # one EOS target per example
