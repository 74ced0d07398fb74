"""Preference data: the shapes TRL accepts, answer-only masks token by token, shared length handling, bad rows, the
config switch and its checks, and `finetune data preview` on pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.config import load_config
from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.errors import DataError, FinetuneError
from finetune.testing import preference_rows, write_jsonl

IGNORE = -100
SYSTEM = {"role": "system", "content": "be brief"}


@pytest.fixture(scope="module")
def tok(tiny_lm: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def _build(tmp_path: Path, tok: Any, rows: list[dict], **data: Any) -> Any:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return build_data(DataConfig(train=str(path), cache=False, **{"max_seq_len": 256, **data}), tok)


def _chat_ids(tok: Any, messages: list[dict], gen: bool = False) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False))


SHAPES = {
    "standard": {"prompt": "who?", "chosen": "me", "rejected": "you"},
    "conversational": {"prompt": [SYSTEM, {"role": "user", "content": "who?"}],
                       "chosen": [{"role": "assistant", "content": "me"}], "rejected": [{"role": "assistant", "content": "you"}]},
    "string prompt, message answers": {"prompt": "who?", "chosen": [{"role": "assistant", "content": "me"}],
                                       "rejected": [{"role": "assistant", "content": "you"}]},
    "implicit prompt": {"chosen": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "me"}],
                        "rejected": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "you"}]},
    "whole conversations with a prompt column (ultrafeedback)": {
        "prompt": "who?", "chosen": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "me"}],
        "rejected": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "you"}]},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_becomes_the_same_pair(tmp_path: Path, tok: Any, shape: str) -> None:
    bundle = _build(tmp_path, tok, [SHAPES[shape]], system_prompt="be brief")
    assert bundle.format == "preference" and bundle.chat
    pair = bundle.train[0]
    prompt = [SYSTEM, {"role": "user", "content": "who?"}]
    for side, answer in (("chosen", "me"), ("rejected", "you")):
        full = _chat_ids(tok, [*prompt, {"role": "assistant", "content": answer}])
        assert pair[f"{side}_input_ids"] == full, side


def test_prompt_tokens_carry_no_loss_token_by_token(tmp_path: Path, tok: Any, tiny_lm: Path) -> None:
    """Labels: -100 exactly on the prompt rendered with the generation prompt (what inference feeds the model), the
    token ids on the answer and its end of turn. Then the loss: its gradient reaches the logits only at positions
    that predict an answer token."""
    from transformers import AutoModelForCausalLM

    from finetune.training.preference import Orpo

    row = {"prompt": [SYSTEM, {"role": "user", "content": "name: alice"}, {"role": "assistant", "content": "hi"},
                      {"role": "user", "content": "again?"}],
           "chosen": [{"role": "assistant", "content": "hello alice"}], "rejected": [{"role": "assistant", "content": "no"}]}
    pair = _build(tmp_path, tok, [row]).train[0]
    prompt_len = len(_chat_ids(tok, row["prompt"], gen=True))
    for side in ("chosen", "rejected"):
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        assert prompt_len < len(ids)
        for pos, (token, label) in enumerate(zip(ids, labels, strict=True)):
            want = IGNORE if pos < prompt_len else token
            assert label == want, f"{side} position {pos} ({tok.decode([token])!r}): {label} != {want}"
    batch = _build(tmp_path, tok, [row]).collator([pair])
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64)
    captured: dict[str, torch.Tensor] = {}

    def keep(module: Any, args: Any, output: Any) -> None:
        output.logits.retain_grad()
        captured["logits"] = output.logits

    model.register_forward_hook(keep)
    loss, _ = Orpo(0.5).loss(model, batch, Orpo(0.5).counts(batch), 1)  # NLL and odds ratio: both sides used
    loss.backward()
    touched = captured["logits"].grad.abs().sum(-1) > 0
    predicts_answer = torch.zeros_like(touched)
    predicts_answer[:, :-1] = batch["labels"][:, 1:] != IGNORE
    assert torch.equal(touched, predicts_answer)


def test_plain_prompts_without_chat_template(tmp_path: Path, tiny_lm_plain: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_plain)
    pair = _build(tmp_path, tok, preference_rows(1)).train[0]
    prompt = tok("name: alice")["input_ids"]
    answer = tok("hello alice", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pair["chosen_input_ids"] == prompt + answer
    assert pair["chosen_labels"] == [IGNORE] * len(prompt) + answer


def test_length_handling_is_shared_by_both_sides(tmp_path: Path, tok: Any) -> None:
    long = {"prompt": "who?", "chosen": "me", "rejected": "you " * 40}
    rows = [long, preference_rows(1)[0]]
    dropped = _build(tmp_path, tok, rows, max_seq_len=24, overlong="drop")
    assert len(dropped.train) == 1 and dropped.stats["dropped_too_long"] == 1
    cut = _build(tmp_path, tok, rows, max_seq_len=24)
    assert cut.stats["truncated"] == 1 and len(cut.train) == 2
    assert all(len(ex[f"{s}_input_ids"]) <= 24 for ex in cut.train for s in ("chosen", "rejected"))
    # a prompt that fills max_seq_len leaves one side without an answer: the pair goes
    no_answer = _build(tmp_path, tok, [{"prompt": "who " * 30, "chosen": "me", "rejected": "you"}, rows[1]], max_seq_len=24)
    assert len(no_answer.train) == 1 and no_answer.stats["dropped_no_target"] == 1


BAD = [
    ({"prompt": "who?", "chosen": "me"}, "missing field 'rejected'"),
    ({"prompt": "who?", "chosen": "me", "rejected": "me"}, "identical"),
    ({"prompt": "who?", "chosen": "  ", "rejected": "you"}, "'chosen' is empty"),
    ({"chosen": "me", "rejected": "you"}, "missing field 'prompt'"),
    ({"prompt": "who?", "chosen": [{"role": "user", "content": "x"}], "rejected": "you"}, "one assistant answer"),
]


@pytest.mark.parametrize(("row", "message"), BAD)
def test_bad_rows_are_named_or_skipped_and_counted(tmp_path: Path, tok: Any, row: dict, message: str) -> None:
    rows = [*preference_rows(2), row]
    with pytest.raises(DataError, match=rf"pairs.jsonl:3: .*{message}"):
        _build(tmp_path, tok, rows, format="preference")
    skipped = _build(tmp_path, tok, rows, format="preference", on_bad_rows="skip")
    assert len(skipped.train) == 2 and skipped.stats["bad_rows"] == 1


def test_mixing_and_packing_are_refused(tmp_path: Path, tok: Any) -> None:
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(2))
    with pytest.raises(DataError, match="cannot be mixed"):
        build_data(DataConfig(train=[{"path": str(sft)}, {"path": str(pairs)}], cache=False), tok)  # type: ignore[list-item]
    with pytest.raises(DataError, match="packing"):
        build_data(DataConfig(train=str(pairs), packing=True, cache=False), tok)


def test_streaming_pairs_equal_eager_pairs(tmp_path: Path, tok: Any) -> None:
    eager = _build(tmp_path, tok, preference_rows(6, chat=True))
    stream = _build(tmp_path, tok, preference_rows(6, chat=True), streaming=True, shuffle_buffer=1)
    assert list(stream.train) == list(eager.train)


def test_objective_and_data_must_match(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    from finetune.pipeline import run_train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(4))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    with pytest.raises(FinetuneError, match="set train.objective to dpo, orpo or simpo"):
        run_train(load_config(write_job(tmp_path, tiny_lm, pairs)))
    with pytest.raises(FinetuneError, match="objective=orpo needs preference data"):
        run_train(load_config(write_job(tmp_path, tiny_lm, sft, train={"objective": "orpo"})))
    with pytest.raises(FinetuneError, match="dpo needs LoRA"):
        run_train(load_config(write_job(tmp_path, tiny_lm, pairs, train={"objective": "dpo"}, lora={"enabled": False})))


def test_config_switch_defaults_and_checks(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    from finetune.config import ConfigError

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(2))
    cfg = load_config(write_job(tmp_path, tiny_lm, pairs, train={"objective": "simpo"}))
    assert cfg.train.preference.resolved_beta("simpo") == 2.0 and cfg.train.preference.resolved_beta("dpo") == 0.1
    with pytest.raises(ConfigError) as err:
        load_config(write_job(tmp_path, tiny_lm, pairs, train={"objective": "dpoo", "preference": {"label_smoothing": 0.5}},
                              model={"adapter": str(tmp_path / "nowhere")}))
    text = str(err.value)
    assert "did you mean 'dpo'" in text and "train.preference.label_smoothing" in text and "model.adapter: file not found" in text


def test_data_preview_shows_both_sides(tiny_lm: Path, tmp_path: Path, write_job, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(2))
    job = write_job(tmp_path, tiny_lm, pairs, train={"objective": "dpo"}, data={"cache": False})
    assert main(["data", "preview", str(job), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "rejected" in out
    assert "«hello alice<|im_end|>\n»" in out and "«bye alice<|im_end|>\n»" in out
    assert "name: alice" in out.split("«hello alice")[0]  # the prompt is shown, untrained
    stats = out.split("── stats")[1]
    assert "format: preference" in stats and "examples: 2" in stats
