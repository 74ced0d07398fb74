"""Merge an adapter into its base, save the merged checkpoint, then prove it behaves like base + adapter.

The merge always happens in float32 on a plain (never quantized) base and is cast only at the end: merging into
bf16 rounds the update away, and merging into 4-bit weights re-quantizes them (logits moved by up to ~4.6). A QLoRA
adapter is merged into the *de-quantized* 4-bit base, the weights it was actually trained against. The output is
written through finetune.files.atomic_dir: moved into place only after it reloads and matches the reference.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.data.prompting import prompt_ids, stop_token_ids
from finetune.errors import FinetuneError, VerificationError
from finetune.files import atomic_dir, check_replaceable, write_json
from finetune.lifecycle import runinfo
from finetune.lifecycle.fit import check_adapter_fits
from finetune.lifecycle.folder import AdapterInfo, base_source, read_adapter
from finetune.model import check_pair, load_base_model, set_pad_token

if TYPE_CHECKING:
    import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Largest float32 logit difference accepted for the merge itself, relative to max(1, largest |logit|). A bf16/fp16
# output adds its own rounding, which is measured (float32 merged vs cast merged) rather than guessed.
MERGE_TOLERANCE = 1e-4
DEFAULT_PROMPTS = ("Hello!", "What is the capital of France?", "Write one short sentence about the sea.")
NEW_TOKENS = 12
KIND = "merged-model"


@dataclass
class MergeReport:
    """What `finetune merge` wrote (folder, dtype, shards) and how it was verified: the merged checkpoint, reloaded
    from disk, against base + adapter on probe prompts (logit differences against a tolerance, greedy agreement)."""

    out: str
    dtype: str
    quantized_base: bool  # True: merged into the de-quantized 4/8-bit base
    prompts: int
    max_logit_diff: float  # merged checkpoint, reloaded from disk, vs base + adapter
    tolerance: float  # float32 merge tolerance + the measured rounding cost of the saved dtype
    merge_diff: float  # float32 merged model vs base + adapter, before casting: the merge arithmetic alone
    adapter_effect: float  # how far the adapter moves the base's logits: a merge check means little if ~0
    greedy_identical: int
    greedy_ties: int  # greedy outputs that diverged only where the reference's top two logits were within tolerance
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    task: str = "causal_lm"

    def describe(self) -> str:
        """What `finetune merge` prints: where the model went, and the verification's figures."""
        base = "de-quantized 4/8-bit base" if self.quantized_base else "float32 base"
        return (
            f"merged into the {base}, saved as {self.dtype} in {len(self.shards)} shard(s): {self.out}\n"
            f"verification on {self.prompts} prompts: reloaded merged vs base + adapter max |logit diff| "
            f"{self.max_logit_diff:.3g} (tolerance {self.tolerance:.3g}; float32 merge alone {self.merge_diff:.3g}; "
            f"the adapter itself moves logits by up to {self.adapter_effect:.3g}); "
            + ("greedy outputs" if self.task == "causal_lm" else "predicted classes")
            + f" identical {self.greedy_identical}/{self.prompts}"
            + (f" ({self.greedy_ties} diverged at a near-tie)" if self.greedy_ties else "")
        )


@dataclass
class _Reference:
    """What base + adapter produce on each probe, recorded before merging mutates the model."""

    logits: list[torch.Tensor]
    base_logits: list[torch.Tensor]
    greedy: list[list[int]]
    margins: list[list[float]]  # top-1 minus top-2 logit at each greedy step


def merge_adapter(
    folder: str | Path, out: str | Path, dtype: str = "bf16", base: str | None = None,
    prompts: list[str] | None = None, max_shard_size: str = "2GB", overwrite: bool = False,
) -> MergeReport:
    """Merge in float32, save as `dtype` into `out`, and verify the reloaded folder against base + adapter."""
    if dtype not in DTYPES:
        raise FinetuneError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    if (Path(folder) / "config.json").is_file() and not (Path(folder) / "adapter_config.json").is_file():
        raise FinetuneError(f"{folder} is a whole model saved by full fine-tuning: there is no adapter to merge; "
                            "load the folder directly")
    info = read_adapter(folder)
    out = Path(out)
    check_replaceable(out, KIND, overwrite, flag="--overwrite")  # before minutes of work, and again at the end
    model, tok, quantized = _reference_model(info, base)
    probes = probe_ids(info, tok, prompts)
    reference = _record(model, tok, probes, info.task)
    merged = _merge(model)
    exact = _logits(merged, probes)
    merge_diff = _max_diff(exact, reference.logits)
    scale = max(1.0, max(float(t.abs().max()) for t in reference.logits))
    if not merge_diff <= MERGE_TOLERANCE * scale:
        raise VerificationError(
            f"the float32 merge does not reproduce base + adapter: max |logit diff| {merge_diff:.3g} (tolerance "
            f"{MERGE_TOLERANCE * scale:.3g}). Nothing was written. {_effect_hint(reference)}"
        )
    merged = _cast(merged, dtype)
    rounding = _max_diff(_logits(merged, probes), exact)  # what the saved dtype alone costs
    tol = MERGE_TOLERANCE * scale + 1.05 * rounding
    with atomic_dir(out, KIND, overwrite, flag="--overwrite") as tmp:
        shards = _save(merged, tok, tmp, max_shard_size)
        del merged, model
        report = verify_merged(tmp, reference, probes, info, dtype, tol)
        report.merge_diff = merge_diff
        report.quantized_base, report.shards = quantized, shards
        report.seconds = round(time.perf_counter() - start, 2)
        report.out = str(out.resolve())
        write_json(tmp / "merge.json", _provenance(info, report))
    return report


def _reference_model(info: AdapterInfo, base: str | None) -> tuple[Any, Any, bool]:
    """float32 base + adapter (unmerged). A QLoRA base is loaded quantized, as in training, then de-quantized."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    source, model_cfg = base_source(info, base)
    check_adapter_fits(info, source, model_cfg)
    model_cfg = model_cfg.model_copy(update={"dtype": "float32"})
    lora_cfg = info.job.lora if info.job is not None else None
    quantized = lora_cfg is not None and lora_cfg.quantization != "none"
    # The adapter's own tokenizer (and chat template) when saved with it; else the base's (adapters from elsewhere).
    has_tok = (info.folder / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(info.folder) if has_tok else source.folder)
    set_pad_token(tok)
    quantization = lora_cfg.quantization if lora_cfg is not None else "none"
    model: Any = load_base_model(source, model_cfg, info.task, quantization, info.run.get("labels"))
    if quantized:
        model = model.dequantize()  # the nf4/int8 values the adapter saw, as plain float Linear layers
    model = model.to(torch.float32)
    check_pair(model, tok, source, info.task)
    model = PeftModel.from_pretrained(model, str(info.folder))
    model.eval()
    return model, tok, quantized


def probe_ids(info: AdapterInfo, tok: Any, prompts: list[str] | None = None) -> list[list[int]]:
    """Token ids of the probe prompts, rendered exactly as training rendered them (chat template or plain)."""
    texts: list[Any] = list(prompts) if prompts else [*DEFAULT_PROMPTS, *_training_prompts(info, 2)]
    if info.task == "classification":
        return [list(tok(t if isinstance(t, str) else t[-1]["content"])["input_ids"]) for t in texts]
    return [prompt_ids(tok, t, info.chat) for t in texts]


def _training_prompts(info: AdapterInfo, n: int) -> list[Any]:
    """A few in-domain prompts from the training file, where the adapter matters most (skipped if it is gone)."""
    train = info.job.data.train if info.job is not None else None
    if not isinstance(train, str) or not train.endswith(".jsonl") or not Path(train).is_file():
        return []
    found: list[Any] = []
    with open(train, encoding="utf-8") as fh:
        for line in fh:
            if len(found) >= n:
                break
            row = json.loads(line) if line.strip() else {}
            if isinstance(row.get("prompt"), str):
                found.append(row["prompt"])
            elif isinstance(row.get("text"), str):
                found.append(row["text"])
            elif isinstance(row.get("messages"), list):
                turns = row["messages"]
                last_user = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=-1)
                if last_user >= 0:
                    found.append(turns[: last_user + 1])
    return found


def _record(model: Any, tok: Any, probes: list[list[int]], task: str) -> _Reference:
    import torch

    ref = _Reference([], [], [], [])
    with torch.no_grad():
        for ids in probes:
            x = torch.tensor([ids])
            ref.logits.append(model(input_ids=x).logits[0].float())
            with model.disable_adapter():
                ref.base_logits.append(model(input_ids=x).logits[0].float())
            if task == "causal_lm":
                seq, margins = _greedy(model, tok, x)
                ref.greedy.append(seq)
                ref.margins.append(margins)
    return ref


def _greedy(model: Any, tok: Any, x: torch.Tensor) -> tuple[list[int], list[float]]:
    stops = stop_token_ids(tok, getattr(model, "generation_config", None))
    out = model.generate(input_ids=x, attention_mask=x.new_ones(x.shape), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=stops or None, pad_token_id=tok.pad_token_id, output_scores=True,
                         return_dict_in_generate=True)
    margins = []
    for scores in out.scores:
        top2 = scores[0].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
    return out.sequences[0, x.shape[1]:].tolist(), margins


def _merge(model: Any) -> Any:
    """W + (alpha/r) B A for every wrapped layer, in float32; safe_merge refuses NaN/inf results."""
    return model.merge_and_unload(safe_merge=True)


def _logits(model: Any, probes: list[list[int]]) -> list[torch.Tensor]:
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in probes]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _effect_hint(ref: _Reference) -> str:
    effect = _max_diff(ref.logits, ref.base_logits)
    return f"The adapter moves logits by {effect:.3g}; a diff of that size means the update was lost or applied twice."


def _cast(merged: Any, dtype: str) -> Any:
    """Cast the weights only: buffers such as rotary inv_freq stay float32, as they are when the folder is reloaded
    (casting them too made the in-memory model differ from the reloaded one)."""
    import torch

    target = getattr(torch, DTYPES[dtype])
    for param in merged.parameters():
        param.data = param.data.to(target)
    return merged


def _save(merged: Any, tok: Any, folder: Path, max_shard_size: str) -> list[str]:
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config  # de-quantized: the merged folder is a plain checkpoint
    merged.save_pretrained(folder, max_shard_size=max_shard_size)
    tok.save_pretrained(folder)  # tokenizer files and chat_template.jinja: the merged model renders prompts as trained
    return sorted(p.name for p in folder.glob("*.safetensors"))


def verify_merged(folder: Path, ref: _Reference, probes: list[list[int]], info: AdapterInfo, dtype: str, tol: float) -> MergeReport:
    """Reload the saved folder from disk and compare it with base + adapter on every probe."""
    import torch

    merged, tok = _load_merged(folder, info.task)
    diff, identical, ties, bad = 0.0, 0, 0, []
    with torch.no_grad():
        for i, ids in enumerate(probes):
            got = merged(input_ids=torch.tensor([ids])).logits[0].float()
            diff = max(diff, float((got - ref.logits[i]).abs().max()))
            if info.task != "causal_lm":
                identical += int(bool(got[-1].argmax() == ref.logits[i][-1].argmax()))
                continue
            seq, _ = _greedy(merged, tok, torch.tensor([ids]))
            verdict = _compare_greedy(ref.greedy[i], seq, ref.margins[i], tol)
            identical += verdict == "same"
            ties += verdict == "tie"
            if verdict == "different":
                bad.append(i)
    effect = _max_diff(ref.logits, ref.base_logits)
    report = MergeReport(str(folder), dtype, False, len(probes), diff, tol, 0.0, effect, identical, ties, task=info.task)
    if not diff <= tol or bad:
        raise VerificationError(
            f"the merged model reloaded from disk does not match base + adapter: max |logit diff| {diff:.3g} "
            f"(tolerance {tol:.3g}); greedy outputs differ on prompt(s) {bad or 'none'}. Nothing was written. "
            + _effect_hint(ref)
        )
    return report


def _compare_greedy(want: list[int], got: list[int], margins: list[float], tol: float) -> str:
    """same; tie when the first divergence is at a step whose top-2 logits were closer than 2*tol; else different."""
    for step, (a, b) in enumerate(zip(want, got, strict=False)):
        if a != b:
            return "tie" if margins[step] <= 2 * tol else "different"
    return "same" if len(want) == len(got) else "different"


def _load_merged(folder: Path, task: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    model = cls.from_pretrained(str(folder))  # in its saved dtype: what users will run
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def _provenance(info: AdapterInfo, report: MergeReport) -> dict[str, Any]:
    return {"adapter": str(info.folder), "base_model": info.base, "created": runinfo.utc_now(),
            "packages": runinfo.package_versions(), "verification": asdict(report)}
