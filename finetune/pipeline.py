"""`finetune train`: the pipeline, stage by stage. Each stage lives in its own package."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from finetune import __version__
from finetune.config import JobConfig, dump_config
from finetune.config.redact import redact
from finetune.data import DataBundle, build_data
from finetune.data.prompt_record import describe_prompts
from finetune.lifecycle import runinfo
from finetune.lifecycle.fit import check_adapter_fits
from finetune.lifecycle.folder import read_adapter
from finetune.lifecycle.save import SaveRequest, check_output_free, save_adapter
from finetune.model import (
    check_pair,
    load_base_model,
    load_tokenizer,
    lora_of_adapter,
    param_report,
    resolve_source,
    training_dtype,
    wrap_lora,
)
from finetune.training import TrainResult, make_accelerator, train
from finetune.training.preference import check_objective

JOB_FILE = "job.yaml"  # in the run's work folder: the resolved job, written when training starts


def run_train(cfg: JobConfig) -> Path:
    """Train the job and save its verified adapter; returns the adapter folder."""
    from accelerate.utils import set_seed

    check_output_free(cfg)
    if cfg.model.adapter:  # continuing an adapter: its LoRA settings, before anything is loaded
        cfg = cfg.model_copy(update={"lora": lora_of_adapter(cfg.model.adapter, cfg.lora, cfg.task)})
    work = cfg.output.work_dir
    accelerator = make_accelerator(cfg.train, work)
    model_cfg = training_dtype(cfg.model, accelerator.mixed_precision, not cfg.lora.enabled, cfg.lora.quantization)
    cfg = cfg.model_copy(update={"model": model_cfg})
    say = accelerator.print
    say(redact(describe_job(cfg, work / JOB_FILE)))
    set_seed(cfg.train.seed)
    timings: dict[str, float] = {}
    with _timed(timings, "load_tokenizer_s"):
        source = resolve_source(cfg.model)
        tokenizer = load_tokenizer(source, cfg.model)
    with _timed(timings, "data_s"):
        bundle = build_data(cfg.data, tokenizer, cfg.task)
    say(f"data: {bundle.stats}")
    check_objective(cfg.train.objective, bundle.format, cfg.lora.enabled)
    with _timed(timings, "load_model_s"):
        if cfg.model.adapter:
            check_adapter_fits(read_adapter(cfg.model.adapter), source, cfg.model)  # before any weight is loaded
        base = load_base_model(source, cfg.model, cfg.task, cfg.lora.quantization, bundle.labels)
        check_pair(base, tokenizer, source, cfg.task)
        net = wrap_lora(base, cfg.lora, cfg.task, start=cfg.model.adapter)
    say(param_report(net).describe(cfg.lora.r if cfg.lora.enabled else None))
    with _timed(timings, "train_s"):
        result = train(net, bundle, cfg.train, accelerator, work, cfg.model_dump(), start_adapter=cfg.model.adapter,
                       start_files={JOB_FILE: dump_config(cfg, comments=False)})
    with _timed(timings, "save_s"):
        info = _run_info(cfg, bundle, result, timings, accelerator, net)
        prompt = describe_prompts(cfg.data, bundle.chat)
        request = SaveRequest(cfg, source, info, _probe(bundle), bundle.labels, logs=work, prompt=prompt)
        folder = save_adapter(net if result.model is None else result.model, tokenizer, request, accelerator)
    say(f"{'adapter' if cfg.lora.enabled else 'fully fine-tuned model'} saved and verified: {folder.resolve()}")
    return folder


def _probe(bundle: DataBundle) -> dict[str, Any]:
    """Two examples as a padded batch: what the save verification runs through the trained and the reloaded model."""
    rows = (bundle.validation or bundle.train)[:2]
    return getattr(bundle.collator, "padded", bundle.collator)(rows)


def describe_job(cfg: JobConfig, written: Path) -> str:
    """What differs from the defaults, one dotted key a line (the whole resolved job is in `written`)."""
    changes = _flatten(cfg.model_dump(exclude_defaults=True, mode="json"))
    lines = [f"job: {len(changes)} settings differ from the defaults; the full resolved job is in {written}"]
    return "\n".join(lines + [f"  {key}: {_inline(value)}" for key, value in changes.items()])


def _inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _run_info(cfg: JobConfig, bundle: DataBundle, result: TrainResult, timings: dict[str, float], accelerator: Any,
              net: Any) -> dict[str, Any]:
    params = param_report(net)
    return {
        "finetune_version": __version__,
        "created": runinfo.utc_now(),
        "task": cfg.task,
        "base_model": cfg.model.name_or_path,
        "packages": runinfo.package_versions(),
        "git_commit": runinfo.git_commit(),
        "hardware": runinfo.hardware(accelerator.num_processes),
        "precision": accelerator.mixed_precision,
        "data": {"fingerprint": bundle.fingerprint, "format": bundle.format, "chat_template": bundle.chat, **bundle.stats},
        "labels": bundle.labels,
        "params": {"trainable": params.trainable, "total": params.total, "lora_layers": params.wrapped,
                   "frozen_dtype": _frozen_dtype(net)},
        "objective": result.objective,
        "started_from": str(Path(cfg.model.adapter).resolve()) if cfg.model.adapter else None,
        "metrics": result.metrics(),
        "resumed_from": result.resumed_from,
        "timings": {**timings, "train_s": round(result.seconds, 2), "peak_memory_mb": round(result.peak_memory_mb, 1)},
        "throughput": {"input_tokens": result.input_tokens, "positions": result.positions,
                       "input_tokens_per_s": round(result.input_tokens / max(result.seconds, 1e-9), 1)},
    }


def _frozen_dtype(net: Any) -> str | None:
    return next((str(p.dtype).removeprefix("torch.") for p in net.parameters() if not p.requires_grad), None)


class _timed:
    def __init__(self, sink: dict[str, float], key: str):
        self.sink, self.key = sink, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.sink[self.key] = round(time.perf_counter() - self.start, 2)
