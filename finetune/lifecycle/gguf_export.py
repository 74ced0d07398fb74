"""Export a LoRA adapter as a llama.cpp LoRA GGUF, written with the `gguf` package and verified by reading it back.

The layout matches llama.cpp's own convert_lora_to_gguf.py: general.type=adapter, adapter.type=lora,
adapter.lora.alpha, general.architecture of the base, tensors `<gguf base name>.lora_a` (r x in) and `.lora_b`
(out x r), with the rows of q/k lora_b permuted the way convert_hf_to_gguf permutes Llama's q/k weights (llama.cpp
stores rotary pairs interleaved). llama.cpp scales every layer by lora_alpha / rank, so an rsLoRA or alpha_pattern
adapter has its true per-layer scale folded into lora_b here instead of being silently applied wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError, VerificationError
from finetune.files import atomic_file
from finetune.lifecycle.fit import check_adapter_fits
from finetune.lifecycle.folder import AdapterInfo, base_source, read_adapter, require_adapter
from finetune.lifecycle.targets import check_adapter

if TYPE_CHECKING:
    import numpy as np

# HF model_type -> (gguf architecture name, whether convert_hf_to_gguf permutes q/k rows for it)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
OUTTYPES = ("f32", "f16")
# Rules the exporter satisfies itself, so they do not block an export.
HANDLED_RULES = {"single-scale", "base-model"}
LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


@dataclass
class GgufReport:
    """What export_lora_gguf wrote: the file, its architecture, alpha, tensor count and type, the largest value
    difference when read back, and the layers whose scale was folded into lora_b."""

    path: str
    architecture: str
    alpha: float
    tensors: int
    outtype: str
    max_abs_diff: float  # written vs read-back values
    folded_scales: list[str] = field(default_factory=list)  # layers whose lora_b carries a non-alpha/r scale

    def describe(self) -> str:
        """What `finetune export` prints: the file written, its settings, and the read-back check."""
        folded = f"; true scale folded into lora_b for {len(self.folded_scales)} layers" if self.folded_scales else ""
        return (f"wrote {self.path}: llama.cpp LoRA adapter for architecture '{self.architecture}', {self.tensors} tensors "
                f"({self.outtype}), alpha {self.alpha:g}{folded}\nverified by reading it back: names, shapes, alpha, "
                f"type; max |value diff| {self.max_abs_diff:.3g}")


def export_lora_gguf(folder: str | Path, out: str | Path | None = None, outtype: str = "f32", base: str | None = None) -> GgufReport:
    """Write the LoRA adapter in `folder` as a llama.cpp LoRA GGUF (default <folder>/<name>-lora-<outtype>.gguf; only
    an earlier GGUF is replaced) and verify it by reading it back.

    Raises FinetuneError for an unknown outtype, a full model, an unsupported base architecture or an adapter
    llama.cpp cannot apply, and VerificationError when the written file does not read back as written."""
    if outtype not in OUTTYPES:
        raise FinetuneError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    info = read_adapter(folder)
    require_adapter(info, "a llama.cpp LoRA GGUF holds adapter matrices; convert the whole model with llama.cpp's "
                    "convert_hf_to_gguf.py instead")
    _refuse_incompatible(info)
    base_cfg = _base_config(info, base)
    arch, permute = _architecture(base_cfg)
    alpha = float(info.adapter_config["lora_alpha"])
    tensors, folded = gguf_tensors(info, base_cfg, permute, alpha)
    path = Path(out) if out else info.folder / f"{info.name}-lora-{outtype}.gguf"
    with atomic_file(path, _is_gguf, "a GGUF file") as tmp:
        _write(tmp, arch, alpha, tensors, outtype, info.name)
        diff = verify_lora_gguf(tmp, arch, alpha, tensors)
    return GgufReport(str(path.resolve()), arch, alpha, len(tensors), outtype, diff, folded)


def _is_gguf(path: Path) -> bool:
    """An existing output may only be replaced if it is a GGUF file (an earlier export), never any other file."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _refuse_incompatible(info: AdapterInfo) -> None:
    problems = [p for p in check_adapter(info.folder, "llama.cpp").problems if p.rule not in HANDLED_RULES]
    if problems:
        lines = "\n  ".join(p.line() for p in problems)
        raise FinetuneError(f"{info.folder} cannot be exported for llama.cpp:\n  {lines}")


def _base_config(info: AdapterInfo, base: str | None) -> dict[str, Any]:
    """The base's config.json (architecture, heads): from the recorded base, a local folder or the hub cache."""
    source, model_cfg = base_source(info, base)
    path = Path(source.folder) / "config.json"
    if not path.is_file():
        raise FinetuneError(f"no config.json in the base folder {source.folder}; pass --base with the base checkpoint")
    check_adapter_fits(info, source, model_cfg)
    return dict(json.loads(path.read_text()))


def _architecture(cfg: dict[str, Any]) -> tuple[str, bool]:
    model_type = str(cfg.get("model_type"))
    if model_type not in ARCHITECTURES:
        raise FinetuneError(f"base model_type '{model_type}' is not supported by this exporter (supported: "
                            f"{', '.join(ARCHITECTURES)}); use llama.cpp's convert_lora_to_gguf.py for it")
    return ARCHITECTURES[model_type]


def gguf_tensors(info: AdapterInfo, base_cfg: dict[str, Any], permute: bool, alpha: float) -> tuple[dict[str, np.ndarray], list[str]]:
    """GGUF name -> float32 array, in llama.cpp's layout, with each layer's true scale folded into lora_b."""
    import gguf
    import torch
    from safetensors.torch import load_file

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == _architecture(base_cfg)[0])
    names = gguf.get_tensor_name_map(arch_enum, int(base_cfg["num_hidden_layers"]))
    raw = load_file(str(info.folder / "adapter_model.safetensors"))
    out: dict[str, np.ndarray] = {}
    folded: list[str] = []
    for key, a in sorted(raw.items()):
        m = LORA_KEY.match(key)
        if not m or m.group(2) != "A":
            continue
        module = m.group(1)
        b = raw[key.replace(".lora_A.", ".lora_B.")].to(torch.float32)
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise FinetuneError(f"no llama.cpp tensor corresponds to '{module}' for this architecture")
        factor = _scale(info.adapter_config, module, a.shape[0]) / (alpha / a.shape[0])
        if abs(factor - 1) > 1e-7:
            b, folded = b * factor, [*folded, module]
        if permute and module.endswith(("q_proj", "k_proj")):
            heads = int(base_cfg["num_attention_heads"])
            kv = int(base_cfg.get("num_key_value_heads") or heads) if module.endswith("k_proj") else heads
            b = permute_rows(b, kv)
        out[f"{target}.lora_a"] = a.to(torch.float32).numpy()
        out[f"{target}.lora_b"] = b.contiguous().numpy()
    return out, folded


def _scale(cfg: dict[str, Any], module: str, rank: int) -> float:
    """peft's scale for this layer: alpha_pattern / rank_pattern aware, alpha/sqrt(r) under rsLoRA."""
    alpha = float(cfg["lora_alpha"])
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
            alpha = float(value)
            break
    return alpha / (rank**0.5 if cfg.get("use_rslora") else rank)


def permute_rows(w: Any, n_head: int) -> Any:
    """convert_hf_to_gguf's Llama q/k permutation (HF rotary halves -> interleaved pairs), on the output rows."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path: Path, arch: str, alpha: float, tensors: dict[str, np.ndarray], outtype: str, name: str) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    for tname, array in tensors.items():
        writer.add_tensor(tname, array.astype(np.float32 if outtype == "f32" else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_lora_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata key -> value, tensor name -> array in the numpy shape it was written with)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arrays = {t.name: np.asarray(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
              for t in reader.tensors}
    return meta, arrays


def verify_lora_gguf(path: Path, arch: str, alpha: float, want: dict[str, np.ndarray]) -> float:
    """Read the file back: the keys llama.cpp's adapter loader requires, every tensor's name, shape and values."""
    import numpy as np

    meta, got = read_lora_gguf(path)
    expected = {"general.type": "adapter", "adapter.type": "lora", "general.architecture": arch}
    problems = [f"{k} is {meta.get(k)!r}, expected {v!r}" for k, v in expected.items() if meta.get(k) != v]
    if not np.isclose(float(meta.get("adapter.lora.alpha", np.nan)), alpha):
        problems.append(f"adapter.lora.alpha is {meta.get('adapter.lora.alpha')}, expected {alpha}")
    if set(got) != set(want):
        problems.append(f"tensor names differ: missing {sorted(set(want) - set(got))[:3]}, extra {sorted(set(got) - set(want))[:3]}")
    diff = 0.0
    for name in set(got) & set(want):
        if got[name].shape != want[name].shape:
            problems.append(f"{name}: shape {got[name].shape}, expected {want[name].shape}")
            continue
        diff = max(diff, float(np.abs(got[name] - want[name]).max()))
    scale = max(float(np.abs(a).max()) for a in want.values())
    if diff > 1e-3 * max(scale, 1e-6):  # f16 rounding at most; f32 reads back exactly
        problems.append(f"tensor values differ by up to {diff:.3g}")
    if problems:
        raise VerificationError(f"{path.name} failed its read-back check: " + "; ".join(problems))
    return diff
