"""`finetune eval`: base vs adapter on identical prompts, outputs checked against independent references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.errors import DataError, ModelError
from finetune.evaluation import EvalOptions, run_eval
from finetune.testing import qa_rows, write_jsonl


@pytest.fixture(scope="module")
def trained(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, write_job) -> Path:
    """The tiny job's adapter: prompt/completion data through the chat template, with a validation file."""
    tmp = tmp_path_factory.mktemp("eval_job")
    train = write_jsonl(tmp / "train.jsonl", qa_rows(32))
    val = write_jsonl(tmp / "val.jsonl", qa_rows(8))
    job = write_job(tmp, tiny_lm, train, data={"validation": str(val)}, train={"max_steps": 12})
    assert main(["train", str(job)]) == 0
    return tmp / "adapters" / "tiny"


@pytest.fixture(scope="module")
def cli_report(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("eval_out")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", str(trained), "--out", str(out)]) == 0
    return json.loads((out / "eval.json").read_text()), buf.getvalue(), out


def test_cli_prints_table_and_writes_the_three_files(cli_report):
    report, printed, out = cli_report
    for name in ("exact_match", "token_f1", "rouge_l", "chrf", "loss", "perplexity"):
        assert any(line.split()[0] == name for line in printed.splitlines() if line.strip()), name
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "eval.md").read_text()
    assert "| loss (lower is better) |" in md and "## Examples where base and adapter differ" in md
    assert report["data"]["evaluated"] == 8 and report["data"]["split"] == "validation"
    assert len(report["data"]["fingerprint"]) == 16 and len(report["data"]["content_sha256"]) == 64
    assert report["decoding"]["strategy"] == "greedy" and report["decoding"]["padding_side"] == "left"
    assert report["decoding"]["chat_template"] is True and report["decoding"]["stop_token_ids"]


def test_metrics_and_deltas_agree_with_the_outputs_and_training(cli_report, trained: Path):
    report, _, _ = cli_report
    metrics, examples = report["metrics"], report["examples"]
    for side in ("base", "adapter"):
        hits = sum(e[side].strip() == e["reference"] for e in examples)
        assert metrics["exact_match"][side] == pytest.approx(hits / len(examples))
    for m in metrics.values():
        assert m["delta"] == pytest.approx(m["adapter"] - m["base"])
    # The adapter's eval loss is training's validation loss: same encoder, same target tokens, same weights.
    run = json.loads((trained / "run.json").read_text())
    assert metrics["loss"]["adapter"] == pytest.approx(run["metrics"]["eval_loss"], rel=1e-5)
    assert metrics["loss"]["adapter"] < metrics["loss"]["base"]  # it learned the task


def test_base_and_adapter_get_identical_prompts_and_match_independent_models(trained: Path, tmp_path, monkeypatch):
    """Every generate call for the base has its twin for the adapter with the same input tensors; the base side
    equals a plain transformers model and the adapter side a freshly loaded PeftModel."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.evaluation import generate as gen

    calls: list[torch.Tensor] = []
    real = gen.generate_batch

    def spy(model, tok, prompts, decoding):
        calls.append(gen.left_pad(prompts, tok.pad_token_id)[0])
        return real(model, tok, prompts, decoding)

    monkeypatch.setattr(gen, "generate_batch", spy)
    result = run_eval(EvalOptions(str(trained), out=str(tmp_path), batch_size=3))
    half = len(calls) // 2
    assert half == 3 and all(torch.equal(a, b) for a, b in zip(calls[:half], calls[half:], strict=True))
    monkeypatch.setattr(gen, "generate_batch", real)

    tok = AutoTokenizer.from_pretrained(trained)
    base_path = json.loads((trained / "adapter_config.json").read_text())["base_model_name_or_path"]
    decoding = gen.Decoding(**result.report["decoding"])
    prompts = [gen.encode_prompts(tok, [e["prompt"]], True)[0] for e in result.report["examples"]]
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    assert gen.decode(tok, gen.generate(base, tok, prompts, decoding)) == [e["base"] for e in result.report["examples"]]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(trained)).eval()
    assert gen.decode(tok, gen.generate(adapted, tok, prompts, decoding)) == [e["adapter"] for e in result.report["examples"]]


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_lm: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.prompting import stop_token_ids
    from finetune.evaluation.generate import Decoding, encode_prompts, generate

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    prompts = encode_prompts(tok, ["name: alice", "who is the quick brown fox jumping over the dog?", "hi"], chat=True)
    assert len({len(p) for p in prompts}) == 3  # really different lengths, so padding matters
    decoding = Decoding(12, 8, True, stop_token_ids(tok, model.generation_config))
    batched = generate(model, tok, prompts, decoding)
    assert batched == [generate(model, tok, [p], decoding)[0] for p in prompts]
    assert batched == generate(model, tok, prompts, decoding)  # deterministic


def test_json_metric_and_general_loss(trained: Path, tmp_path):
    """JSON references add json_exact_match; --general reports the loss on other data for both sides, and the base
    side equals the loss of the plain base model computed by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "json.jsonl", [{"prompt": f"name: {n}", "completion": json.dumps({"name": n})}
                                                 for n in ("alice", "bob", "carol")])
    text = "the quick brown fox jumps over the lazy dog."
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": text}])
    report = run_eval(EvalOptions(str(trained), data=str(data), general=str(general), out=str(tmp_path))).report
    assert {"json_exact_match", "json_valid", "general_loss", "general_perplexity"} <= set(report["metrics"])
    assert report["data"]["split"] is None and report["general"]["rows"] == 1

    tok = AutoTokenizer.from_pretrained(trained)
    ids = tok(text, return_tensors="pt")["input_ids"]
    import torch

    ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], dim=1)  # text rows end with EOS, as in training
    base = AutoModelForCausalLM.from_pretrained(report["base_model"]).eval()
    with torch.no_grad():
        want = float(base(input_ids=ids, labels=ids).loss)
    assert report["metrics"]["general_loss"]["base"] == pytest.approx(want, rel=1e-5)


def test_a_base_that_does_not_fit_is_refused_before_loading(trained: Path, tiny_encoder: Path, tmp_path, monkeypatch):
    from finetune.lifecycle import folder
    from finetune.testing import make_causal_lm

    def never(*a, **k):
        raise AssertionError("weights were loaded before the fit check")

    monkeypatch.setattr(folder, "load_base_model", never)
    wider = make_causal_lm(tmp_path / "wider", hidden=48)
    with pytest.raises(ModelError, match=r"does not fit.*\n.*mlp.down_proj: the adapter expects input size 64, the base module has 96"):
        run_eval(EvalOptions(str(trained), base=str(wider), out=str(tmp_path)))
    with pytest.raises(ModelError, match=r"model_type: the adapter was trained on 'llama', the given base is 'bert'"):
        run_eval(EvalOptions(str(trained), base=str(tiny_encoder), out=str(tmp_path)))
    assert not (tmp_path / "eval.json").exists()


def test_data_without_the_needed_fields_is_a_clear_error(trained: Path, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "name: alice", "completion": "hello alice"}\n{"prompt": "name: bob"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'completion'"):
        run_eval(EvalOptions(str(trained), data=str(bad), out=str(tmp_path)))
    bad.write_text('{"question": "x", "answer": "y"}\n')
    assert main(["eval", str(trained), "--data", str(bad), "--out", str(tmp_path)]) == 1
    assert "cannot tell the data format from the columns ['answer', 'question']" in capsys.readouterr().err


def test_chat_rows_use_the_last_assistant_message_as_reference(tmp_path):
    from finetune.config.data import DataConfig
    from finetune.data.prompting import prompt_of
    from finetune.evaluation.examples import load_eval_set
    from finetune.testing import chat_rows

    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(3))
    eval_set = load_eval_set(str(path), DataConfig(train=str(path)), None, max_samples=2)
    assert eval_set.format == "chat" and len(eval_set.examples) == 2 and eval_set.rows_total == 3
    ex = eval_set.examples[0]
    assert ex.reference == "the end"
    assert [m["content"] for m in prompt_of(ex.record, True)] == ["be brief", "who is alice?", "alice is a friend", "and then?"]


@pytest.fixture(scope="module")
def cls_adapter(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SEQ_CLS adapter built directly with peft (no training): random LoRA B and head, saved like `finetune train`."""
    import torch
    import yaml
    from transformers import AutoTokenizer

    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.model import load_base_model, resolve_source
    from finetune.model.lora import wrap_lora

    folder = tmp_path_factory.mktemp("cls") / "adapter"
    torch.manual_seed(1)
    cfg = ModelConfig(name_or_path=str(tiny_encoder))
    model = wrap_lora(load_base_model(resolve_source(cfg), cfg, "classification", "none", ["neg", "pos", "other"]),
                      LoraConfig(r=4, alpha=8, dropout=0.0), "classification")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(folder)
    data = write_jsonl(folder.parent / "train.jsonl", [{"text": "hello", "label": "neg"}])
    job = {"task": "classification", "model": {"name_or_path": str(tiny_encoder)}, "data": {"train": str(data)}}
    (folder / "finetune.yaml").write_text(yaml.safe_dump(job))
    (folder / "run.json").write_text(json.dumps({"labels": ["neg", "pos", "other"], "data": {"chat_template": False}}))
    return folder


def test_classification_adapter_accuracy_f1_and_confusion(cls_adapter: Path, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["the quick brown fox", "hello world", "what is the capital of France?", "Alice is 31 years old",
             "the lazy dog", "answer question"]
    labels = ["neg", "pos", "other", 1, "neg", 2]  # names or indices
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": lab} for t, lab in zip(texts, labels, strict=True)])
    report = run_eval(EvalOptions(str(cls_adapter), data=str(data), out=str(tmp_path))).report
    refs = [e["reference"] for e in report["examples"]]
    assert refs == ["neg", "pos", "other", "pos", "neg", "other"]

    tok = AutoTokenizer.from_pretrained(cls_adapter)
    base = AutoModelForSequenceClassification.from_pretrained(report["base_model"], num_labels=3)
    model = PeftModel.from_pretrained(base, str(cls_adapter)).eval()
    with torch.no_grad():
        logits = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts])
    want = [["neg", "pos", "other"][i] for i in logits.argmax(-1).tolist()]
    assert len(set(want)) > 1  # the comparison means something only if predictions vary
    assert [e["adapter"] for e in report["examples"]] == want
    gold = torch.tensor([0, 1, 2, 1, 0, 2])
    assert report["metrics"]["loss"]["adapter"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, gold)), rel=1e-5)

    for side in ("base", "adapter"):
        preds = [e[side] for e in report["examples"]]
        assert report["metrics"]["accuracy"][side] == pytest.approx(sum(p == r for p, r in zip(preds, refs, strict=True)) / 6)
        matrix = report["metrics"]["confusion_matrix"][side]
        names = ["neg", "pos", "other"]
        assert matrix == [[sum(r == a and p == b for p, r in zip(preds, refs, strict=True)) for b in names] for a in names]
    assert "## Confusion matrices" in (tmp_path / "eval.md").read_text()


def test_eval_from_the_job_yaml_and_split_train(trained: Path, tmp_path):
    """`finetune eval JOB.yaml --split train --max-samples 3` finds the adapter the job saved and its train file."""
    report = run_eval(EvalOptions(str(trained.parent.parent / "job.yaml"), split="train", max_samples=3,
                                  out=str(tmp_path))).report
    assert report["adapter"] == str(trained.resolve())
    assert report["data"]["split"] == "train" and report["data"]["evaluated"] == 3 and report["data"]["rows_total"] == 32


def test_chat_and_text_data_end_to_end(trained: Path, tmp_path):
    """Chat rows are prompted with the conversation before the last assistant turn; text rows get loss only."""
    from finetune.testing import chat_rows

    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(2))
    report = run_eval(EvalOptions(str(trained), data=str(chat), out=str(tmp_path / "chat"))).report
    assert report["data"]["format"] == "chat" and report["decoding"]["chat_template"] is True
    assert [len(e["prompt"]) for e in report["examples"]] == [4, 4]
    assert {e["reference"] for e in report["examples"]} == {"the end"}
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}, {"text": "the lazy dog"}])
    report = run_eval(EvalOptions(str(trained), data=str(text), out=str(tmp_path / "text"))).report
    assert set(report["metrics"]) == {"loss", "perplexity"} and report["examples"] == []
    assert (tmp_path / "text" / "eval.png").is_file()


def test_plain_prompts_stay_plain_text():
    from finetune.data.prompting import prompt_of

    record = {"kind": "pair", "prompt": "name: bob", "completion": "hello bob", "system": "be brief"}
    assert prompt_of(record, chat=False) == "name: bob"  # training's plain encoding has no system prompt either
    assert prompt_of(record, chat=True) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name: bob"}]
