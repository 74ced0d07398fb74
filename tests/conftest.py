"""Shared fixtures: tiny checkpoints built in-process once per session, an offline environment, and the one way
tests write a tiny job (`write_job`) and train a tiny adapter through the real pipeline (`train_tiny`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM with a chatml tokenizer (eos = <|im_end|>, distinct pad)."""
    from finetune.testing import make_causal_lm

    return make_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_lm_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM whose tokenizer has no chat template."""
    from finetune.testing import make_causal_lm

    return make_causal_lm(tmp_path_factory.mktemp("tiny_lm_plain"), chat_template=False)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder for classification."""
    from finetune.testing import make_classifier_base

    return make_classifier_base(tmp_path_factory.mktemp("tiny_encoder"))


def _write_job(tmp_path: Path, model_dir: Path, train_file: Path, **sections: dict) -> Path:
    """A job YAML for a tiny run in `tmp_path`/job.yaml; `sections` are merged over the defaults below
    (`task` may be given as a plain string)."""
    import yaml

    job: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train_file), "max_seq_len": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 8, "micro_batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "warmup_ratio": 0},
        "output": {"dir": str(tmp_path / "adapters"), "run_name": "tiny"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            job.setdefault(name, {}).update(values)
        else:
            job[name] = values
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def write_job() -> Callable[..., Path]:
    """write_job(tmp_path, model_dir, train_file, **sections) -> the job YAML of a tiny run."""
    return _write_job


def _train_tiny(tmp: Path, model_dir: Path, rows: list[dict], name: str, task: str = "causal_lm", steps: int = 30,
                **sections: dict) -> Path:
    from finetune.config import load_config
    from finetune.pipeline import run_train
    from finetune.testing import write_jsonl

    work = tmp / name
    work.mkdir(parents=True, exist_ok=True)
    train = {"max_steps": steps, **sections.pop("train", {})}
    output = {"run_name": name, "dir": str(tmp / "adapters"), **sections.pop("output", {})}
    job = _write_job(work, model_dir, write_jsonl(work / "train.jsonl", rows), task=task, train=train, output=output, **sections)
    return run_train(load_config(job))


@pytest.fixture(scope="session")
def train_tiny() -> Callable[..., Path]:
    """train_tiny(tmp, model_dir, rows, name, task="causal_lm", steps=30, **sections) -> the verified adapter folder
    that the real `finetune train` pipeline saved under tmp/adapters/<name>."""
    return _train_tiny


@pytest.fixture(scope="session")
def json_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """A quickstart-shaped tiny adapter (chat rows sharing a system prompt, JSON answers, a validation file) with
    the eval.json `finetune eval` writes (greedy decoding), as scripts/quickstart.sh leaves one."""
    from finetune.evaluation.runner import EvalOptions, run_eval
    from finetune.testing import json_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("json_adapter")
    val = write_jsonl(tmp / "val.jsonl", json_rows(8))
    # 160 tokens: a whole row (system prompt, name, JSON answer, EOS) in the tiny byte-level tokenizer, so the adapter
    # learns to stop and eval's generation ends early instead of running to its token limit
    folder = _train_tiny(tmp, tiny_lm, json_rows(), "extract", steps=60, data={"validation": str(val), "max_seq_len": 160})
    run_eval(EvalOptions(adapter=str(folder)))
    return folder


class SlowNoEos:
    """Forward hook on an engine entry's LM head: counts decoding steps, slows them down and bans its stop ids, so
    only a cancel ends a long generation."""

    def __init__(self, engine: Any, delay: float = 0.01, entry: str | None = None):
        from finetune.serving.engine import BASE

        self.entry, self.delay, self.calls = engine.entries[entry or BASE], delay, 0

    def __enter__(self) -> SlowNoEos:
        head = self.entry.model.get_output_embeddings()
        self.handle = head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def _hook(self, module: Any, inputs: Any, output: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        output[..., self.entry.stop_ids] = float("-inf")
        return output


@pytest.fixture(scope="session")
def slow_no_eos() -> type[SlowNoEos]:
    """The SlowNoEos probe class: `with slow_no_eos(engine, delay) as probe: ...`."""
    return SlowNoEos
