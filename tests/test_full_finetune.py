"""Full fine-tuning outputs (lora.enabled: false) are first-class: read and loaded like adapters, evaluated against
their base, described truthfully in the training log and the model card; adapter-only commands refuse them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.evaluation import EvalOptions, run_eval
from finetune.lifecycle.folder import load_adapter, read_adapter
from finetune.testing import class_rows, qa_rows, write_jsonl

LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def classifier(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    tmp = tmp_path_factory.mktemp("full_cls")
    return train_tiny(tmp, tiny_encoder, class_rows(32), "full", task="classification", steps=20,
                      lora={"enabled": False}, train={"learning_rate": 1e-3})


def test_training_log_and_folder_say_full_fine_tuning(tiny_lm: Path, tmp_path: Path, train_tiny, capsys) -> None:
    folder = train_tiny(tmp_path, tiny_lm, qa_rows(8), "fullgen", steps=2, lora={"enabled": False})
    out = capsys.readouterr().out
    assert "full fine-tuning (no LoRA): trainable" in out and "LoRA r=" not in out
    assert f"fully fine-tuned model saved and verified: {folder.resolve()}" in out and "adapter saved" not in out
    info = read_adapter(folder)
    assert info.full and info.kind == "fully fine-tuned model" and info.base == str(tiny_lm.resolve())
    meta = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert meta["library_name"] == "transformers" and "full-fine-tuning" in meta["tags"] and "lora" not in meta["tags"]
    body = (folder / "README.md").read_text()
    assert "A fully fine-tuned copy of" in body and "LoRA rank" not in body and "vllm serve " in body


def test_eval_compares_a_full_model_with_its_base(classifier: Path, tiny_encoder: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_jsonl(tmp_path / "val.jsonl", class_rows(8))
    report = run_eval(EvalOptions(str(classifier), data=str(data), out=str(tmp_path / "out"))).report
    assert report["kind"] == "fully fine-tuned model"
    tok = AutoTokenizer.from_pretrained(classifier)
    texts = [e["prompt"] for e in report["examples"]]
    batch = tok(texts, return_tensors="pt", padding=True)
    torch.manual_seed(0)  # the base's new head, initialised as eval initialises it
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2, id2label=dict(enumerate(LABELS)),
                                                              label2id={n: i for i, n in enumerate(LABELS)}).eval()
    base.config.pad_token_id = tok.pad_token_id
    tuned = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        for side, model in (("base", base), ("adapter", tuned)):
            want = [LABELS[i] for i in model(**batch).logits.argmax(-1).tolist()]
            assert [e[side] for e in report["examples"]] == want, side
    m = report["metrics"]
    assert m["accuracy"]["adapter"] == 1.0 and m["macro_recall"]["adapter"] == 1.0
    assert m["per_class_recall"]["adapter"] == [1.0, 1.0] and len(m["per_class_precision"]["base"]) == 2
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "## Per class" in md and "- fully fine-tuned model:" in md


def test_load_adapter_gives_the_whole_model(classifier: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    model, tok, info = load_adapter(classifier)
    assert info.full and not hasattr(model, "disable_adapter")
    ids = tok(["great movie"], return_tensors="pt")
    with torch.no_grad():
        want = AutoModelForSequenceClassification.from_pretrained(classifier).eval()(**ids).logits
        assert torch.equal(model(**ids).logits, want)


def test_adapter_only_commands_refuse_it_clearly(classifier: Path, tmp_path: Path, capsys) -> None:
    from finetune.lifecycle.gguf_export import export_lora_gguf

    assert main(["check", str(classifier), "--target", "vllm"]) != 0
    assert "fully fine-tuned model (lora.enabled: false), not a LoRA adapter" in capsys.readouterr().err
    assert main(["merge", str(classifier), "--out", str(tmp_path / "m")]) != 0
    assert "no adapter to merge" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="not a LoRA adapter"):
        export_lora_gguf(classifier)
    assert json.loads((classifier / "run.json").read_text())["base_model"] == read_adapter(classifier).base


def test_engine_serves_a_full_model_next_to_its_base(tiny_lm: Path, tmp_path: Path, train_tiny) -> None:
    """The demo and `finetune serve` accept a fully fine-tuned folder: greedy output equals plain transformers on
    that model, and Compare pairs it with the base model it started from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.prompting import prompt_ids, stop_token_ids
    from finetune.serving.engine import BASE, GenerationParams, load_engine
    from finetune.testing import farewell_rows, last

    folder = train_tiny(tmp_path, tiny_lm, farewell_rows(), "fullgen", steps=30, lora={"enabled": False},
                        train={"learning_rate": 1e-3})
    engine = load_engine([folder])
    try:
        assert engine.names() == [BASE, "fullgen"] and engine.card("fullgen").full
        greedy = GenerationParams(max_new_tokens=8, temperature=0)
        got = last(engine.generate("fullgen", "name: bob", greedy))
        tok = AutoTokenizer.from_pretrained(folder)
        ids = prompt_ids(tok, "name: bob", chat=read_adapter(folder).chat)  # rendered as training rendered it
        for name, path in (("fullgen", folder), (BASE, tiny_lm)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=stop_token_ids(tok, model.generation_config))
            want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
            assert last(engine.generate(name, "name: bob", greedy)) == want, name
        assert got.startswith("bye")  # it learned the task: a fine-tuned model, not its base
        assert last(engine.compare("fullgen", "name: bob", greedy)) == (last(engine.generate(BASE, "name: bob", greedy)),
                                                                        got)
    finally:
        engine.close()
