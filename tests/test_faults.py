"""Faults: a process SIGKILLed at chosen points of save, merge, checkpoint and GGUF import, or a write that fails
(disk full), must leave the previous state intact, and the next command must work (finishing or cleaning up what
the dead process left). Also: an unexpected exception is reported as a bug, with its traceback in a file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.testing import qa_rows, write_tiny_gguf

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

# Runs `finetune ARGS...` with one function wrapped: FAULT=module:function:before|after:N kills the process (SIGKILL,
# nothing runs after it) at the N-th call, before or after the real function. FAULT=rename-aside makes the
# replace-in-place fall back to two renames (as on a file system without RENAME_EXCHANGE) and dies between them.
DRIVER = r'''
import importlib, os, signal, sys
fault = os.environ["FAULT"]
if fault == "rename-aside":
    import finetune.files as files
    files._exchange = lambda a, b: False
    real_rename = os.rename
    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        if ".old-" in os.fspath(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
else:
    target, name, when, nth = fault.split(":")
    module = importlib.import_module(target)
    real = getattr(module, name)
    calls = [0]
    def wrapped(*a, **k):
        calls[0] += 1
        hit = calls[0] == int(nth)
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **k)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(module, name, wrapped)
from finetune.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, train_tiny) -> Path:  # type: ignore[no-untyped-def]
    """A finished run: <run>/adapters/tiny, checkpoints at steps 2 and 4, the job at <run>/tiny/job.yaml."""
    root = tmp_path_factory.mktemp("fault_run")
    train_tiny(root, tiny_lm, qa_rows(16), "tiny", steps=4, train={"checkpoint_every": 2, "keep_last": 2})
    return root


@pytest.fixture
def here(run: Path, tmp_path: Path) -> Path:
    """A private copy of the run's adapters folder (adapter + work folder) in tmp_path/adapters."""
    shutil.copytree(run / "adapters", tmp_path / "adapters")
    return tmp_path / "adapters"


def killed(fault: str, *args: str) -> subprocess.CompletedProcess[str]:
    driver = Path(os.environ.get("TMPDIR", "/tmp")) / f"finetune-fault-driver-{os.getpid()}.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(driver), *args], env={**ENV, "FAULT": fault}, capture_output=True,
                          text=True, timeout=300)
    driver.unlink(missing_ok=True)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return proc


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".work")


def main(*args: str) -> int:
    from finetune.cli import main as cli

    return cli(list(args))


def test_kill_during_adapter_save_keeps_the_previous_adapter(run: Path, here: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    job = str(run / "tiny" / "job.yaml")
    old = digest(here / "tiny")
    killed("finetune.lifecycle.save:_copy_logs:before:1", "train", job, f"output.dir={here}", "output.overwrite=true",
           "train.max_steps=2")
    assert digest(here / "tiny") == old  # the new adapter was written and verified, never moved into place
    assert [n.split("-")[0] for n in hidden(here)] == [".tiny.tmp"]
    assert main("adapters", "list", "--dir", str(here)) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["tiny"]  # the dead process's temporary folder is not listed
    assert main("train", job, f"output.dir={here}", "output.overwrite=true", "train.max_steps=2") == 0
    assert hidden(here) == [] and digest(here / "tiny") != old  # the next save replaced it and removed the leftover


def test_kill_between_the_two_renames_of_an_overwrite_is_repaired(run: Path, here: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    job = str(run / "tiny" / "job.yaml")
    old = digest(here / "tiny")
    killed("rename-aside", "train", job, f"output.dir={here}", "output.overwrite=true", "train.max_steps=2")
    assert not (here / "tiny").exists() and [n.split("-")[0] for n in hidden(here)] == [".tiny.old", ".tiny.tmp"]
    assert main("adapters", "list", "--dir", str(here)) == 0  # finishes the interrupted overwrite first
    assert "tiny" in capsys.readouterr().out
    assert digest(here / "tiny") == old and hidden(here) == []  # the old adapter is back under its name
    assert main("check", str(here / "tiny"), "--target", "peft") == 0


def test_kill_during_merge_leaves_no_output_and_a_rerun_works(here: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    killed("finetune.lifecycle.merge:verify_merged:before:1", "merge", str(here / "tiny"), "--out", str(out),
           "--dtype", "fp32")
    assert not out.exists() and [n.split("-")[0] for n in hidden(tmp_path)] == [".merged.tmp"]
    assert main("merge", str(here / "tiny"), "--out", str(out), "--dtype", "fp32") == 0
    assert (out / "merge.json").is_file() and hidden(tmp_path) == []


def test_kill_during_a_checkpoint_resumes_from_the_previous_one(run: Path, here: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    job = str(run / "tiny" / "job.yaml")
    shutil.rmtree(here / ".work" / "tiny" / "checkpoints")
    # The second checkpoint (step 4) dies after its weights are written, before its state file.
    killed("finetune.training.checkpoint:write_json:before:2", "train", job, f"output.dir={here}", "output.run_name=k",
           "train.max_steps=6")
    ckpts = here / ".work" / "k" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-00000002"]
    assert main("train", job, f"output.dir={here}", "output.run_name=k", "train.max_steps=6", "train.resume=auto") == 0
    assert "resumed from" in capsys.readouterr().out and (here / "k" / "adapter_model.safetensors").is_file()
    assert [p.name for p in ckpts.iterdir()] == ["step-00000004", "step-00000006"]  # stale temporary removed


def test_kill_during_gguf_import_leaves_no_folder(tiny_lm: Path, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tiny_lm, tmp_path / "tiny.gguf")
    out = tmp_path / "imported"
    killed("finetune.model.gguf_import:_check_tokenizer:before:1", "import-gguf", str(gguf), str(out))
    assert not out.exists() and [n.split("-")[0] for n in hidden(tmp_path)] == [".imported.tmp"]
    assert main("import-gguf", str(gguf), str(out)) == 0
    assert (out / "gguf_source.json").is_file() and hidden(tmp_path) == []


def test_damaged_newest_checkpoint_falls_back_to_the_previous(run: Path, here: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    job = str(run / "tiny" / "job.yaml")
    newest = here / ".work" / "tiny" / "checkpoints" / "step-00000004"
    (newest / "trainable.safetensors").write_bytes(b"\0" * 16)
    assert main("train", job, f"output.dir={here}", "output.overwrite=true", "train.max_steps=6",
                "train.resume=auto") == 0
    out = capsys.readouterr().out
    assert "cannot resume from step-00000004" in out and "resumed from" in out and "step-00000002 at step 2" in out


def test_disk_full_while_saving_says_nothing_was_written(run: Path, here: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from finetune.lifecycle import save

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save, "plot_losses", full)  # the last thing written before the folder moves into place
    old = digest(here / "tiny")
    job = str(run / "tiny" / "job.yaml")
    assert main("train", job, f"output.dir={here}", "output.overwrite=true", "train.max_steps=2") == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Nothing was written (the previous one is unchanged)" in err
    assert digest(here / "tiny") == old and hidden(here) == []


def test_disk_full_while_merging_says_nothing_was_written(here: Path, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from finetune.lifecycle import merge

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "write_json", full)
    assert main("merge", str(here / "tiny"), "--out", str(tmp_path / "m"), "--dtype", "fp32") == 1
    assert "Nothing was written (nothing is there)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and hidden(tmp_path) == []


def test_an_unexpected_exception_is_reported_as_a_bug(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from finetune.commands import config

    def broken(args: object) -> int:
        raise RuntimeError("something finetune did not expect")

    monkeypatch.setattr(config, "run", broken)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("FINETUNE_DEBUG", raising=False)
    assert main("config", "schema") == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this is a bug in finetune (RuntimeError: something" in err
    report = next((tmp_path / "crash-reports").glob("finetune-crash-*.txt"))
    assert "Traceback" in report.read_text() and "command: finetune config schema" in report.read_text()
    monkeypatch.setenv("FINETUNE_DEBUG", "1")
    assert main("config", "schema") == 70
    assert "Traceback" in capsys.readouterr().err


def test_checkpoints_load_without_running_code(run: Path) -> None:
    """Every file of a checkpoint is safetensors, JSON, or a torch file that loads with weights_only=True."""
    import torch

    folder = run / "adapters" / ".work" / "tiny" / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in folder.iterdir()) == [".finetune-output.json", "optimizer.pt",
                                                        "trainable.safetensors", "trainer_state.json"]
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "rng"}
    record = json.loads((folder / "trainer_state.json").read_text())
    assert record["format"] == 2 and record["job"]["lora.r"] == 4 and record["step"] == 4
