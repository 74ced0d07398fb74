"""Training speed and memory: `finetune train` against the tutorial recipe (transformers Trainer + peft, padded
batches) and TRL's SFTTrainer (padding-free and packing), on the same model, rows, order, LoRA, batch and steps.

    .venv/bin/python bench/bench_train.py                    # SmolLM2-135M, 80 alpaca rows, 10 steps of 8, max 512
    .venv/bin/python bench/bench_train.py --quick            # a 2-step smoke run on 16 rows (checks that it works)
    .venv/bin/python bench/bench_train.py --ablations        # also: the pre-issue-14 path and each change alone
    .venv/bin/python bench/bench_train.py --rounds 2 --out /tmp/RESULTS.md

Each run is its own process (a clean heap and a true peak RSS), and the contenders are interleaved round after
round, so a busy machine slows them alike; ratios are the figures to read. Every contender trains on the same rows in
finetune's data order (the HF trainers read them sequentially in that order), LoRA r=16 alpha=32 on all linear
layers, bf16 autocast, AdamW lr 2e-4 cosine, and is then scored by one function: the mean loss per answer token on
the same held-out rows, tokenized by finetune, padded batches, full logits in float32. Data: the alpaca rows at
--data (default ../shared/data/alpaca_cleaned_1000.json beside the repository) when present, else alpaca-style rows
generated here. Results are printed and written to bench/RESULTS.md with the machine, versions, date and command.
With CUDA present the same comparison runs on the GPU (bf16; flash-attention varlen when flash_attn is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_report import write_results  # noqa: E402
from train_workers import CONTENDERS, run_worker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache/models/SmolLM2-135M-Instruct"
ALPACA = ROOT.parent / "shared/data/alpaca_cleaned_1000.json"
DEFAULT = ["finetune", "tutorial", "trl-padding-free", "trl-packing"]
ABLATIONS = ["finetune-v0", "finetune-v0+targets", "finetune-v0+targets+padding-free", "finetune+compile"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker, json.loads(Path(args.spec).read_text()), Path(args.result))
    names = args.contenders or DEFAULT + (ABLATIONS if args.ablations else [])
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        spec = _spec(args, Path(tmp))
        sections = [_compare(args, spec, names, Path(tmp), "cpu")]
        if _cuda() and not args.no_gpu:
            gpu = {**spec, "device": "cuda", "models": [str(m) for m in args.gpu_model] or [spec["model"]]}
            sections += [_compare(args, {**gpu, "model": m}, names, Path(tmp), "cuda") for m in gpu["models"]]
    write_results(sections, args.out, " ".join([Path(sys.executable).name, *sys.argv]))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL), help="HF folder of the base model (default: the quickstart's SmolLM2)")
    p.add_argument("--data", default=str(ALPACA), help="alpaca JSON/JSONL; alpaca-style rows are generated if absent")
    p.add_argument("--rows", type=int, default=80, help="training rows (the steps cover them once by default)")
    p.add_argument("--eval-rows", type=int, default=40, help="held-out rows for the eval loss")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="effective batch (examples per optimizer step)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's, one per core); "
                   "on a machine other jobs share, 1 avoids threads waiting on each other's descheduled partner")
    p.add_argument("--contenders", nargs="*", help=f"default: {' '.join(DEFAULT)}")
    p.add_argument("--ablations", action="store_true", help=f"also run {' '.join(ABLATIONS)}")
    p.add_argument("--quick", action="store_true", help="2 steps of 4 on 16 rows, 8 held out: a smoke run")
    p.add_argument("--gpu-model", nargs="*", default=[], help="GPU section: models to compare (default: --model)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when CUDA is present")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def _spec(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Data files and the shared settings every worker reads."""
    from train_workers import data_order

    if args.quick:
        args.rows, args.eval_rows, args.steps, args.batch = 16, 8, 2, 4
    rows, origin = _alpaca_rows(Path(args.data), args.rows + args.eval_rows)
    train, held = tmp / "train.jsonl", tmp / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.rows]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[args.rows:]))
    spec = {"model": args.model, "train": str(train), "eval": str(held), "data_origin": origin, "rows": args.rows,
            "eval_rows": len(rows) - args.rows, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
            "lr": 2e-4, "r": 16, "alpha": 32, "seed": 42, "warmup_ratio": 0.03, "device": "cpu", "work": str(tmp),
            "threads": args.threads}
    spec["order"] = data_order(args.rows, args.steps * args.batch, spec["seed"])
    return spec


def _alpaca_rows(path: Path, n: int) -> tuple[list[dict[str, str]], str]:
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
        if len(rows) >= n:
            return [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in rows[:n]], str(path)
    return _generated(n), f"generated alpaca-style rows ({path} not found)"


def _generated(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-shaped rows with alpaca-like lengths (answers of 5 to 300 words), deterministic."""
    import random

    rng = random.Random(seed)
    words = ["the", "model", "data", "answer", "question", "water", "energy", "history", "city", "river", "music", "health", "light", "system", "number", "plant", "animal", "market", "language", "computer", "science", "people", "world", "simple", "small", "large", "good", "new", "first"]
    tasks = ["Explain {} in simple terms.", "Give three tips about {}.", "Write a short story about {}.",
             "Summarize the text below.", "Describe how {} works.", "List the main facts about {}."]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"instruction": rng.choice(tasks).format(rng.choice(words)), "input": text(5, 40) if rng.random() < 0.4 else "",
             "output": text(5, int(rng.expovariate(1 / 90)) % 300 + 5)} for _ in range(n)]


def _compare(args: argparse.Namespace, spec: dict[str, Any], names: list[str], tmp: Path, device: str) -> dict[str, Any]:
    """Every contender `rounds` times, interleaved (the order rotates each round), each in a fresh process."""
    peaks = [_in_process("matmul", {**spec, "device": device}, tmp)]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            print(f"[{device}] round {r + 1}/{args.rounds}: {name} ...", flush=True)
            out = _in_process(name, {**spec, "device": device}, tmp)
            runs[name].append(out)
            print(f"    {out.get('error') or _brief(out)}", flush=True)
            load.append(os.getloadavg()[0])
    peaks.append(_in_process("matmul", {**spec, "device": device}, tmp))
    return {"device": device, "spec": spec, "runs": runs, "matmul": peaks, "load": load}


def _in_process(name: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    spec_path, result = tmp / "spec.json", tmp / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path), "--result", str(result)]
    log = tmp / f"{name}.log"
    env = {**os.environ, **({"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {})}
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU section stays on the CPU on a GPU machine too
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if code or not result.is_file():
        tail = log.read_text(errors="replace")[-1500:]
        return {"error": f"worker {name} failed (exit {code}): ...{tail}"}
    return json.loads(result.read_text())


def _brief(out: dict[str, Any]) -> str:
    if "gflops_bf16" in out:
        return f"matmul {out['gflops_bf16']:.0f} GFLOP/s bf16"
    return (f"{out['seconds']:.1f} s, {out['input_tokens'] / out['seconds']:.0f} non-pad tok/s, "
            f"peak RSS {out['peak_mb']:,.0f} MB, eval loss {out['eval_loss']:.4f}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
