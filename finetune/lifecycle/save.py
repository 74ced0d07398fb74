"""Save only the adapter, atomically: written to a temporary folder, verified by reloading it with plain peft on
a fresh base, then renamed into place. A folder under adapters/ is either complete and verified, or absent."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError, VerificationError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

    from finetune.config import JobConfig
    from finetune.model import Source


@dataclass
class SaveRequest:
    cfg: JobConfig
    source: Source
    run_info: dict[str, Any]  # run.json content (metrics, timings, data fingerprint...)
    probe: dict[str, Any]  # a small batch the verification compares logits on
    labels: list[str] | None = None


def adapter_dir(cfg: JobConfig) -> Path:
    return Path(cfg.output.dir) / cfg.output.run_name


def check_output_free(cfg: JobConfig) -> None:
    """Called before training, so a run is not wasted on a name it may not use."""
    final = adapter_dir(cfg)
    if final.exists() and not cfg.output.overwrite:
        raise FinetuneError(f"output folder {final.resolve()} exists; set output.run_name to a new name or output.overwrite=true")


def save_adapter(model: nn.Module, tokenizer: Any, req: SaveRequest, accelerator: Accelerator) -> Path:
    final = adapter_dir(req.cfg)
    # Gathers the full weights under FSDP / ZeRO-3; must run on every process.
    state = accelerator.get_state_dict(model)
    # keep_fp32_wrapper=False drops the autocast forward accelerate patched in: verification compares in full precision.
    peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if accelerator.is_main_process:
        tmp = final.parent / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write(tmp, peft_model, state, tokenizer, req)
            report = verify_adapter(tmp, peft_model, req)
            _record_verification(tmp, report)
            _replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    return final


def _write(tmp: Path, peft_model: Any, state: dict[str, Any], tokenizer: Any, req: SaveRequest) -> None:

    tmp.mkdir(parents=True)
    peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if not req.cfg.lora.enabled:  # full fine-tuning: a whole model folder (config.json + model.safetensors)
        _write_common(tmp, tokenizer, req)
        return
    cfg_path = tmp / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    # peft records the path as given; a cwd-relative path would make reloading depend on where you stand.
    adapter_cfg["base_model_name_or_path"] = req.source.ref
    adapter_cfg["revision"] = req.source.revision
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    _write_common(tmp, tokenizer, req)


def _write_common(tmp: Path, tokenizer: Any, req: SaveRequest) -> None:
    from finetune.config import dump_config

    tokenizer.save_pretrained(tmp)
    (tmp / "finetune.yaml").write_text(dump_config(req.cfg, comments=False))
    (tmp / "run.json").write_text(json.dumps(req.run_info, indent=2, sort_keys=True, default=str) + "\n")


def verify_adapter(folder: Path, trained: Any, req: SaveRequest) -> dict[str, Any]:
    """Reload the saved folder with plain `PeftModel.from_pretrained` on a fresh base and compare logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from finetune.model import load_base_model

    if not req.cfg.lora.enabled:
        return _verify_full(folder, trained, req)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    _check_lora_weights(tensors)
    base = load_base_model(req.source, req.cfg.model, req.cfg.task, req.cfg.lora, req.labels)
    reloaded = PeftModel.from_pretrained(base, str(folder))
    missing = _missing_adapter_keys(trained, reloaded)
    if missing:
        raise VerificationError(f"the saved adapter lacks {len(missing)} trained tensors, e.g. {missing[:3]}")
    return {**_compare_logits(trained, reloaded, req), "tensors": len(tensors)}


def _verify_full(folder: Path, trained: Any, req: SaveRequest) -> dict[str, Any]:
    """Full fine-tuning: the folder is a whole model; reload it as one and compare logits."""
    from finetune.model import Source, load_base_model

    reloaded = load_base_model(Source(str(folder), str(folder)), req.cfg.model, req.cfg.task, None, req.labels)
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
    run_path.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def _replace(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
