"""bench/bench_train.py's report: one table per device, the ratios and goals of issue 14, the machine and versions."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GOALS = {"tok_s_vs_tutorial": 2.0, "tok_s_vs_trl": 1.5, "rss_vs_tutorial": 0.5, "mfu": 0.40}


def write_results(sections: list[dict[str, Any]], out: str, command: str) -> None:
    text = "\n".join([_header(sections, command)] + [_section(s) for s in sections])
    print("\n" + text)
    Path(out).write_text(text, encoding="utf-8")
    print(f"written to {out}")


def _header(sections: list[dict[str, Any]], command: str) -> str:
    spec = sections[0]["spec"]
    loads = [x for s in sections for x in s["load"]]
    return "\n".join([
        "# Training benchmark: finetune vs the tutorial recipe vs TRL",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB RAM; load average during the runs "
        f"{min(loads):.1f} to {max(loads):.1f} (above {os.cpu_count()} means other processes shared the cores: "
        "read the ratios, which interleaving keeps fair, rather than the absolute figures)",
        f"- versions: {_versions()}",
        f"- model: {spec['model']}; data: {spec['data_origin']}: {spec['rows']} training rows, {spec['eval_rows']} "
        f"held out; {spec['steps']} optimizer steps of {spec['batch']} examples, max length {spec['max_len']}, LoRA "
        f"r={spec['r']} alpha={spec['alpha']} all-linear, bf16 autocast, AdamW lr {spec['lr']} cosine",
        "- wall time: the training steps only (model load, data preparation and saving excluded); CPU time: the "
        "worker's process time over the same steps (the work done: on a shared machine it does not count the time "
        "spent waiting for a core, so per-CPU-second ratios are the figures to trust there); non-pad tok/s: "
        "tokens read per second, padding excluded; positions: what the model computed, padding included; peak RSS: "
        "the worker process's high-water mark at the end of training (model load included); eval loss: mean loss per "
        "answer token on the held-out rows, one function for all (finetune's tokenization, padded batches, float32 "
        "logits); MFU: non-pad tok/s x 4 x parameters (forward + activation gradients of the frozen base) / the bf16 "
        "matmul peak measured in the same run",
        "",
    ])


def _section(sec: dict[str, Any]) -> str:
    peak = max(m.get("gflops_bf16", 0.0) for m in sec["matmul"] if "error" not in m)
    params = next((m["params"] for m in sec["matmul"] if m.get("params")), None)
    rows = {name: _median(runs) for name, runs in sec["runs"].items()}
    lines = [f"## {sec['device'].upper()}: {Path(sec['spec']['model']).name}", "",
             f"bf16 matmul peak {peak:.0f} GFLOP/s (fp32 {max(m.get('gflops_fp32', 0.0) for m in sec['matmul']):.0f}), "
             f"{sec['matmul'][0].get('threads')} threads; {params or 0:,} parameters", "",
             "| contender | base dtype | steps wall (s) | non-pad tok/s | steps CPU (s) | non-pad tok per CPU-s | "
             "positions (incl. pad) | target tokens | "
             f"{'peak RSS' if sec['device'] == 'cpu' else 'peak GPU memory'} (MB) | eval loss | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r is None:
            error = sec["runs"][name][-1]["error"].strip().splitlines()[-1][:200]
            lines.append(f"| {name} | failed: {error} | | | | | | | | | |")
            continue
        mfu = r["tok_s"] * 4 * params / (peak * 1e9) if params and peak else 0.0
        r["mfu"] = mfu
        lines.append(f"| {name} | {r['base_dtype']} | {r['seconds']:.1f} | {r['tok_s']:.0f} | {r['cpu_seconds']:.1f} | "
                     f"{r['cpu_tok_s']:.1f} | {r['positions']:,} | "
                     f"{r['target_tokens']:,} | {r['peak_mb']:,.0f} | {r['eval_loss']:.4f} | {100 * mfu:.1f}% |")
    lines += ["", *_ratios(rows), "", *_raw(sec)]
    return "\n".join(lines) + "\n"


def _median(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    rate = statistics.median(r["input_tokens"] / r["seconds"] for r in ok)
    return {**ok[0], "tok_s": rate, "seconds": statistics.median(r["seconds"] for r in ok),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok),
            "cpu_tok_s": statistics.median(r["input_tokens"] / r["cpu_seconds"] for r in ok),
            "peak_mb": max(r["peak_mb"] for r in ok)}


def _ratios(rows: dict[str, dict[str, Any] | None]) -> list[str]:
    ours, tutorial = rows.get("finetune"), rows.get("tutorial")
    trls = [r for n, r in rows.items() if n.startswith("trl") and r]
    if not ours:
        return []
    out = ["Ratios (finetune / other) and the issue's goals:", ""]
    if tutorial:
        speed, rss = ours["tok_s"] / tutorial["tok_s"], ours["peak_mb"] / tutorial["peak_mb"]
        out.append(f"- non-pad tok/s vs the tutorial recipe: **{speed:.2f}x** (goal >= {GOALS['tok_s_vs_tutorial']}x: "
                   f"{_met(speed >= GOALS['tok_s_vs_tutorial'])}); per CPU-second: "
                   f"**{ours['cpu_tok_s'] / tutorial['cpu_tok_s']:.2f}x**")
        out.append(f"- peak RSS vs the tutorial recipe: **{rss:.2f}x** (goal <= {GOALS['rss_vs_tutorial']}x: "
                   f"{_met(rss <= GOALS['rss_vs_tutorial'])})")
    if trls:
        best = max(trls, key=lambda r: r["tok_s"])
        speed = ours["tok_s"] / best["tok_s"]
        out.append(f"- non-pad tok/s vs TRL's faster mode ({best['name']}): **{speed:.2f}x** (goal >= "
                   f"{GOALS['tok_s_vs_trl']}x: {_met(speed >= GOALS['tok_s_vs_trl'])}); per CPU-second: "
                   f"**{ours['cpu_tok_s'] / max(r['cpu_tok_s'] for r in trls):.2f}x**")
    others = [r for n, r in rows.items() if r and (n == "tutorial" or n.startswith("trl"))]
    if others:
        delta = max(abs(ours["eval_loss"] - r["eval_loss"]) for r in others)
        out.append(f"- eval loss: finetune {ours['eval_loss']:.4f}, largest difference to the others {delta:.4f} "
                   f"({100 * delta / ours['eval_loss']:.2f}%)")
    if "mfu" in ours:
        out.append(f"- MFU: **{100 * ours['mfu']:.1f}%** of the measured bf16 matmul peak (goal >= "
                   f"{100 * GOALS['mfu']:.0f}%: {_met(ours['mfu'] >= GOALS['mfu'])})")
    return out


def _raw(sec: dict[str, Any]) -> list[str]:
    out = ["<details><summary>every run</summary>", "", "| contender | round | s | non-pad tokens | train loss | eval loss |",
           "|---|---|---|---|---|---|"]
    for name, runs in sec["runs"].items():
        for i, r in enumerate(runs, 1):
            if "error" in r:
                out.append(f"| {name} | {i} | failed | | | |")
            else:
                loss = "" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
                out.append(f"| {name} | {i} | {r['seconds']:.1f} | {r['input_tokens']:,} | {loss} | "
                           f"{r['eval_loss']:.4f} |")
    return out + ["", "</details>"]


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}"]
    for name in ("finetune", "torch", "transformers", "peft", "accelerate", "trl"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return ", ".join(parts) + (f" (finetune commit {commit})" if commit else "")
