"""Real processes: 2-process data parallel through `accelerate launch` equals 1 process with twice the micro-batch,
and a run stopped by SIGTERM, then killed by SIGKILL, then resumed equals an uninterrupted run bitwise (fp32, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.testing import qa_rows, write_jsonl

VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _finetune(*args: str, launcher: list[str] | None = None) -> subprocess.Popen[str]:
    cmd = (launcher or [sys.executable]) + ["-m", "finetune", "train", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _done(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in _rows(path) if "loss" in r]


def _in_process(job: str, *overrides: str) -> Path:
    """The reference run, in this process with one thread like the subprocesses (saves a ~10 s interpreter start)."""
    from accelerate.state import AcceleratorState

    from finetune.config import load_config
    from finetune.pipeline import run_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_train(load_config(job, list(overrides)))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


def _wait_for_step(path: Path, step: int, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if any(r.get("step", 0) >= step for r in _rows(path)):
            return
        time.sleep(0.01)
    pytest.fail(f"training did not reach step {step} (exit {proc.poll()})")


def test_two_processes_equal_one_with_double_micro_batch(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    job = str(write_job(tmp_path, tiny_lm, data, train={"max_steps": 6, "gradient_accumulation": 2}))
    launcher = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2"]
    ddp = _finetune(job, "train.micro_batch_size=1", "output.run_name=ddp", launcher=launcher)
    code, out = _done(ddp)
    assert code == 0, out
    assert "starting 2 synchronised ones" in out
    assert out.count("adapter saved and verified") == 1 and out.count("trained 6 steps") == 1, out  # rank 0 only
    ddp_dir, one_dir = tmp_path / "adapters" / "ddp", _in_process(job, "train.micro_batch_size=2", "output.run_name=one")
    assert json.loads((ddp_dir / "run.json").read_text())["hardware"]["num_processes"] == 2
    assert [r["step"] for r in _rows(ddp_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]  # one writer, no duplicates
    # gloo sums gradients in another order than one process: float32 rounding only. The losses are smooth in the
    # weights, so they agree closely on any CPU. Single weights need not: Adam divides a near-zero gradient by its own
    # magnitude, so an element whose gradient is ~0 may move by up to lr per step either way. So nearly every
    # element must agree to 1e-5, and every element within Adam's bound of 2 * lr * steps.
    diffs = [abs(x - y) for x, y in zip(_losses(ddp_dir / "metrics.jsonl"), _losses(one_dir / "metrics.jsonl"), strict=True)]
    assert max(diffs) < 1e-5, diffs
    a, b = load_file(str(ddp_dir / "adapter_model.safetensors")), load_file(str(one_dir / "adapter_model.safetensors"))
    delta = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float((delta > 1e-5).float().mean()) < 1e-3, float(delta.max())
    assert float(delta.max()) <= 2 * 1e-2 * 6


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    job = str(write_job(tmp_path, tiny_lm, data, train={"max_steps": 40, "micro_batch_size": 2, "checkpoint_every": 4,
                                                         "keep_last": 3, "resume": "auto"}))
    metrics = tmp_path / "adapters" / ".work" / "crash" / "metrics.jsonl"
    first = _finetune(job, "output.run_name=crash")
    _wait_for_step(metrics, 2, first)
    first.send_signal(signal.SIGTERM)
    code, out = _done(first)
    stopped = max(r["step"] for r in _rows(metrics))
    assert code != 0 and f"interrupted at step {stopped}: checkpoint saved" in out, out
    assert (metrics.parent / "checkpoints" / f"step-{stopped:08d}").is_dir()

    second = _finetune(job, "output.run_name=crash")
    _wait_for_step(metrics, stopped + 6, second)  # past at least one more periodic checkpoint
    second.kill()  # SIGKILL: no handler runs
    second.wait()
    assert max(r["step"] for r in _rows(metrics)) < 40, "finished before it could be killed"

    code, out = _done(_finetune(job, "output.run_name=crash"))
    assert code == 0 and "resumed from" in out, out
    crash, straight = tmp_path / "adapters" / "crash", _in_process(job, "output.run_name=straight", "train.resume=null")
    a, b = load_file(str(crash / "adapter_model.safetensors")), load_file(str(straight / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(crash / "metrics.jsonl") == _losses(straight / "metrics.jsonl")
    assert [r["step"] for r in _rows(crash / "metrics.jsonl")] == list(range(1, 41))
