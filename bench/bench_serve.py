"""Benchmark `finetune serve` against the baselines, side by side, with the ratios the issue asks for.

    .venv/bin/python bench/bench_serve.py                        # the full run (a few minutes on 2 idle cores)
    .venv/bin/python bench/bench_serve.py --quick                # a small-scale check that everything runs
    .venv/bin/python bench/bench_serve.py --threads 1 --out bench/serve_results.md --json bench/serve_results.json

Setup: SmolLM2-135M-Instruct from the quickstart's GGUF import (.cache/models/SmolLM2-135M-Instruct, or --base),
float32 on the CPU; two LoRA adapters r=16 on all linear layers, peft's initialisation with B set to small random
values (the compute of a trained adapter, and answers that differ from the base). Every request asks for exactly
N new tokens (`ignore_eos`, or min_new_tokens for the baselines) so every side does the same work.

1. Single stream, one adapter, greedy, the same chat prompts, sides interleaved prompt by prompt:
   - pipeline: `transformers.pipeline("text-generation")` on the merged model (merge_and_unload) - the target;
   - peft: `generate` on the unmerged PeftModel (what the demo engine ran before batching);
   - engine: finetune.serving.engine in this process (no HTTP);
   - serve: `finetune serve` in its own process, through the official `openai` client, streaming.
   TTFT: from the call to the first token (the LM head's first call for in-process sides, the first streamed text
   for the server); decode tokens/s: (tokens - 1) / (last token - first token).
2. 8 concurrent streaming clients over adapter A, adapter B and the base: aggregate tokens/s (all completion
   tokens / wall time), p50/p95 TTFT and latency, errors; ratio to the single-stream server figure.
3. 32 clients through the `openai` client (non-streamed), three rounds: errors, /health after, the server's RSS
   before and after each round (memory flat: after the first round, a round adds nothing that stays).
Prints the table and ratios, and writes them as Markdown (--out) and JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain what a LoRA adapter is.",
           "List three fruits and their colours.", "Why is the sky blue?", "Translate 'good morning' into French.",
           "Give me a name for a cat and say why.", "What is 12 times 12? Show your steps."]


def make_adapters(base: str, work: Path) -> list[Path]:
    """Two r=16 all-linear adapters: peft's A, and B ~ N(0, 0.02) instead of zeros (seeded, distinct)."""
    import torch

    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.model import load_model
    from finetune.model.lora import wrap_lora

    out = []
    for seed, name in ((1, "adapter-a"), (2, "adapter-b")):
        model, tok, _ = load_model(ModelConfig(name_or_path=base))
        torch.manual_seed(seed)
        net = wrap_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0), "causal_lm")
        with torch.no_grad():
            for pname, param in net.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0.0, 0.02)
        folder = work / name
        net.save_pretrained(folder)
        tok.save_pretrained(folder)
        run = {"task": "causal_lm", "data": {"chat_template": True}, "note": "made by bench/bench_serve.py"}
        (folder / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        out.append(folder)
    return out


class HeadClock:
    """LM-head hook: the first call's end is the first token; calls count tokens."""

    def __init__(self, model: Any):
        self.handle = model.get_output_embeddings().register_forward_hook(self._hook)
        self.reset()

    def reset(self) -> None:
        self.start, self.stamps = time.perf_counter(), []

    def _hook(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())


def timing(start: float, stamps: list[float]) -> dict[str, float]:
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft_ms": 1000 * (stamps[0] - start), "decode_tps": decode, "tokens": len(stamps),
            "e2e_tps": len(stamps) / (stamps[-1] - start)}


# -- the sides of the single-stream comparison ----------------------------------------------------------------


def pipeline_side(base: str, adapter: Path, n: int) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(str(adapter))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    merged = model.merge_and_unload().eval()
    pipe = pipeline("text-generation", model=merged, tokenizer=tok)
    clock = HeadClock(merged)

    def one(prompt: str) -> dict[str, float]:
        clock.reset()
        pipe([{"role": "user", "content": prompt}], max_new_tokens=n, min_new_tokens=n, do_sample=False,
             temperature=None, top_p=None, top_k=None)
        return timing(clock.start, clock.stamps)

    return one


def peft_side(base: str, adapter: Path, n: int) -> Any:
    import torch

    from finetune.data.prompting import prompt_ids
    from finetune.lifecycle.folder import load_adapter

    model, tok, _ = load_adapter(adapter, base)
    clock = HeadClock(model)

    def one(prompt: str) -> dict[str, float]:
        clock.reset()
        ids = torch.tensor([prompt_ids(tok, prompt, chat=True)])
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        return timing(clock.start, clock.stamps)

    return one


def engine_side(base: str, adapters: list[Path], n: int) -> Any:
    from finetune.serving.engine import GenerationParams, load_engine

    engine = load_engine(adapters, base)
    name = adapters[0].name
    params = GenerationParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)

    def one(prompt: str) -> dict[str, float]:
        start, stamps = time.perf_counter(), []
        for chunk in engine.submit(name, prompt, params):
            stamps += [time.perf_counter()] * (chunk.tokens - len(stamps))
        return timing(start, stamps)

    return one


def serve_side(client: Any, model: str, n: int) -> Any:
    def one(prompt: str) -> dict[str, float]:
        result = stream_request(client, model, prompt, n)
        if result["error"]:
            raise RuntimeError(result["error"])
        return result

    return one


def stream_request(client: Any, model: str, prompt: str, n: int) -> dict[str, Any]:
    """One streamed chat request: TTFT, decode tokens/s over the streamed tokens, latency."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - counted as an error of the run
        return {"error": f"{type(exc).__name__}: {exc}", "latency_ms": 1000 * (time.perf_counter() - start)}
    end = time.perf_counter()
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"error": None, "ttft_ms": 1000 * (first - start), "decode_tps": decode, "tokens": tokens,
            "e2e_tps": tokens / (end - start), "latency_ms": 1000 * (end - start)}


# -- the server ---------------------------------------------------------------------------------------------------


def start_server(base: str, adapters: list[Path], port: int, threads: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finetune", "serve", *map(str, adapters), "--base", base, "--port", str(port),
           "--threads", str(threads), "--max-batch", "8", "--max-queue", "64", "--no-demo"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"finetune serve did not start:\n{log.read_text()[-3000:]}")


def concurrent(client_factory: Any, models: list[str], n: int, streamed: bool) -> dict[str, Any]:
    """len(models) clients at once, each with its own client; returns the aggregate figures."""
    results: list[dict[str, Any]] = [{} for _ in models]
    barrier = threading.Barrier(len(models) + 1)

    def one(i: int) -> None:
        client = client_factory()
        barrier.wait()
        prompt = PROMPTS[i % len(PROMPTS)]
        if streamed:
            results[i] = stream_request(client, models[i], prompt, n)
            return
        start = time.perf_counter()
        try:
            done = client.chat.completions.create(model=models[i], messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
            results[i] = {"error": None, "tokens": done.usage.completion_tokens}
        except Exception as exc:  # noqa: BLE001 - counted
            results[i] = {"error": f"{type(exc).__name__}: {exc}"}
        results[i]["latency_ms"] = 1000 * (time.perf_counter() - start)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if not r.get("error")]
    out: dict[str, Any] = {"clients": len(models), "errors": len(models) - len(ok), "wall_s": wall,
                           "tokens": sum(r["tokens"] for r in ok), "aggregate_tps": sum(r["tokens"] for r in ok) / wall,
                           "latency_p50_ms": pct([r["latency_ms"] for r in ok], 50),
                           "latency_p95_ms": pct([r["latency_ms"] for r in ok], 95),
                           "error_samples": sorted({r["error"] for r in results if r.get("error")})[:3]}
    if streamed:
        out.update(ttft_p50_ms=pct([r["ttft_ms"] for r in ok], 50), ttft_p95_ms=pct([r["ttft_ms"] for r in ok], 95))
    return out


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def measure(sides: dict[str, Any], prompts: list[str]) -> dict[str, list[dict[str, float]]]:
    """Each prompt runs on every side in turn, so a busy machine slows all sides alike; one warm-up each."""
    for one in sides.values():
        one(prompts[0])
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for prompt in prompts:
        for name, one in sides.items():
            rows[name].append(one(prompt))
    return rows


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def report(single: dict[str, list[dict[str, float]]], conc: dict[str, Any], loads: list[dict[str, Any]],
           rss: list[float], health: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    ref = "pipeline (merged model)"
    summary = {name: {k: median(rows, k) for k in ("ttft_ms", "decode_tps", "e2e_tps", "tokens")}
               for name, rows in single.items()}
    serve = summary["serve (HTTP, openai client)"]
    ratios = {"serve/pipeline decode tokens/s (goal >= 0.9)": serve["decode_tps"] / summary[ref]["decode_tps"],
              "serve/pipeline TTFT (goal <= 1.2)": serve["ttft_ms"] / summary[ref]["ttft_ms"],
              "engine/pipeline decode tokens/s": summary["engine (in-process)"]["decode_tps"] / summary[ref]["decode_tps"],
              "8 clients aggregate / single-stream serve decode tokens/s (goal >= 3)":
                  conc["aggregate_tps"] / serve["decode_tps"]}
    lines = [f"Single stream, one adapter, greedy, {args.new_tokens} new tokens, {len(args.prompt_list)} prompts "
             f"(medians), {args.threads} torch thread(s):", "",
             "| side | TTFT ms | decode tokens/s | end-to-end tokens/s | tokens |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {s['ttft_ms']:.0f} | {s['decode_tps']:.1f} | {s['e2e_tps']:.1f} | {s['tokens']:.0f} |"
              for name, s in summary.items()]
    lines += ["", f"8 concurrent streaming clients over adapter-a, adapter-b and base ({args.new_tokens} tokens each):", "",
              "| clients | errors | aggregate tokens/s | TTFT p50 / p95 ms | latency p50 / p95 ms | wall s |",
              "|---:|---:|---:|---:|---:|---:|",
              f"| {conc['clients']} | {conc['errors']} | {conc['aggregate_tps']:.1f} | {conc['ttft_p50_ms']:.0f} / "
              f"{conc['ttft_p95_ms']:.0f} | {conc['latency_p50_ms']:.0f} / {conc['latency_p95_ms']:.0f} | "
              f"{conc['wall_s']:.1f} |", "",
              f"{loads[0]['clients']} clients through the openai client, {len(loads)} rounds (server --max-batch 8 "
              "--max-queue 64):", "",
              "| round | errors | aggregate tokens/s | latency p50 / p95 ms | server RSS after, MB |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {i + 1} | {ld['errors']} | {ld['aggregate_tps']:.1f} | {ld['latency_p50_ms']:.0f} / "
              f"{ld['latency_p95_ms']:.0f} | {rss[i + 1]:.0f} |" for i, ld in enumerate(loads)]
    lines += ["", f"Server RSS before the rounds {rss[0]:.0f} MB; after round 1 {rss[1]:.0f} MB, after the last "
              f"{rss[-1]:.0f} MB ({rss[-1] - rss[1]:+.0f} MB over rounds 2-{len(loads)}); "
              f"/health after: {health.get('status')} (running {health.get('running')}, waiting {health.get('waiting')}).",
              "", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    errors = [s for ld in [conc, *loads] for s in ld.get("error_samples", [])]
    if errors:
        lines += ["", "Errors seen: " + "; ".join(errors)]
    data = {"single": summary, "single_raw": single, "concurrent": conc, "loads": loads, "rss_mb": rss,
            "health": health, "ratios": ratios,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "prompt_list"}}
    return "\n".join(lines) + "\n", data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every side (default 2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=6, help="prompts in the single-stream comparison")
    parser.add_argument("--clients", type=int, default=32, help="clients in the bounded-load rounds")
    parser.add_argument("--rounds", type=int, default=3, help="bounded-load rounds (RSS after each)")
    parser.add_argument("--quick", action="store_true", help="8 tokens, 2 prompts, 8 load clients: does it all run?")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.prompts, args.clients, args.rounds = 8, 2, 8, 2
    args.prompt_list = PROMPTS[: args.prompts]
    import httpx
    import torch
    from openai import OpenAI

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    adapters = make_adapters(args.base, work)
    port = free_port()
    server = start_server(args.base, adapters, port, args.threads, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        def client() -> Any:
            return OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900)

        n = args.new_tokens
        sides = {"pipeline (merged model)": pipeline_side(args.base, adapters[0], n),
                 "peft generate (unmerged)": peft_side(args.base, adapters[0], n),
                 "engine (in-process)": engine_side(args.base, adapters, n),
                 "serve (HTTP, openai client)": serve_side(client(), adapters[0].name, n)}
        single = measure(sides, args.prompt_list)
        mix = [adapters[0].name, adapters[1].name, "base"]
        conc = concurrent(client, [mix[i % 3] for i in range(8)], n, streamed=True)
        rss = [rss_mb(server.pid)]
        loads = []
        for _ in range(args.rounds):
            loads.append(concurrent(client, [mix[i % 3] for i in range(args.clients)], n, streamed=False))
            rss.append(rss_mb(server.pid))
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    text, data = report(single, conc, loads, rss, health, args)
    print(text)
    if args.out:
        args.out.write_text(f"`{' '.join(['bench/bench_serve.py', *(argv or sys.argv[1:])])}`\n\n{text}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
