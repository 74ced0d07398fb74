"""`finetune eval --harness`: lm-evaluation-harness on base and adapter through our CLI, with local tasks
(generate_until, multiple_choice, loglikelihood_rolling), checked against direct lm-eval API calls."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.evaluation import EvalOptions, run_eval
from finetune.evaluation.harness import HarnessOptions
from finetune.testing import class_rows, qa_rows, write_jsonl

pytest.importorskip("lm_eval")

SYSTEM = "answer with a greeting"
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
LIMIT = 6
DIRECT = {"batch_size": 8, "bootstrap_iters": 1000, "log_samples": False}


def _tasks(folder: Path) -> list[Path]:
    """Three local tasks over one JSONL file, referenced relative to the YAML files (finetune resolves them)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data" / "names.jsonl", [{"name": n, "greeting": f"hello {n}"} for n in NAMES])
    data = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "data/names.jsonl"}}, "test_split": "test",
            "doc_to_text": "name: {{name}}"}
    tasks = {
        "tiny_gen": {"output_type": "generate_until", "doc_to_target": "{{greeting}}", "target_delimiter": "",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                     "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
        "tiny_choice": {"output_type": "multiple_choice", "doc_to_choice": "{{['bye ' + name, 'hello ' + name]}}",
                        "doc_to_target": 1, "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "{{greeting}}", "doc_to_target": "{{greeting}}",
                     "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
    }
    paths = []
    for name, cfg in tasks.items():
        paths.append(folder / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump({"task": name, **data, **cfg}, sort_keys=False))
    return paths


@pytest.fixture(scope="module")
def setup(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, train_tiny) -> dict:
    tmp = tmp_path_factory.mktemp("harness")
    adapter = train_tiny(tmp, tiny_lm, qa_rows(32), "chat", steps=30, data={"system_prompt": SYSTEM})
    return {"adapter": adapter, "tasks": _tasks(tmp / "tasks"), "tmp": tmp}


@pytest.fixture(scope="module")
def cli(setup: dict) -> dict:
    """`finetune eval ADAPTER --harness a.yaml,b.yaml,c.yaml --limit 6` on a copy of the adapter (the job has no
    validation file, so only the harness runs), from another working directory."""
    folder = setup["tmp"] / "copy" / "chat"
    shutil.copytree(setup["adapter"], folder)
    buf, cwd = io.StringIO(), os.getcwd()
    os.chdir(setup["tmp"].parent)
    try:
        with contextlib.redirect_stdout(buf):
            assert main(["eval", str(folder), "--harness", ",".join(map(str, setup["tasks"])), "--limit", str(LIMIT)]) == 0
    finally:
        os.chdir(cwd)
    return {"report": json.loads((folder / "eval.json").read_text()), "printed": buf.getvalue(), "folder": folder,
            "tasks": setup["tasks"]}


def test_both_sides_ran_with_identical_recorded_settings(cli: dict) -> None:
    h = cli["report"]["harness"]
    base, adapter = h["configuration"]["base"], h["configuration"]["adapter"]
    assert base == adapter  # model load, dtype, batch size, seeds, limit, prompt settings, task configs: all equal
    assert (base["batch_size"], base["limit"], base["model_dtype"]) == (8, LIMIT, "torch.float32")
    assert base["n_samples"]["tiny_gen"] == {"original": 8, "effective": LIMIT}
    assert "adapter disabled" in h["how_base"]
    # Chat-trained adapter: the chat template with the recorded system prompt, few-shot as multi-turn.
    assert (base["apply_chat_template"], base["system_instruction"], base["fewshot_as_multiturn"]) == (True, SYSTEM, True)
    assert base["chat_template_sha256"]
    assert set(h["results"]) == {"tiny_gen", "tiny_choice", "tiny_ppl"}
    assert h["tasks"]["tiny_gen"] == str(cli["tasks"][0].resolve())  # where each task came from
    assert set(h["results"]["tiny_ppl"]) == {"word_perplexity", "bits_per_byte"}
    ppl = h["results"]["tiny_ppl"]["word_perplexity"]
    # A continuous score: the two sides really are different models (the adapter moved it; its sign is no concern).
    assert ppl["better"] == "lower" and ppl["adapter"] != ppl["base"]
    for metrics in h["results"].values():
        for m in metrics.values():
            assert m["delta"] == pytest.approx(m["adapter"] - m["base"])
    assert cli["report"]["data"] is None and cli["report"]["metrics"] == {}  # no task data: harness only
    assert "tiny_choice acc" in cli["printed"] and "chat template on" in cli["printed"]


def test_results_equal_direct_lm_eval_calls_with_the_same_settings(cli: dict, setup: dict, monkeypatch) -> None:
    """lm-eval on its own: `peft=` for the adapter side, the plain base for the base side. Same numbers."""
    from lm_eval import simple_evaluate

    monkeypatch.chdir(setup["tasks"][0].parent)  # lm-eval resolves the tasks' relative data_files against the cwd
    adapter = setup["adapter"]
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    prompt = {"apply_chat_template": True, "system_instruction": SYSTEM, "fewshot_as_multiturn": True}
    results = cli["report"]["harness"]["results"]
    for side, args in (("adapter", {"peft": str(adapter)}), ("base", {})):
        out = simple_evaluate(model="hf", model_args={"pretrained": base, "tokenizer": str(adapter), "device": "cpu", **args},
                              tasks=[str(p) for p in setup["tasks"]], limit=LIMIT, **prompt, **DIRECT)
        for task, metrics in results.items():
            for metric, m in metrics.items():
                assert out["results"][task][f"{metric},none"] == pytest.approx(m[side], rel=1e-9, abs=1e-12), (side, task, metric)


def test_outputs_and_card_carry_the_harness_results(cli: dict) -> None:
    folder, report = cli["folder"], cli["report"]
    md = (folder / "eval.md").read_text()
    assert "## lm-evaluation-harness" in md and "| tiny_ppl | word_perplexity (lower is better) |" in md
    assert (folder / "eval.png").read_bytes()[:4] == b"\x89PNG"
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    results = meta["model-index"][0]["results"]
    assert {r["dataset"]["type"] for r in results} == {"local:tiny_gen", "local:tiny_choice", "local:tiny_ppl"}
    indexed = {m["name"]: m["value"] for r in results for m in r["metrics"]}
    for task, metrics in report["harness"]["results"].items():
        for metric, m in metrics.items():
            assert indexed[f"{task} {metric}"] == m["adapter"]
    assert "lm-evaluation-harness, same settings on both sides (chat template on with the recorded system prompt" in card


def test_plain_text_adapter_runs_without_chat_template(tiny_lm_plain: Path, tmp_path: Path, train_tiny, setup: dict) -> None:
    adapter = train_tiny(tmp_path, tiny_lm_plain, qa_rows(8), "plain", steps=2, data={"system_prompt": SYSTEM})
    report = run_eval(EvalOptions(str(adapter), out=str(tmp_path / "out"),
                                  harness=HarnessOptions([str(setup["tasks"][1])], limit=2))).report
    config = report["harness"]["configuration"]["adapter"]
    assert (config["apply_chat_template"], config["system_instruction"], config["fewshot_as_multiturn"]) == (False, None, False)
    assert config["chat_template_sha256"] is None and "chat template off" in (tmp_path / "out" / "eval.md").read_text()


def test_bad_tasks_are_refused_before_any_model_loads(setup: dict, tmp_path: Path, monkeypatch, tiny_encoder: Path,
                                                      train_tiny) -> None:
    from finetune.evaluation import runner

    def never(*a, **k):
        raise AssertionError("a model was loaded before the tasks were checked")

    monkeypatch.setattr(runner, "load_adapter", never)
    opts = lambda tasks: EvalOptions(str(setup["adapter"]), out=str(tmp_path), harness=HarnessOptions(tasks))  # noqa: E731
    with pytest.raises(FinetuneError, match=r"task file not found: .*missing\.yaml"):
        run_eval(opts([str(tmp_path / "missing.yaml")]))
    hub_task = tmp_path / "hub.yaml"
    hub_task.write_text(yaml.safe_dump({"task": "needs_hub", "dataset_path": "org/not-cached-anywhere", "test_split": "test",
                                        "output_type": "multiple_choice", "doc_to_text": "x", "doc_to_choice": ["a"], "doc_to_target": 0}))
    with pytest.raises(FinetuneError, match=r"could not load the task(.|\n)*neither in the local Hugging Face cache nor reachable"):
        run_eval(opts([str(hub_task)]))
    group = tmp_path / "group.yaml"
    group.write_text(yaml.safe_dump({"group": "g", "task": ["tiny_gen"]}))
    with pytest.raises(FinetuneError, match="not a single harness task"):
        run_eval(opts([str(group)]))
    classifier = train_tiny(tmp_path, tiny_encoder, class_rows(8), "cls", task="classification", steps=1)
    with pytest.raises(FinetuneError, match="--harness runs language-model tasks"):
        run_eval(EvalOptions(str(classifier), harness=HarnessOptions([str(setup["tasks"][0])])))


def test_cli_flags(setup: dict, capsys) -> None:
    assert main(["eval", str(setup["adapter"]), "--limit", "3"]) != 0
    assert "--limit and --num-fewshot apply to --harness tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(setup["adapter"]), "--harness", "x.yaml", "--limit", "1.5"])
