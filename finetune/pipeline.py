"""`finetune train`: the pipeline, stage by stage. Each stage lives in its own module."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finetune.config import JobConfig, dump_config


def run_train(cfg: JobConfig) -> Path:
    from accelerate.utils import set_seed

    from finetune import data, lora, model, save, train

    save.check_output_free(cfg)
    work = work_dir(cfg)
    accelerator = train.make_accelerator(cfg.train, work)
    say = accelerator.print
    say(_redacted(dump_config(cfg, comments=False)))
    set_seed(cfg.train.seed)
    timings: dict[str, float] = {}
    with _timed(timings, "load_tokenizer_s"):
        source = model.resolve_source(cfg.model)
        tokenizer = model.load_tokenizer(source, cfg.model)
    with _timed(timings, "data_s"):
        bundle = data.build_data(cfg.data, tokenizer, cfg.task)
    say(f"data: {bundle.stats}")
    with _timed(timings, "load_model_s"):
        base = model.load_base_model(source, cfg.model, cfg.task, cfg.lora, bundle.labels)
        model.check_pair(base, tokenizer, source, cfg.task)
        net = lora.wrap_lora(base, cfg.lora, cfg.task)
    say(lora.param_report(net).describe(cfg.lora.r))
    with _timed(timings, "train_s"):
        result = train.train(net, bundle, cfg.train, accelerator, work, cfg.model_dump())
    with _timed(timings, "save_s"):
        request = save.SaveRequest(cfg, source, _run_info(cfg, bundle, result, timings, accelerator, net), _probe(bundle), bundle.labels)
        folder = save.save_adapter(net if result.model is None else result.model, tokenizer, request, accelerator)
    if accelerator.is_main_process:
        _copy_logs(work, folder, cfg.train.plot)
    say(f"adapter saved and verified: {folder.resolve()}")
    return folder


def work_dir(cfg: JobConfig) -> Path:
    """Metrics and checkpoints live here during training; the adapter folder is only written, whole, at the end."""
    return Path(cfg.output.dir) / ".work" / cfg.output.run_name


def _probe(bundle: Any) -> dict[str, Any]:
    rows = (bundle.validation or bundle.train)[:2]
    return bundle.collator(rows)


def _run_info(cfg: JobConfig, bundle: Any, result: Any, timings: dict[str, float], accelerator: Any, net: Any) -> dict[str, Any]:
    from finetune import __version__, lora, runinfo

    params = lora.param_report(net)
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
        "params": {"trainable": params.trainable, "total": params.total, "lora_layers": params.wrapped},
        "metrics": result.metrics(),
        "timings": {**timings, "train_s": round(result.seconds, 2), "peak_memory_mb": round(result.peak_memory_mb, 1)},
    }


def _copy_logs(work: Path, folder: Path, plot: bool) -> None:
    import shutil

    from finetune.trackers import plot_losses

    for name in ("metrics.jsonl", "profile.txt"):
        if (work / name).exists():
            shutil.copy2(work / name, folder / name)
    if plot:
        plot_losses(work / "metrics.jsonl", folder / "loss.png")


class _timed:
    def __init__(self, sink: dict[str, float], key: str):
        self.sink, self.key = sink, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.sink[self.key] = round(time.perf_counter() - self.start, 2)


def _redacted(text: str) -> str:
    """Hide values of keys that look like secrets before the config is printed."""
    import re

    return re.sub(r"(?im)^(\s*\w*(token|secret|password|api_key)\w*:\s*).+$", r"\1***", text)
