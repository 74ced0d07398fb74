"""Shared fixtures: tiny checkpoints built in-process once per session, and an offline environment."""

from __future__ import annotations

import os
from pathlib import Path

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


def write_job(tmp_path: Path, model_dir: Path, train_file: Path, **sections: dict) -> Path:
    """A job YAML for a tiny run; `sections` are merged over the defaults below."""
    import yaml

    job = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train_file), "max_seq_len": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 8, "micro_batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "warmup_ratio": 0},
        "output": {"dir": str(tmp_path / "adapters"), "run_name": "tiny"},
    }
    for name, values in sections.items():
        job.setdefault(name, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
