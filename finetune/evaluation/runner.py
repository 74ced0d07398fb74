"""`finetune eval`: the base model and the adapter on the same examples, the same prompts and the same greedy
decoding; one PeftModel serves both (`disable_adapter()` gives the base), so nothing but the adapter differs. A fully
fine-tuned folder is compared with its base loaded beside it. `--harness` adds lm-evaluation-harness tasks
(evaluation/harness.py) run the same way on both sides."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import load_config
from finetune.data.prompting import prompt_of, stop_token_ids
from finetune.errors import DataError, FinetuneError
from finetune.evaluation.examples import EvalSet, Example, data_config, load_eval_set
from finetune.evaluation.generate import Decoding, decode, encode_prompts, generate
from finetune.evaluation.harness import HarnessOptions, TaskSet, prompt_settings, run_harness
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
from finetune.lifecycle.folder import AdapterInfo, base_source, load_adapter, load_base, read_adapter
from finetune.lifecycle.modelcard import write_card

SIDES = ("base", "adapter")
LOWER_IS_BETTER = {"loss", "perplexity", "general_loss", "general_perplexity"}


@dataclass
class EvalOptions:
    """What `finetune eval` was asked: the adapter, which data and how much, decoding limits, where results go, and the
    optional general-loss and harness evaluations."""

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
    harness: HarnessOptions | None = None  # lm-evaluation-harness tasks on both sides


@dataclass
class EvalResult:
    """The report (what eval.json holds), the folder it was written to, and the files written."""

    report: dict[str, Any]
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def run_eval(opts: EvalOptions) -> EvalResult:
    """Base vs adapter on the same examples, prompts and greedy decoding (plus the general set and harness tasks
    when asked); writes eval.json / eval.md / eval.png and, in the adapter folder, refreshes its model card.

    Options, task files and data are checked before any weight loads; FinetuneError or DataError says what is wrong."""
    info = read_adapter(adapter_folder(opts.adapter))
    tasks = _harness_tasks(info, opts)  # task files and datasets checked before any weight loads
    value = data_value(opts, info, optional=tasks is not None)
    cfg = data_config(info.job.data if info.job else None, str(value)).model_copy(update={"overlong": "truncate"})
    # Truncate, never drop: every example must keep its place so base and adapter outputs line up.
    eval_set = load_eval_set(value, cfg, info.run.get("labels"), opts.max_samples) if value else None
    if eval_set is not None:
        _check_task(info, eval_set)
    source, _ = base_source(info, opts.base)
    sides, tok, info = load_sides(info, opts.base)
    started = time.perf_counter()
    run = _Run(sides, tok, info, cfg, opts)
    results, extra = run.task_data(eval_set) if eval_set is not None else ({}, {})
    if opts.general:
        run.general(opts.general, results, extra)
    if tasks is not None and opts.harness is not None:
        prompt = prompt_settings(info.prompt.chat_template, info.prompt.system_prompt)
        extra["harness"] = run_harness(sides.use, tok, tasks, opts.harness, prompt, sides.how_base)
    report = _report(info, source.ref, eval_set, opts, results, extra, time.perf_counter() - started)

    out_dir = Path(opts.out) if opts.out else info.folder
    files = write_outputs(report, out_dir)
    if out_dir.resolve() == info.folder:  # eval.json sits beside the model: its card shows the new results
        card = write_card(info)
        files += [card] if card else []
    return EvalResult(report, out_dir, files)


def _harness_tasks(info: AdapterInfo, opts: EvalOptions) -> TaskSet | None:
    if opts.harness is None:
        return None
    if info.task == "classification":
        raise FinetuneError(f"--harness runs language-model tasks; {info.name} is a classification {info.kind} "
                            "(its own metrics come from --data rows with text and label)")
    return TaskSet(opts.harness.tasks)


def load_sides(info: AdapterInfo, base: str | None) -> tuple[Sides, Any, AdapterInfo]:
    """The two models compared, on the GPU when there is one. A new classification head starts from seed 0, so the
    base side of a classifier is repeatable."""
    _seed()
    if info.full:
        model, tok, info = load_adapter(info.folder)
        _seed()
        return Sides(_to_device(model), _to_device(load_base(info, tok, base))), tok, info
    model, tok, info = load_adapter(info.folder, base)  # checks the adapter fits the base before loading it
    return Sides(_to_device(model)), tok, info


class Sides:
    """An adapter: one PeftModel, the base side inside `disable_adapter()` (one load: nothing else can differ).
    A fully fine-tuned folder: its base model, loaded separately with the same settings."""

    def __init__(self, model: Any, base: Any = None):
        self.model, self.base = model, base

    @property
    def how_base(self) -> str:
        if self.base is not None:
            return "the base model loaded separately with the same model settings (full fine-tuning: no adapter to disable)"
        return "the same loaded PeftModel with its adapter disabled (one load: weights, dtype, device and tokenizer are shared)"

    @contextmanager
    def use(self, side: str) -> Iterator[Any]:
        """The model that plays `side` (base | adapter) inside the block."""
        if self.base is not None or side == "adapter":
            yield self.base if side == "base" else self.model
            return
        with self.model.disable_adapter():
            yield self.model


def adapter_folder(ref: str) -> Path:
    """An adapter folder as given, or the folder a job YAML saved its adapter to."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_config(path).output.adapter_dir
    return path


def data_value(opts: EvalOptions, info: Any, optional: bool = False) -> Any:
    """--data, else the job's data for --split (a file, or the job's list of sources). `optional` (with --harness):
    None instead of an error when there is none, and the task metrics are skipped."""
    if opts.data:
        return opts.data
    if opts.split not in ("validation", "train"):
        raise FinetuneError(f"--split {opts.split!r}: use validation or train, or pass --data FILE")
    if info.job is None:
        if optional:
            return None
        raise FinetuneError(f"{info.folder} has no finetune.yaml naming its data; pass --data FILE")
    value = info.job.data.validation if opts.split == "validation" else info.job.data.train
    if not value and optional:
        return None
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
    """Each measurement taken twice, on the base side then on the adapter side (`Sides`)."""

    def __init__(self, sides: Sides, tok: Any, info: Any, cfg: Any, opts: EvalOptions):
        self.sides, self.model, self.tok, self.info, self.cfg, self.opts = sides, sides.model, tok, info, cfg, opts

    def task_data(self, eval_set: EvalSet) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.classification(eval_set) if self.info.task == "classification" else self.causal(eval_set)

    def causal(self, eval_set: EvalSet) -> tuple[dict[str, Any], dict[str, Any]]:
        chat = self.info.chat or any(_answer(e).record["kind"] == "chat" for e in eval_set.examples)
        encoded = encode([_answer(e) for e in eval_set.examples], self.cfg, self.tok, chat, None)
        pairs = encode_pairs(eval_set.examples, self.cfg, self.tok, chat)
        gen = self._generation_setup(eval_set, chat) if eval_set.generative else None
        refs = [str(e.reference) for e in eval_set.examples]
        json_match = (references_are_json(refs) if self.opts.json_match is None else self.opts.json_match) and gen is not None
        sides: dict[str, Any] = {}
        for side in SIDES:
            with self.sides.use(side) as model:
                loss, _ = forward(model, self.tok, encoded, self.opts.batch_size)
                metrics = preference_metrics(model, self.tok, pairs, self.opts.batch_size) if pairs else {}
                outputs, seconds = self._generate(model, gen) if gen else ([], 0.0)
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

    def _generate(self, model: Any, gen: tuple[list[list[int]], Any]) -> tuple[list[str], float]:
        t0 = time.perf_counter()
        outputs = decode(self.tok, generate(model, self.tok, gen[0], gen[1]))
        return outputs, time.perf_counter() - t0

    def classification(self, eval_set: EvalSet) -> tuple[dict[str, Any], dict[str, Any]]:
        labels = self.info.run.get("labels") or [str(i) for i in range(self.model.config.num_labels)]
        encoded = encode(eval_set.examples, self.cfg, self.tok, False, labels)
        refs = [int(e.reference) for e in eval_set.examples if e.reference is not None]
        sides: dict[str, Any] = {}
        for side in SIDES:
            with self.sides.use(side) as model:
                loss, preds = forward(model, self.tok, encoded, self.opts.batch_size)
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
            with self.sides.use(side) as model:
                loss, _ = forward(model, self.tok, encoded, self.opts.batch_size)
            sides.setdefault(side, {"metrics": {}, "outputs": []})["metrics"].update(general_loss=loss["loss"], general_perplexity=loss["perplexity"])
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


def _report(info: Any, base_ref: str, eval_set: EvalSet | None, opts: EvalOptions, sides: dict[str, Any],
            extra: dict[str, Any], seconds: float) -> dict[str, Any]:
    report: dict[str, Any] = {
        "adapter": str(info.folder), "kind": info.kind, "base_model": base_ref, "task": info.task,
        "created": runinfo.utc_now(), "packages": runinfo.package_versions(),
        "data": _data(info, eval_set, opts), "metrics": _compare(sides) if sides else {},
        "examples": _examples(eval_set, sides, extra.get("labels"), bool(extra.get("decoding", {}).get("chat_template"))),
        "timings": {"eval_s": round(seconds, 2), **{f"{s}_generate_s": v["generate_s"] for s, v in sides.items() if "generate_s" in v}},
    }
    report.update(extra)
    return report


def _data(info: Any, eval_set: EvalSet | None, opts: EvalOptions) -> dict[str, Any] | None:
    """What the task metrics were measured on; None when they were skipped (--harness without task data)."""
    if eval_set is None:
        return None
    return {"path": ", ".join(_abs(p) for p in eval_set.paths), "split": None if opts.data else opts.split,
            "format": eval_set.format, "rows_total": eval_set.rows_total, "evaluated": len(eval_set.examples),
            "content_sha256": eval_set.file_sha256, "fingerprint": eval_set.fingerprint,
            "train_fingerprint": info.run.get("data", {}).get("fingerprint")}


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


def _examples(eval_set: EvalSet | None, sides: dict[str, Any], labels: list[str] | None, chat: bool) -> list[dict[str, Any]]:
    """Every example with both outputs; class references are shown by name like the predictions."""

    if eval_set is None or not sides["base"]["outputs"]:  # no task data, or text rows: loss only
        return []
    refs = [labels[int(e.reference or 0)] if labels else e.reference for e in eval_set.examples]
    prompts = [e.record.get("text") if labels else prompt_of(e.record, chat) for e in eval_set.examples]
    return [{"prompt": p, "reference": r, "base": b, "adapter": a} for p, r, b, a
            in zip(prompts, refs, sides["base"]["outputs"], sides["adapter"]["outputs"], strict=True)]
