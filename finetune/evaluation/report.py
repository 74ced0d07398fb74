"""What `finetune eval` leaves behind: eval.json (machine-readable), eval.md (for people), eval.png (base vs
adapter), and the short table printed in the terminal."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.evaluation.harness import rows as harness_rows
from finetune.evaluation.plot import bar_chart

JSON_NAME, MD_NAME, PNG_NAME = "eval.json", "eval.md", "eval.png"


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write eval.json, eval.md and eval.png of `report` into `out_dir` (created, old ones replaced); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / JSON_NAME, out_dir / MD_NAME, out_dir / PNG_NAME]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    bar_chart(report, paths[2])
    return paths


def scalar_metrics(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, metric) of the report's metrics that compare base and adapter by one number (those with a delta)."""
    return [(name, m) for name, m in report["metrics"].items() if "delta" in m]


def verdict(m: dict[str, Any]) -> str:
    """The verdict on a metric's delta, read in its `better` direction: "better", "worse" or "=" (no change)."""
    if m["delta"] == 0:
        return "="
    improved = (m["delta"] < 0) if m["better"] == "lower" else (m["delta"] > 0)
    return "better" if improved else "worse"


def terminal_table(report: dict[str, Any]) -> str:
    """The tables `finetune eval` prints: base vs adapter per scalar metric, and per harness metric when run."""
    name, out = Path(report["adapter"]).name, []
    data = report["data"]
    if data is not None:
        rows = [(n, _fmt(m["base"]), _fmt(m["adapter"]), _fmt(m["delta"], signed=True), verdict(m)) for n, m in scalar_metrics(report)]
        out.append(f"{name} vs base on {data['evaluated']} examples of {Path(data['path']).name}\n"
                   + _table(("metric", "base", _side(report), "delta", ""), rows))
    if "harness" in report:
        h = report["harness"]
        rows = [(f"{task} {metric}", _pm(m["base"], m["base_stderr"]), _pm(m["adapter"], m["adapter_stderr"]),
                 _fmt(m["delta"], signed=True), verdict(m)) for task, metric, m in harness_rows(h)]
        out.append(f"{name} vs base on lm-evaluation-harness ({_harness_settings(h)})\n"
                   + _table(("task metric", "base", "adapter", "delta", ""), rows))
    return "\n\n".join(out)


def _side(report: dict[str, Any]) -> str:
    """The fine-tuned side's column name: an adapter, or a whole model from full fine-tuning."""
    return "fine-tuned" if report.get("kind") == "fully fine-tuned model" else "adapter"


def _table(head: tuple[str, ...], body: Sequence[tuple[str, ...]]) -> str:
    rows = [head, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """eval.md: what was evaluated and how, the metric table (per-class and confusion tables for classifiers),
    harness results, the examples where base and adapter differ, and eval.png."""
    parts = [_header(report)]
    if report["data"] is not None:
        parts.append(_metrics_md(report))
        if "per_class_recall" in report["metrics"]:
            parts.append(_per_class_md(report))
        if "confusion_matrix" in report["metrics"]:
            parts.append(_confusion_md(report))
    if "harness" in report:
        parts.append(harness_md(report["harness"]))
    if report["data"] is not None:
        parts.append(_examples_md(report))
    parts.append(f"![base vs adapter]({PNG_NAME})\n")
    return "\n".join(parts)


def harness_md(h: dict[str, Any], heading: str = "##") -> str:
    """The harness results as a Markdown table (also used by the model card)."""
    lines = [f"{heading} lm-evaluation-harness", "", f"Settings, identical on both sides: {_harness_settings(h)}. "
             f"Base: {h['how_base']}.", "", "| task | metric | base | adapter | delta | |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {task} | {metric} ({'lower' if m['better'] == 'lower' else 'higher'} is better) | "
              f"{_pm(m['base'], m['base_stderr'])} | {_pm(m['adapter'], m['adapter_stderr'])} | "
              f"{_fmt(m['delta'], True)} | {verdict(m)} |" for task, metric, m in harness_rows(h)]
    return "\n".join(lines) + "\n"


def _harness_settings(h: dict[str, Any]) -> str:
    s = h["settings"]
    shots = "each task's default few-shot" if s["num_fewshot"] is None else f"{s['num_fewshot']}-shot"
    chat = ("chat template on" + (", recorded system prompt" if s["system_instruction"] else "")
            + (", few-shot as multi-turn" if s["fewshot_as_multiturn"] else "")) if s["apply_chat_template"] else "chat template off"
    limit = f"limit {s['limit']} per task" if s["limit"] is not None else "all examples"
    return f"{chat}; {shots}; {limit}; batch {s['batch_size']}"


def _pm(value: float, stderr: float | None) -> str:
    return _fmt(value) + (f" ± {stderr:.4f}" if stderr is not None else "")


def _header(report: dict[str, Any]) -> str:
    data = report["data"]
    lines = [f"# Evaluation of `{Path(report['adapter']).name}`", "",
             f"- {report.get('kind', 'adapter')}: `{report['adapter']}`", f"- base model: `{report['base_model']}`"]
    if data is not None:
        lines.append(f"- data: `{data['path']}` ({data['format']}, {data['evaluated']} of {data['rows_total']} rows, "
                     f"fingerprint `{data['fingerprint']}`)")
    else:
        lines.append("- task data: none given (no --data and no data.validation): harness tasks only")
    if "decoding" in report:
        d = report["decoding"]
        lines.append(f"- decoding: {d['strategy']}, up to {d['max_new_tokens']} new tokens, batch {d['batch_size']}, "
                     f"chat template {'on' if d['chat_template'] else 'off'}, stop ids {d['stop_token_ids']}")
    if "general" in report:
        g = report["general"]
        lines.append(f"- general data (what it cost): `{g['path']}` ({g['rows']} rows)")
    if report["task"] == "classification":
        lines.append("- base: the base encoder with a new, untrained classification head (seed 0): chance level")
    lines.append(f"- created {report['created']}, evaluation took {report['timings']['eval_s']} s")
    return "\n".join(lines) + "\n"


def _metrics_md(report: dict[str, Any]) -> str:
    lines = ["## Metrics", "", f"| metric | base | {_side(report)} | delta | |", "|---|---:|---:|---:|---|"]
    for name, m in scalar_metrics(report):
        arrow = "lower is better" if m["better"] == "lower" else "higher is better"
        lines.append(f"| {name} ({arrow}) | {_fmt(m['base'])} | {_fmt(m['adapter'])} | {_fmt(m['delta'], True)} | {verdict(m)} |")
    return "\n".join(lines) + "\n"


def _per_class_md(report: dict[str, Any]) -> str:
    labels, m = report.get("labels", []), report["metrics"]
    out = ["## Per class", "", "| class | precision base | precision adapter | recall base | recall adapter |",
           "|---|---:|---:|---:|---:|"]
    for i, label in enumerate(labels):
        cells = [m[name][side][i] for name in ("per_class_precision", "per_class_recall") for side in ("base", "adapter")]
        out.append(f"| {_cell(label)} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def _confusion_md(report: dict[str, Any]) -> str:
    labels = report.get("labels", [])
    out = ["## Confusion matrices", "", "Rows: reference class; columns: predicted class.", ""]
    for side in ("base", "adapter"):
        matrix = report["metrics"]["confusion_matrix"][side]
        out += [f"**{side}**", "", "| | " + " | ".join(map(_cell, labels)) + " |", "|---" * (len(labels) + 1) + "|"]
        out += [f"| {_cell(labels[i])} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(matrix)]
        out.append("")
    return "\n".join(out)


def _examples_md(report: dict[str, Any], limit: int = 10) -> str:
    examples = report["examples"]
    differ = [e for e in examples if e["base"] != e["adapter"]]
    lines = ["## Examples where base and adapter differ", "", f"{len(differ)} of {len(examples)} outputs differ"
             + (f"; the first {limit} are shown." if len(differ) > limit else "."), ""]
    if differ:
        lines += ["| prompt | reference | base | adapter |", "|---|---|---|---|"]
        lines += [f"| {_cell(_prompt_text(e['prompt']))} | {_cell(e['reference'])} | {_cell(e['base'])} | {_cell(e['adapter'])} |"
                  for e in differ[:limit]]
    return "\n".join(lines) + "\n"


def _prompt_text(prompt: Any) -> str:
    """A chat prompt is shown by its last user message (the rest is in eval.json)."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return str(users[-1]) if users else json.dumps(prompt)
    return str(prompt)


def _cell(value: Any, width: int = 120) -> str:
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(value: float, signed: bool = False) -> str:
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return text if abs(value) < 1e6 else (f"{value:+.3g}" if signed else f"{value:.3g}")
