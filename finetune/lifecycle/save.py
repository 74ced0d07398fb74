"""Save only the adapter, atomically: written to a temporary folder with its records and logs, verified by
reloading it with plain peft on a fresh base, then moved into place (finetune.files.atomic_dir). A folder under
adapters/ is either complete and verified, or absent."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config import JobConfig, dump_config
from finetune.config.paths import absolute_paths
from finetune.data.prompt_record import PROMPT_FILE, PromptRecord
from finetune.errors import VerificationError
from finetune.files import atomic_dir, check_replaceable, write_json
from finetune.lifecycle.modelcard import write_new_card
from finetune.model import Source, load_base_model
from finetune.training.trackers import METRICS, plot_losses

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

KIND = "adapter"  # the output of `finetune train`: an adapter folder, or a whole model under full fine-tuning
LOGS = (METRICS, "profile.txt")


@dataclass
class SaveRequest:
    """What save_adapter needs beside the model: the job (saved with absolute paths), the base source (reloaded to
    verify), the run record, the probe batch verified on, class names, the logs folder and the prompt format."""

    cfg: JobConfig
    source: Source
    run_info: dict[str, Any]  # run.json content (metrics, timings, data fingerprint...)
    probe: dict[str, Any]  # a small batch the verification compares logits on
    labels: list[str] | None = None
    logs: Path | None = None  # the run's work folder: metrics.jsonl and profile.txt are copied, loss.png drawn
    prompt: PromptRecord | None = None  # how prompts were built (prompt.json): the demo, server and eval use it


def check_output_free(cfg: JobConfig) -> None:
    """Called before training, so a run is not wasted on a name it may not use."""
    check_replaceable(cfg.output.adapter_dir, KIND, cfg.output.overwrite, flag="output.overwrite=true (or a new output.run_name)")


def save_adapter(model: nn.Module, tokenizer: Any, req: SaveRequest, accelerator: Accelerator) -> Path:
    """Write, verify and move the adapter into place on the main process; every process must call it."""
    final = req.cfg.output.adapter_dir
    # Gathers the full weights under FSDP / ZeRO-3; must run on every process.
    state = accelerator.get_state_dict(model)
    # keep_fp32_wrapper=False drops the autocast forward accelerate patched in: verification compares in full precision.
    peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if accelerator.is_main_process:
        flag = "output.overwrite=true (or a new output.run_name)"
        with atomic_dir(final, KIND, req.cfg.output.overwrite, flag) as tmp:
            _write(tmp, peft_model, state, tokenizer, req)
            _record_verification(tmp, verify_adapter(tmp, peft_model, req))
            _copy_logs(req, tmp)
            write_new_card(tmp, str(final), final.name)  # README.md: finetune's card, not peft's empty template
    accelerator.wait_for_everyone()
    return final


def _copy_logs(req: SaveRequest, folder: Path) -> None:
    """Logs and the loss plot go in before the folder is moved into place, so a complete folder has them all."""
    if req.logs is None:
        return
    for name in LOGS:
        if (req.logs / name).exists():
            shutil.copy2(req.logs / name, folder / name)
    if req.cfg.train.plot:
        plot_losses(req.logs / METRICS, folder / "loss.png")


def _write(tmp: Path, peft_model: Any, state: dict[str, Any], tokenizer: Any, req: SaveRequest) -> None:
    peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if not req.cfg.lora.enabled:  # full fine-tuning: a whole model folder (config.json + model.safetensors)
        _write_common(tmp, tokenizer, req)
        return
    cfg_path = tmp / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    # peft records the path as given; a cwd-relative path would make reloading depend on where you stand.
    adapter_cfg["base_model_name_or_path"] = req.source.ref
    adapter_cfg["revision"] = req.source.revision
    write_json(cfg_path, adapter_cfg)
    _write_common(tmp, tokenizer, req)


def _write_common(tmp: Path, tokenizer: Any, req: SaveRequest) -> None:
    tokenizer.save_pretrained(tmp)
    # Absolute paths: later commands read the adapter from anywhere, not only from the training directory.
    (tmp / "finetune.yaml").write_text(dump_config(absolute_paths(req.cfg), comments=False))
    write_json(tmp / "run.json", {**req.run_info, "base_model": req.source.ref})
    if req.prompt is not None:
        write_json(tmp / PROMPT_FILE, req.prompt.to_dict())


def verify_adapter(folder: Path, trained: Any, req: SaveRequest) -> dict[str, Any]:
    """Reload the saved folder with plain `PeftModel.from_pretrained` on a fresh base and compare logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    if not req.cfg.lora.enabled:
        return _verify_full(folder, trained, req)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    _check_lora_weights(tensors)
    base = load_base_model(req.source, req.cfg.model, req.cfg.task, req.cfg.lora.quantization, req.labels)
    reloaded = PeftModel.from_pretrained(base, str(folder))
    missing = _missing_adapter_keys(trained, reloaded)
    if missing:
        raise VerificationError(f"the saved adapter lacks {len(missing)} trained tensors, e.g. {missing[:3]}")
    return {**_compare_logits(trained, reloaded, req), "tensors": len(tensors)}


def _verify_full(folder: Path, trained: Any, req: SaveRequest) -> dict[str, Any]:
    """Full fine-tuning: the folder is a whole model; reload it as one and compare logits."""
    reloaded = load_base_model(Source(str(folder), str(folder)), req.cfg.model, req.cfg.task, "none", req.labels)
    return {**_compare_logits(trained, reloaded, req), "full_model": True}


def _compare_logits(trained: Any, reloaded: Any, req: SaveRequest) -> dict[str, Any]:
    import torch

    was_training = trained.training
    trained.eval()
    reloaded.eval()
    device = next(trained.parameters()).device
    probe = {k: v.to(device) for k, v in req.probe.items() if k not in ("labels", "label")}
    with torch.no_grad():
        want = trained(**probe).logits.float()
        got = reloaded.to(device)(**probe).logits.float()
    trained.train(was_training)
    diff = float((want - got).abs().max())
    tol = 1e-4 * max(1.0, float(want.abs().max())) if want.dtype == torch.float32 and _fp32(trained) else 5e-2
    if not diff <= tol:
        raise VerificationError(f"reloaded adapter's logits differ from the trained model's by {diff:.3g} (> {tol:.3g})")
    return {"max_logit_diff": diff, "tolerance": tol, "probe_shape": list(want.shape)}


def _fp32(model: Any) -> bool:
    import torch

    return all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def _check_lora_weights(tensors: dict[str, Any]) -> None:
    """Refuse an adapter whose LoRA B matrices are missing, empty or all zero (the sharded-save bug)."""
    a_keys = [k for k in tensors if ".lora_A." in k]
    if not a_keys:
        raise VerificationError("the saved adapter holds no LoRA tensors at all")
    bad = []
    for a in a_keys:
        b = tensors.get(a.replace(".lora_A.", ".lora_B."))
        if b is None or b.numel() == 0 or not bool(b.abs().sum() > 0):
            bad.append(a.replace(".lora_A.", ".lora_B."))
    if bad:
        raise VerificationError(
            f"{len(bad)} of {len(a_keys)} LoRA B matrices are missing or all zero after training (e.g. {bad[0]}): "
            "the adapter would equal the base model. Under FSDP/ZeRO-3 this means the weights were not gathered."
        )


def _missing_adapter_keys(trained: Any, reloaded: Any) -> list[str]:
    from peft import get_peft_model_state_dict

    want = set(get_peft_model_state_dict(trained))
    have = set(get_peft_model_state_dict(reloaded))
    return sorted(want - have)


def _record_verification(tmp: Path, report: dict[str, Any]) -> None:
    run_path = tmp / "run.json"
    info = json.loads(run_path.read_text())
    info["verification"] = report
    write_json(run_path, info)
