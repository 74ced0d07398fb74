"""`finetune eval`: the base model and the adapter on the same examples, the same prompts and the same greedy
decoding; one PeftModel serves both (`disable_adapter()` gives the base), so nothing but the adapter differs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import load_config
from finetune.data.prompting import prompt_of, stop_token_ids
from finetune.errors import DataError, FinetuneError
from finetune.evaluation.examples import EvalSet, Example, data_config, load_eval_set
from finetune.evaluation.generate import Decoding, decode, encode_prompts, generate
from finetune.evaluation.preference import encode_pairs, preference_metrics
from finetune.evaluation.report import write_outputs
from finetune.evaluation.scoring import (
    classification_metrics,
    encode,
    forward,
    generation_metrics,
    references_are_json,
)
from finetune.lifecycle import runinfo
from finetune.lifecycle.folder import base_source, load_adapter, read_adapter

SIDES = ("base", "adapter")
LOWER_IS_BETTER = {"loss", "perplexity", "general_loss", "general_perplexity"}


@dataclass
class EvalOptions:
    adapter: str  # an adapter folder, or the job YAML that trained it
    data: str | None = None  # default: the job's file for `split`
    split: str = "validation"
    max_samples: int | None = None
    base: str | None = None  # another copy of the base model (checked to fit the adapter)
    out: str | None = None  # default: the adapter folder
    general: str | None = None  # a general dataset: the loss the adapter costs there
    max_new_tokens: int | None = None  # default: longest reference + 16 tokens
    batch_size: int = 8
    json_match: bool | None = None  # None: when every reference is JSON


@dataclass
class EvalResult:
    report: dict[str, Any]
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def run_eval(opts: EvalOptions) -> EvalResult:
    info = read_adapter(adapter_folder(opts.adapter))
    value = data_value(opts, info)
    # Truncate, never drop: every example must keep its place so base and adapter outputs line up.
    cfg = data_config(info.job.data if info.job else None, str(value)).model_copy(update={"overlong": "truncate"})
    eval_set = load_eval_set(value, cfg, info.run.get("labels"), opts.max_samples)
    _check_task(info, eval_set)
    source, _ = base_source(info, opts.base)
    _seed()
    model, tok, info = load_adapter(info.folder, opts.base)  # checks the adapter fits the base before loading it
    model = _to_device(model)
    started = time.perf_counter()
    run = _Run(model, tok, info, cfg, opts)
    sides, extra = run.classification(eval_set) if info.task == "classification" else run.causal(eval_set)
    if opts.general:
        run.general(opts.general, sides, extra)
    report = _report(info, source.ref, eval_set, opts, sides, extra, time.perf_counter() - started)

    out_dir = Path(opts.out) if opts.out else info.folder
    return EvalResult(report, out_dir, write_outputs(report, out_dir))


def adapter_folder(ref: str) -> Path:
    """An adapter folder as given, or the folder a job YAML saved its adapter to."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_config(path).output.adapter_dir
    return path


def data_value(opts: EvalOptions, info: Any) -> Any:
    """--data, else the job's data for --split (a file, or the job's list of sources)."""
    if opts.data:
        return opts.data
    if opts.split not in ("validation", "train"):
        raise FinetuneError(f"--split {opts.split!r}: use validation or train, or pass --data FILE")
    if info.job is None:
        raise FinetuneError(f"{info.folder} has no finetune.yaml naming its data; pass --data FILE")
    value = info.job.data.validation if opts.split == "validation" else info.job.data.train
    if not value:
        held_out = " (its validation rows were held out of data.train by data.val_size)" if info.job.data.val_size else ""
        raise FinetuneError(f"the job of {info.folder} has no data.validation file{held_out}; pass --data FILE "
                            "(held-out rows), or --split train to score the training rows")
    return value


def _check_task(info: Any, eval_set: EvalSet) -> None:
    kinds = {e.record["kind"] for e in eval_set.examples}
    if info.task == "classification" and kinds != {"cls"}:
        raise DataError(f"{eval_set.paths[0]}: a classification adapter needs rows with text and label, got format "
                        f"'{eval_set.format}'")
    if info.task != "classification" and "cls" in kinds:
        raise DataError(f"{eval_set.paths[0]}: rows with text and label are classification data, but {info.folder.name} "
                        "is a language-model adapter; give prompt/completion or chat rows")


def _seed() -> None:
    # A classifier's new head is randomly initialised when the base loads; seeding makes the "base" side repeatable.
    import torch

    torch.manual_seed(0)


def _to_device(model: Any) -> Any:
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


class _Run:
    """One loaded PeftModel evaluated twice per measurement: adapter off (the base), then on."""

    def __init__(self, model: Any, tok: Any, info: Any, cfg: Any, opts: EvalOptions):
        self.model, self.tok, self.info, self.cfg, self.opts = model, tok, info, cfg, opts

    def causal(self, eval_set: EvalSet) -> tuple[dict[str, Any], dict[str, Any]]:
        chat = self.info.chat or any(_answer(e).record["kind"] == "chat" for e in eval_set.examples)
        encoded = encode([_answer(e) for e in eval_set.examples], self.cfg, self.tok, chat, None)
        pairs = encode_pairs(eval_set.examples, self.cfg, self.tok, chat)
        gen = self._generation_setup(eval_set, chat) if eval_set.generative else None
        refs = [str(e.reference) for e in eval_set.examples]
        json_match = (references_are_json(refs) if self.opts.json_match is None else self.opts.json_match) and gen is not None
        sides: dict[str, Any] = {}
        for side in SIDES:
            with _adapter(self.model, side == "adapter"):
                loss, _ = forward(self.model, self.tok, encoded, self.opts.batch_size)
                metrics = preference_metrics(self.model, self.tok, pairs, self.opts.batch_size) if pairs else {}
                outputs, seconds = self._generate(gen) if gen else ([], 0.0)
            metrics.update(generation_metrics(outputs, refs, json_match) if gen else {})
            sides[side] = {"metrics": {**metrics, "loss": loss["loss"], "perplexity": loss["perplexity"]},
                           "outputs": outputs, "generate_s": round(seconds, 2)}
        return sides, ({"decoding": gen[1].to_dict()} if gen else {})

    def _generation_setup(self, eval_set: EvalSet, chat: bool) -> tuple[list[list[int]], Any]:
        prompts = encode_prompts(self.tok, [prompt_of(e.record, chat) for e in eval_set.examples], chat)
        refs = [str(e.reference) for e in eval_set.examples]
        decoding = Decoding(self.opts.max_new_tokens or _default_new_tokens(self.tok, refs), self.opts.batch_size,
                            chat, stop_token_ids(self.tok, self.model.generation_config))
        return prompts, decoding

    def _generate(self, gen: tuple[list[list[int]], Any]) -> tuple[list[str], float]:
        t0 = time.perf_counter()
        outputs = decode(self.tok, generate(self.model, self.tok, gen[0], gen[1]))
        return outputs, time.perf_counter() - t0

    def classification(self, eval_set: EvalSet) -> tuple[dict[str, Any], dict[str, Any]]:
        labels = self.info.run.get("labels") or [str(i) for i in range(self.model.config.num_labels)]
        encoded = encode(eval_set.examples, self.cfg, self.tok, False, labels)
        refs = [int(e.reference) for e in eval_set.examples if e.reference is not None]
        sides: dict[str, Any] = {}
        for side in SIDES:
            with _adapter(self.model, side == "adapter"):
                loss, preds = forward(self.model, self.tok, encoded, self.opts.batch_size)
            metrics = {**classification_metrics(preds, refs, len(labels)), "loss": loss["loss"]}
            sides[side] = {"metrics": metrics, "outputs": [labels[p] for p in preds]}
        return sides, {"labels": labels}

    def general(self, path: str, sides: dict[str, Any], extra: dict[str, Any]) -> None:
        """What the adapter costs: the loss on a general dataset (text, prompt/completion or chat rows)."""

        if self.info.task == "classification":
            raise FinetuneError("--general measures language-model loss; it does not apply to a classification adapter")
        cfg = self.cfg.model_copy(update={"format": "auto"})  # its own shape, whatever the task data's format
        general = load_eval_set(path, cfg, None, self.opts.max_samples)
        if any(e.record["kind"] == "cls" for e in general.examples):
            raise DataError(f"{path}: --general needs text, prompt/completion or chat rows, not text+label rows")
        encoded = encode(general.examples, cfg, self.tok, self.info.chat or general.format == "chat", None)
        for side in SIDES:
            with _adapter(self.model, side == "adapter"):
                loss, _ = forward(self.model, self.tok, encoded, self.opts.batch_size)
            sides[side]["metrics"].update(general_loss=loss["loss"], general_perplexity=loss["perplexity"])
        extra["general"] = {"path": str(Path(path).resolve()), "rows": len(general.examples), "format": general.format,
                            "fingerprint": general.fingerprint}


def _answer(example: Example) -> Example:
    """The example whose answer the loss and generation score: a preference pair's chosen side."""
    if example.record["kind"] != "preference":
        return example
    return Example(example.record["chosen"], example.where, example.reference)


def _default_new_tokens(tok: Any, refs: list[str]) -> int:
    longest = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs)
    return min(longest + 16, 512)


class _adapter:
    """Context: the adapter on (as loaded) or off (the base model), restoring nothing else."""

    def __init__(self, model: Any, enabled: bool):
        self.model, self.enabled = model, enabled

    def __enter__(self) -> None:
        self.ctx = None if self.enabled else self.model.disable_adapter()
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _report(info: Any, base_ref: str, eval_set: EvalSet, opts: EvalOptions, sides: dict[str, Any],
            extra: dict[str, Any], seconds: float) -> dict[str, Any]:

    report: dict[str, Any] = {
        "adapter": str(info.folder), "base_model": base_ref, "task": info.task, "created": runinfo.utc_now(),
        "packages": runinfo.package_versions(),
        "data": {"path": ", ".join(_abs(p) for p in eval_set.paths), "split": None if opts.data else opts.split,
                 "format": eval_set.format, "rows_total": eval_set.rows_total, "evaluated": len(eval_set.examples),
                 "content_sha256": eval_set.file_sha256, "fingerprint": eval_set.fingerprint,
                 "train_fingerprint": info.run.get("data", {}).get("fingerprint")},
        "metrics": _compare(sides),
        "examples": _examples(eval_set, sides, extra.get("labels"), bool(extra.get("decoding", {}).get("chat_template"))),
        "timings": {"eval_s": round(seconds, 2), **{f"{s}_generate_s": v["generate_s"] for s, v in sides.items() if "generate_s" in v}},
    }
    report.update(extra)
    return report


def _abs(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _compare(sides: dict[str, Any]) -> dict[str, Any]:
    base, adapter = sides["base"]["metrics"], sides["adapter"]["metrics"]
    out: dict[str, Any] = {}
    for name, value in base.items():
        if isinstance(value, (int, float)):
            out[name] = {"base": value, "adapter": adapter[name], "delta": adapter[name] - value,
                         "better": "lower" if name in LOWER_IS_BETTER else "higher"}
        else:  # e.g. the confusion matrix
            out[name] = {"base": value, "adapter": adapter[name]}
    return out


def _examples(eval_set: EvalSet, sides: dict[str, Any], labels: list[str] | None, chat: bool) -> list[dict[str, Any]]:
    """Every example with both outputs; class references are shown by name like the predictions."""

    if not sides["base"]["outputs"]:  # text rows: loss only
        return []
    refs = [labels[int(e.reference or 0)] if labels else e.reference for e in eval_set.examples]
    prompts = [e.record.get("text") if labels else prompt_of(e.record, chat) for e in eval_set.examples]
    return [{"prompt": p, "reference": r, "base": b, "adapter": a} for p, r, b, a
            in zip(prompts, refs, sides["base"]["outputs"], sides["adapter"]["outputs"], strict=True)]
