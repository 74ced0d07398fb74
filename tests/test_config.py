"""Strict config parsing: every problem at once, with its dotted path, line, and a "did you mean"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import ConfigError, dump_config, load_config, load_config_text

BASE = """\
model:
  name_or_path: some/model
data:
  train: {train}
"""


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n')
    return p


def problems(text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "job.yaml", overrides)
    return [p.format("job.yaml") for p in info.value.problems]


BAD_CONFIGS = [
    # (extra yaml, expected fragments of the single problem)
    ("lora:\n  rr: 8\n", ["job.yaml:6", "lora.rr", "unknown key", "did you mean 'lora.r'?"]),
    ("train:\n  learning_rat: 0.1\n", ["train.learning_rat", "did you mean 'train.learning_rate'?"]),
    ("trian:\n  seed: 1\n", ["trian", "did you mean 'train'?"]),
    ("train:\n  precision: bf61\n", ["train.precision", "'bf61'", "did you mean 'bf16'?"]),
    ("train:\n  learning_rate: fast\n", ["train.learning_rate", "'fast'", "valid number"]),
    ("lora:\n  r: 0\n", ["lora.r", "greater than or equal to 1"]),
    ("lora:\n  quantization: 3bit\n", ["lora.quantization", "'none', '4bit' or '8bit'"]),
    ("train:\n  micro_batch_size: -2\n", ["train.micro_batch_size", "-2"]),
    ("output:\n  run_name: 'bad name/x'\n", ["output.run_name", "pattern"]),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_CONFIGS, ids=[b[0].split(":")[0] + "-" + b[0].split()[1] for b in BAD_CONFIGS])
def test_bad_config_reports_path_value_and_hint(train_file: Path, extra: str, expected: list[str]) -> None:
    found = problems(BASE.format(train=train_file) + extra)
    assert len(found) == 1, found
    for fragment in expected:
        assert fragment in found[0], (fragment, found[0])


def test_three_mistakes_are_reported_together(tmp_path: Path) -> None:
    text = BASE.format(train=tmp_path / "missing.jsonl") + "lora:\n  rr: 8\ntrain:\n  epochs: zero\n"
    found = problems(text)
    assert len(found) == 3, found
    joined = "\n".join(found)
    assert "lora.rr" in joined and "train.epochs" in joined
    assert f"file not found: {tmp_path / 'missing.jsonl'}" in joined


def test_missing_sections_are_named() -> None:
    found = problems("lora:\n  r: 4\n")
    assert any(p.startswith("job.yaml: model:") or "model: required" in p for p in found), found
    assert any("data: required field is missing" in p for p in found), found


def test_overrides_apply_and_are_validated(train_file: Path) -> None:
    cfg = load_config_text(BASE.format(train=train_file), "job.yaml", ["lora.r=8", "train.max_steps=3"])
    assert cfg.lora.r == 8 and cfg.train.max_steps == 3
    found = problems(BASE.format(train=train_file), ("lora.rank=8",))
    assert "lora.rank" in found[0] and "did you mean 'lora.r'" in found[0]


def test_yaml_syntax_error_names_the_line() -> None:
    found = problems("model:\n  name_or_path: [unclosed\n")
    assert "job.yaml:" in found[0] and "not valid YAML" in found[0]


def test_show_round_trips_with_defaults_and_comments(train_file: Path) -> None:
    cfg = load_config_text(BASE.format(train=train_file))
    text = dump_config(cfg)
    assert "# Rank of the update BA" in text and "  r: 16" in text
    assert load_config_text(text) == cfg


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_typo_fails_fast_without_torch(tmp_path: Path, train_file: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(BASE.format(train=train_file) + "lora:\n  rr: 8\n")
    # "Fast" is asserted by what is imported, not by a clock (timed assertions flake on a loaded machine): the heavy
    # packages are what makes a command slow to start (torch alone takes seconds).
    heavy = ("torch", "transformers", "peft", "accelerate", "datasets", "gradio", "numpy")
    probe = ("import sys, finetune.cli as c; rc = c.main(['config', 'validate', sys.argv[1]]); "
             f"loaded = [m for m in {heavy!r} if m in sys.modules]; assert not loaded, loaded; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, str(job)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "lora.rr" in out.stderr and "did you mean 'lora.r'?" in out.stderr


def test_cli_show_and_schema(tmp_path: Path, train_file: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(BASE.format(train=train_file))
    shown = run_cli("config", "show", str(job), "lora.r=4")
    assert shown.returncode == 0, shown.stderr
    assert load_config_text(shown.stdout).lora.r == 4
    schema = run_cli("config", "schema")
    assert schema.returncode == 0 and '"lora"' in schema.stdout


def test_cli_missing_config_file(tmp_path: Path) -> None:
    out = run_cli("config", "validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "config file not found" in out.stderr


def test_load_config_from_file(train_file: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(BASE.format(train=train_file))
    assert load_config(job).model.name_or_path == "some/model"


def test_overrides_may_follow_options() -> None:
    from finetune.cli import parse_args

    args = parse_args(["train", "job.yaml", "lora.r=4", "--profile", "2", "train.max_steps=3"])
    assert args.overrides == ["lora.r=4", "train.max_steps=3"] and args.profile == 2
    with pytest.raises(SystemExit):
        parse_args(["train", "job.yaml", "--no-such-flag"])


def test_retired_keys_are_named_in_a_job_and_dropped_from_a_saved_one(tmp_path: Path) -> None:
    """Adapters saved before train.num_workers was removed still load (eval, merge, demo read their finetune.yaml);
    a job that still sets it is told the key was removed, on its line."""
    text = "model:\n  name_or_path: m\ndata:\n  train: t.jsonl\ntrain:\n  num_workers: 0\n  max_steps: 3\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "job.yaml", check_files=False)
    assert [p.format("job.yaml") for p in info.value.problems] == [
        "job.yaml:6: train.num_workers: this key was removed in finetune 0.1 (examples are collated in the training "
        "process); delete the line"]
    saved = load_config_text(text, "finetune.yaml", check_files=False, saved=True)
    assert saved.train.max_steps == 3 and "num_workers" not in saved.train.model_dump()


def test_an_adapter_saved_with_a_retired_key_still_evaluates(tiny_lm: Path, tmp_path: Path, train_tiny) -> None:
    from finetune.cli import main
    from finetune.testing import qa_rows, write_jsonl

    folder = train_tiny(tmp_path, tiny_lm, qa_rows(8), "old", steps=2)
    job = folder / "finetune.yaml"
    job.write_text(job.read_text().replace("train:\n", "train:\n  num_workers: 0\n", 1))
    assert "num_workers: 0" in job.read_text()  # as finetune wrote it before the key was removed
    data = write_jsonl(tmp_path / "val.jsonl", qa_rows(4))
    assert main(["eval", str(folder), "--data", str(data), "--out", str(tmp_path / "out")]) == 0
