"""The text of each model card section (finetune.lifecycle.modelcard assembles them), from the folder's records
only: adapter_config.json, run.json, finetune.yaml, prompt.json and eval.json. Example rows never appear here (they
may be private); the numbers and settings do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.lifecycle.folder import AdapterInfo
from finetune.lifecycle.targets import VLLM_RANKS

FILES = {
    "adapter_model.safetensors": "the LoRA weights (peft)", "adapter_config.json": "the LoRA settings and base (peft)",
    "model.safetensors": "the whole fine-tuned model", "config.json": "the model architecture (transformers)",
    "tokenizer.json": "the tokenizer training used", "chat_template.jinja": "the chat template training used",
    "finetune.yaml": "the resolved training job", "run.json": "versions, hardware, data fingerprint, timings, metrics",
    "prompt.json": "the prompt format training used (chat template, system prompt)",
    "metrics.jsonl": "the training log, one line per logged step", "loss.png": "training and validation loss",
    "eval.json": "`finetune eval` results (all outputs, settings)", "eval.md": "the evaluation report",
    "eval.png": "base vs fine-tuned, as bars",
}


def number(v: Any) -> bool:
    """True for an int or float value; a bool is not a number here."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A value as a table cell: floats to 4 significant digits, None as '-'."""
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _what(info: AdapterInfo) -> str:
    if not info.run:
        task = "text classification" if info.task == "classification" else "text generation"
        return f"{task}; trained outside finetune (no run.json), so only adapter_config.json describes it"
    data = info.run.get("data") or {}
    examples = data.get("train_examples") or data.get("examples")
    files = _train_files(info)
    source = f" from {files}" if files else ""
    if info.task == "classification":
        labels = ", ".join(f"`{label}`" for label in info.run.get("labels") or [])
        return f"text classification into {labels or 'its classes'}, trained on {examples or '?'} examples{source}"
    style = "chat" if info.prompt.chat_template else "plain-text"
    return f"text generation ({style} prompts), trained on {examples or '?'} {data.get('format', '')} examples{source}"


def _train_files(info: AdapterInfo) -> str:
    train = info.job.data.train if info.job is not None else None
    if isinstance(train, str):
        return f"`{Path(train).name}`"
    if isinstance(train, list):
        return ", ".join(f"`{s.hub or Path(str(s.path)).name}`" for s in train)
    return ""


def summary(info: AdapterInfo, name: str, base: str | None) -> str:
    """The card's title and opening: LoRA or full fine-tuning, of which base (linked if a hub id), and what it does."""
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"the local model `{info.base or '?'}`"
    version = info.run.get("finetune_version")
    by = f"trained with finetune {version}" if version else "trained with finetune"
    if info.full:
        head = (f"A fully fine-tuned copy of {base_text} (every weight trained, `lora.enabled: false`), {by}. The "
                "whole model is in this folder; load it like any transformers checkpoint.")
    else:
        cfg = info.adapter_config
        layers = (info.run.get("params") or {}).get("lora_layers")
        on = f" on {layers} linear layers" if layers else ""
        head = (f"A LoRA adapter (r={cfg.get('r')}, alpha {_num(cfg.get('lora_alpha'))}{on}) for {base_text}, {by}. Only "
                "the adapter weights are here; the base model loads separately.")
    return f"# {name}\n\n{head}\n\n**What it does:** {_what(info)}."


def prompt_format(info: AdapterInfo) -> str:
    """The prompt format it expects (prompt.json): what eval measured and what the demo and server send."""
    record = info.prompt
    lines = ["## Prompt format it expects", ""]
    if info.task == "classification":
        lines.append("The text goes to the tokenizer as it is (no template); the model returns one logit per class, "
                     f"in the order {json.dumps(info.run.get('labels') or [])}.")
        return "\n".join(lines)
    if not record.chat_template:
        lines.append("**Plain text, no chat template.** The prompt is tokenized as training saw it (with the "
                     "tokenizer's special tokens) and the answer follows it directly; there is no system prompt.")
        return "\n".join(lines)
    lines.append("**Chat template on.** Messages go through the chat template saved in this folder "
                 "(`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`); the answer is the assistant turn.")
    if record.system_prompt:
        origin = "`data.system_prompt`" if record.system_prompt_source == "data.system_prompt" else "the training rows"
        lines += ["", f"Every training example started with this system prompt (from {origin}); send it too, or the "
                  "answers may differ from what was measured:", "", "```text", record.system_prompt, "```"]
    elif record.system_prompt_source == "varies":
        lines += ["", "The training rows carried different system prompts; send the one that fits your request."]
    else:
        lines += ["", "Training used no system prompt (the chat template may add its own default)."]
    return "\n".join(lines)


def training(info: AdapterInfo, base: str | None) -> str:
    """The Training section: data, method, objective, loop and run settings as one table (empty values left out),
    then the final training metrics."""
    rows: list[tuple[str, Any]] = [("base model", base or info.base), ("task", info.task)]
    rows += _data_rows(info) + _method_rows(info) + _objective_rows(info) + _loop_rows(info) + _run_rows(info)
    table = "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows if v not in (None, "", []))
    out = f"## Training\n\n| setting | value |\n|---|---|\n{table}\n\nThe full job is in `finetune.yaml`, the run record in `run.json`."
    metrics = {k: v for k, v in (info.run.get("metrics") or {}).items() if number(v)}
    if metrics:
        out += "\n\n| training metric | value |\n|---|---:|\n" + "\n".join(f"| {k} | {fmt(v)} |" for k, v in sorted(metrics.items()))
    return out


def _data_rows(info: AdapterInfo) -> list[tuple[str, Any]]:
    data = info.run.get("data") or {}
    return [("training data", _train_files(info)), ("data fingerprint", data.get("fingerprint")),
            ("data format", data.get("format")), ("training examples", data.get("train_examples") or data.get("examples")),
            ("validation examples", data.get("validation_examples")), ("tokens", data.get("tokens")),
            ("labels", ", ".join(info.run.get("labels") or []))]


def _method_rows(info: AdapterInfo) -> list[tuple[str, Any]]:
    params = info.run.get("params") or {}
    trainable = f"{params['trainable']:,} of {params['total']:,}" if params.get("trainable") and params.get("total") else None
    if info.full:
        return [("method", "full fine-tuning (every weight)"), ("trainable parameters", trainable)]
    cfg = info.adapter_config
    targets = cfg.get("target_modules")
    targets = ", ".join(sorted({str(t).rsplit(".", 1)[-1] for t in targets})) if isinstance(targets, list) else targets
    quant = info.job.lora.quantization if info.job is not None else None
    return [("method", "LoRA (peft)"), ("LoRA rank r", cfg.get("r")), ("lora_alpha", cfg.get("lora_alpha")),
            ("lora_dropout", cfg.get("lora_dropout")), ("target modules", targets),
            ("modules trained in full", ", ".join(cfg.get("modules_to_save") or [])), ("rsLoRA", cfg.get("use_rslora")),
            ("DoRA", cfg.get("use_dora")), ("quantization (QLoRA)", quant), ("trainable parameters", trainable)]


def _objective_rows(info: AdapterInfo) -> list[tuple[str, Any]]:
    """The loss (sft, or dpo / orpo / simpo with its coefficients) and the adapter training continued from."""
    objective = info.run.get("objective") or {}
    rows = [("objective", objective.get("name"))] + [(k, v) for k, v in objective.items() if k != "name"]
    return rows + [("started from adapter", info.run.get("started_from"))]


def _loop_rows(info: AdapterInfo) -> list[tuple[str, Any]]:
    if info.job is None:
        return []
    t = info.job.train
    return [("steps", t.max_steps or f"{t.epochs:g} epochs"), ("learning rate", t.learning_rate),
            ("schedule", f"{t.schedule}, warmup {t.warmup_ratio:g}"),
            ("batch", f"{t.micro_batch_size} x {t.gradient_accumulation} accumulation"),
            ("precision", _precision(info.run.get("precision")) or t.precision), ("seed", t.seed)]


def _precision(recorded: Any) -> str | None:
    """run.json records accelerate's mixed precision: 'no' means plain float32."""
    return "fp32 (no autocast)" if recorded == "no" else f"{recorded} autocast" if recorded else None


def _run_rows(info: AdapterInfo) -> list[tuple[str, Any]]:
    run, timings = info.run, info.run.get("timings") or {}
    hw = run.get("hardware") or {}
    device = hw.get("gpu") and f"{hw.get('gpu_count', 1)} x {hw['gpu']}" or (f"CPU, {hw['cpu_count']} cores" if hw.get("cpu_count") else None)
    procs = f", {hw['num_processes']} processes" if (hw.get("num_processes") or 1) > 1 else ""
    train_s = timings.get("train_s")
    verified = (run.get("verification") or {}).get("max_logit_diff")
    packages = run.get("packages") or {}
    return [("training time", f"{train_s:.0f} s" if number(train_s) else None),
            ("peak memory", f"{timings['peak_memory_mb']:.0f} MB" if number(timings.get("peak_memory_mb")) else None),
            ("hardware", device and device + procs), ("trained on", str(run.get("created") or "")[:10]),
            ("versions", ", ".join(f"{k} {packages[k]}" for k in ("finetune", "transformers", "peft", "torch") if k in packages)),
            ("save check", f"reloaded from disk, logits match the trained model (max diff {verified:.2g})" if number(verified) else None)]


def _cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def evaluation(info: AdapterInfo, report: dict[str, Any], where: str) -> str:
    """The Evaluation section from eval.json's `report`: base vs this model per scalar metric and harness task; when
    there is no report, the `finetune eval` command that fills it in."""
    side = "fine-tuned" if info.full else "adapter"
    if not report:
        return (f"## Evaluation\n\nNot evaluated yet: `finetune eval {where}` compares it with its base (add "
                "`--harness TASKS` for lm-evaluation-harness tasks) and fills in this section.")
    parts = ["## Evaluation", "", f"Base model vs this {info.kind} (`finetune eval`, {str(report.get('created', ''))[:10]})."]
    data, metrics = report.get("data"), {k: m for k, m in (report.get("metrics") or {}).items() if isinstance(m, dict) and number(m.get("adapter"))}
    if metrics:
        if isinstance(data, dict):
            names = ", ".join(f"`{Path(p.strip()).name}`" for p in str(data.get("path", "")).split(","))
            parts += ["", f"On {names}: {data.get('evaluated')} of {data.get('rows_total')} rows (fingerprint "
                      f"`{data.get('fingerprint')}`)."]
        parts += ["", f"| metric | base | {side} | delta |", "|---|---:|---:|---:|"]
        parts += [f"| {k} | {fmt(m.get('base'))} | {fmt(m['adapter'])} | {fmt(m.get('delta'))} |" for k, m in metrics.items()]
    harness = report.get("harness")
    if isinstance(harness, dict) and harness.get("results"):
        parts += ["", _harness(harness, side)]
    return "\n".join(parts)


def _harness(h: dict[str, Any], side: str) -> str:
    s = h.get("settings", {})
    chat = "chat template on" + (" with the recorded system prompt" if s.get("system_instruction") else "") \
        if s.get("apply_chat_template") else "chat template off"
    shots = "each task's default few-shot" if s.get("num_fewshot") is None else f"{s['num_fewshot']}-shot"
    limit = f", first {s['limit']} examples per task" if s.get("limit") is not None else ""
    lines = [f"lm-evaluation-harness, same settings on both sides ({chat}, {shots}{limit}):", "",
             f"| task | metric | base | {side} | delta |", "|---|---|---:|---:|---:|"]
    for task, metrics in h["results"].items():
        lines += [f"| {task} | {name} | {_pm(m['base'], m.get('base_stderr'))} | {_pm(m['adapter'], m.get('adapter_stderr'))} "
                  f"| {fmt(m['delta'])} |" for name, m in metrics.items()]
    return "\n".join(lines)


def _pm(value: float, stderr: float | None) -> str:
    return fmt(value) + (f" ± {stderr:.2g}" if number(stderr) else "")


def usage(info: AdapterInfo, base: str | None, where: str, name: str, vllm_problems: list[str] | None) -> str:
    """How to load it with plain transformers (+ peft) and with vLLM."""
    base_ref = base or info.base or "PATH/TO/BASE_MODEL"
    head = "AutoModelForSequenceClassification" if info.task == "classification" else "AutoModelForCausalLM"
    if info.full:
        load = f'model = {head}.from_pretrained(path)'
        imports, names = f"from transformers import AutoTokenizer, {head}", f'path = "{where}"'
    else:
        load = f"model = PeftModel.from_pretrained({head}.from_pretrained(base), adapter)"
        imports = f"from peft import PeftModel\nfrom transformers import AutoTokenizer, {head}"
        names = f'base = "{base_ref}"\nadapter = "{where}"'
    tok_from = "path" if info.full else "adapter"
    code = (f"{imports}\n\n{names}\ntokenizer = AutoTokenizer.from_pretrained({tok_from})  # the tokenizer and chat "
            f"template used in training\n{load}\n{_run_snippet(info)}")
    out = f"## Usage\n\nWith transformers{'' if info.full else ' and peft'}:\n\n```python\n{code}\n```"
    return out + "\n\n" + _vllm(info, base_ref, where, name, vllm_problems)


def _messages(info: AdapterInfo) -> str:
    system = info.prompt.system_prompt
    head = f'{{"role": "system", "content": {json.dumps(system)}}}, ' if system else ""
    return f'[{head}{{"role": "user", "content": "YOUR TEXT"}}]'


def _run_snippet(info: AdapterInfo) -> str:
    if info.task == "classification":
        labels = json.dumps(info.run.get("labels") or [])
        return f'inputs = tokenizer("YOUR TEXT", return_tensors="pt")\nprint({labels}[model(**inputs).logits.argmax(-1).item()])'
    if info.prompt.chat_template:
        run = (f"messages = {_messages(info)}\ninputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
               'return_tensors="pt", return_dict=True)\n')
    else:
        run = 'inputs = tokenizer("YOUR TEXT", return_tensors="pt")\n'
    return run + ("out = model.generate(**inputs, max_new_tokens=128, do_sample=False)\n"
                  'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))')


def _vllm(info: AdapterInfo, base: str, where: str, name: str, problems: list[str] | None) -> str:
    if info.task != "causal_lm":
        return "vLLM: not for this model (a classifier; vLLM serves generation models and their LoRA adapters)."
    if info.full:
        return f"With vLLM:\n\n```bash\nvllm serve {where}\n```"
    if problems:
        listed = "\n".join(f"- {p}" for p in problems)
        return (f"vLLM cannot serve this adapter as it is (`finetune check --target vllm`):\n\n{listed}\n\n"
                "Serve the merged model instead: `finetune merge` writes one.")
    rank = int(info.adapter_config.get("r") or 16)
    rank = next((v for v in VLLM_RANKS if v >= rank), rank)  # vLLM takes only these --max-lora-rank values
    rank_flag = f" --max-lora-rank {rank}" if rank > 16 else ""
    call = "llm.chat(messages, params, lora_request=lora)" if info.prompt.chat_template else 'llm.generate(["YOUR TEXT"], params, lora_request=lora)'
    setup = f"messages = {_messages(info)}\n" if info.prompt.chat_template else ""
    return (f"With vLLM (checked: `finetune check --target vllm` passes):\n\n```bash\nvllm serve {base} --enable-lora "
            f"--lora-modules {name}={where}{rank_flag}\n```\n\n```python\nfrom vllm import LLM, SamplingParams\n"
            f"from vllm.lora.request import LoRARequest\n\nllm = LLM(model=\"{base}\", enable_lora=True"
            f"{f', max_lora_rank={rank}' if rank > 16 else ''})\nlora = LoRARequest(\"{name}\", 1, \"{where}\")\n"
            f"params = SamplingParams(temperature=0, max_tokens=128)\n{setup}print({call}[0].outputs[0].text)\n```")


def files(info: AdapterInfo) -> str:
    """The Files section: each known file present in the folder, with what it holds."""
    present = [(n, d) for n, d in FILES.items() if (info.folder / n).is_file()]
    return "## Files\n\n" + "\n".join(f"- `{n}`: {d}" for n, d in present)
