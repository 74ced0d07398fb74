"""Will this adapter load where it is going? The loading rules of peft, vLLM, SGLang, TGI (legacy) and llama.cpp as
one table.

Each rule reads only adapter_config.json, the safetensors file (header, and every tensor's bytes checked for
truncation and NaN / inf) and, when it is a local folder, the base's config.json: no torch, answers in well under
a second for an adapter. A rule returns one message per
problem; `check_adapter` pairs each with the rule's fix. Sources for each rule are in docs/lifecycle.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.lifecycle.folder import is_full_model
from finetune.lifecycle.weights import FIX, read_header, weights_problems

TARGETS = ("peft", "vllm", "sglang", "tgi", "llama.cpp")
SERVERS = ("vllm", "sglang", "tgi", "llama.cpp")  # everything that serves a causal LM from the adapter file alone
LEGACY = {"tgi": "TGI has been in maintenance mode since December 2025: prefer vLLM or SGLang for new deployments"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
TGI_MAX_RANK = 128
TGI_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
# SGLang maps peft module names onto its fused layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and applies LoRA
# only to the layers it knows (sglang/srt/lora/utils.py: get_normalized_target_modules, get_hidden_dim)
SGLANG_MODULES = {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "out_proj", "gate_proj", "up_proj",
                  "gate_up_proj", "down_proj", "embed_tokens", "lm_head"}
REQUIRED_KEYS = {
    "peft": ("peft_type", "r", "lora_alpha", "target_modules"),
    "vllm": ("r", "lora_alpha", "target_modules"),
    "sglang": ("r", "lora_alpha", "target_modules"),
    "tgi": ("r", "lora_alpha", "target_modules", "base_model_name_or_path"),
    "llama.cpp": ("lora_alpha", "base_model_name_or_path"),
}
LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


@dataclass
class AdapterFacts:
    """What the rules look at, read without torch."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, list[int]]  # name -> shape, from the safetensors header
    base_config: dict[str, Any] | None = None  # the base's config.json when the base is a local folder
    max_lora_rank: int = 16  # vLLM's --max-lora-rank the adapter will be served with


@dataclass(frozen=True)
class Rule:
    """One loading rule: its id, the targets it applies to, its check (one message per problem found) and the fix shown
    with each problem ({target} filled in)."""

    id: str
    targets: tuple[str, ...]
    check: Callable[[AdapterFacts, str], list[str]]
    fix: str


@dataclass(frozen=True)
class Problem:
    """One rule an adapter breaks: the rule's id, what is wrong, and how to fix it."""

    rule: str
    message: str
    fix: str

    def line(self) -> str:
        """`[rule] message -> fix: ...`, the way `finetune check` prints a problem."""
        return f"[{self.rule}] {self.message} -> fix: {self.fix}"


@dataclass
class CheckResult:
    """check_adapter's answer for one target: the problems found (`ok` when none) and how many rules were checked."""

    target: str
    problems: list[Problem] = field(default_factory=list)
    rules: int = 0

    @property
    def ok(self) -> bool:
        """True when no rule found a problem."""
        return not self.problems


def read_facts(folder: str | Path, max_lora_rank: int = 16) -> AdapterFacts:
    """What the rules read from an adapter folder, without torch: adapter_config.json, the tensor shapes from the
    safetensors header, and the base's config.json when the base is a local folder.

    FinetuneError for a fully fine-tuned model, or a folder without adapter_config.json or .safetensors weights."""
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if is_full_model(folder):
        raise FinetuneError(f"{folder} is a fully fine-tuned model (lora.enabled: false), not a LoRA adapter: these "
                            "rules are for adapters; serving frameworks load the folder as a plain model")
    if not cfg_path.is_file():
        raise FinetuneError(f"{folder}: no adapter_config.json; point at an adapter folder (e.g. adapters/<run>)")
    if not weights.is_file():
        raise FinetuneError(f"{folder}: no adapter_model.safetensors (a .bin adapter is not supported by vLLM/TGI: "
                            "re-save it with safe_serialization=True)")
    config = _json_object(cfg_path)
    base = Path(str(config.get("base_model_name_or_path") or "")) / "config.json"
    base_config = _json_object(base) if base.is_absolute() and base.is_file() else None
    return AdapterFacts(folder, config, safetensors_shapes(weights), base_config, max_lora_rank)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from the file header (8-byte length + JSON), without loading any data."""
    shapes = {}
    for name, spec in read_header(path).items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        shapes[name] = list(shape) if isinstance(shape, list) else []
    return shapes


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FinetuneError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_adapter(folder: str | Path, target: str, max_lora_rank: int = 16) -> CheckResult:
    """The adapter in `folder` held to every rule of `target` (one of TARGETS); max_lora_rank is the vLLM
    --max-lora-rank it will be served with. FinetuneError for an unknown target or a folder that is not an adapter."""
    if target not in TARGETS:
        raise FinetuneError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    facts = read_facts(folder, max_lora_rank)
    result = CheckResult(target)
    for rule in RULES:
        if target in rule.targets:
            result.rules += 1
            result.problems += [Problem(rule.id, msg, rule.fix.format(target=target)) for msg in rule.check(facts, target)]
    return result


# --- the rules -------------------------------------------------------------------------------------------------

def _weights_file(f: AdapterFacts, target: str) -> list[str]:
    """Every tensor's bytes are in the file (a truncated file has a valid header) and hold no NaN / inf."""
    return weights_problems(f.folder / "adapter_model.safetensors", read_values=True)


def _required_keys(f: AdapterFacts, target: str) -> list[str]:
    return [f"adapter_config.json has no '{k}'" for k in REQUIRED_KEYS[target] if f.config.get(k) in (None, "", [])]


def _lora_only(f: AdapterFacts, target: str) -> list[str]:
    if f.config.get("peft_type", "LORA") != "LORA":
        return [f"peft_type is {f.config.get('peft_type')!r}; {target} serves LoRA adapters only"]
    return []


def _key_names(f: AdapterFacts, target: str) -> list[str]:
    """Servers map tensors by name: base_model.model.<module>.lora_A/B.weight, nothing else."""
    covered = ("lora_magnitude_vector", "lora_embedding_")  # reported by the dora and embeddings rules
    bad = [k for k in f.tensors if not LORA_KEY.match(k) and not _is_full_tensor(k, f) and not any(c in k for c in covered)]
    return [f"tensor '{k}' is not named base_model.model.<module>.lora_A.weight / .lora_B.weight" for k in bad[:5]]


def _pairs(f: AdapterFacts, target: str) -> list[str]:
    """Every lora_A has its lora_B and their ranks agree with each other and with the config."""
    out = []
    for name, shape in f.tensors.items():
        m = LORA_KEY.match(name)
        if not m or m.group(2) != "A":
            continue
        b = f.tensors.get(name.replace(".lora_A.", ".lora_B."))
        if b is None:
            out.append(f"'{name}' has no matching lora_B tensor")
        elif len(shape) != 2 or len(b) != 2 or shape[0] != b[1]:
            out.append(f"'{m.group(1)}': lora_A {shape} and lora_B {b} do not share a rank")
        elif shape[0] != _rank_of(f, m.group(1)):
            out.append(f"'{m.group(1)}': rank {shape[0]} in the weights but {_rank_of(f, m.group(1))} in the config")
    if not any(LORA_KEY.match(k) for k in f.tensors):
        out.append("the adapter holds no LoRA tensors at all")
    return out


def _rank_limit(f: AdapterFacts, target: str) -> list[str]:
    ranks = {int(f.config.get("r") or 0), *(int(v) for v in (f.config.get("rank_pattern") or {}).values())}
    limit = f.max_lora_rank if target == "vllm" else TGI_MAX_RANK
    high = max(ranks)
    if high > limit:
        return [f"rank {high} is above {target}'s limit {limit}" + (" (--max-lora-rank)" if target == "vllm" else "")]
    return []


def _modules_to_save(f: AdapterFacts, target: str) -> list[str]:
    mts = f.config.get("modules_to_save") or []
    full = [k for k in f.tensors if _is_full_tensor(k, f)]
    if mts or full:
        names = ", ".join(mts) or ", ".join(full[:3])
        return [f"the adapter carries fully trained modules ({names}); {target} loads only LoRA A/B matrices"]
    return []


def _dora(f: AdapterFacts, target: str) -> list[str]:
    if f.config.get("use_dora") or any("lora_magnitude_vector" in k for k in f.tensors):
        return [f"DoRA adapter (use_dora=true); {target} cannot apply DoRA magnitude vectors"]
    return []


def _embeddings(f: AdapterFacts, target: str) -> list[str]:
    full = [k for k in f.tensors if re.search(r"\.(embed_tokens|lm_head|wte|embed_out)(\.modules_to_save\.default)?\.weight$", k)]
    lora_emb = [k for k in f.tensors if "lora_embedding_" in k]
    out = [f"full embedding/output tensor '{k}' in the adapter (new tokens or a trained embedding)" for k in full[:2]]
    if lora_emb:
        out.append(f"LoRA on the token embedding ({lora_emb[0]}); {target} does not load embedding LoRA")
    tied = bool((f.base_config or {}).get("tie_word_embeddings"))
    if target == "llama.cpp" and tied and any(".lm_head.lora_" in k for k in f.tensors):
        out.append("LoRA on lm_head of a base with tied embeddings: llama.cpp has no separate output tensor for it")
    return out


def _task(f: AdapterFacts, target: str) -> list[str]:
    task = f.config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        return [f"task_type is {task}; {target} serves text generation (CAUSAL_LM) adapters only"]
    return []


def _bias(f: AdapterFacts, target: str) -> list[str]:
    lora_bias = any(re.search(r"\.lora_B\.bias$", k) for k in f.tensors)  # full-module biases: modules-to-save rule
    if f.config.get("bias", "none") != "none" or f.config.get("lora_bias") or lora_bias:
        return [f"the adapter trains biases (bias={f.config.get('bias')!r}, lora_bias={f.config.get('lora_bias')}); "
                f"{target} applies only A/B weight matrices"]
    return []


def _single_scale(f: AdapterFacts, target: str) -> list[str]:
    """These servers compute the scale as lora_alpha / r with one alpha for every layer."""
    out = []
    if f.config.get("use_rslora"):
        out.append(f"use_rslora=true scales by alpha/sqrt(r); {target} scales by alpha/r, so the update would be off "
                   f"by sqrt(r)={int(f.config.get('r') or 0) ** 0.5:.3g}x")
    if f.config.get("alpha_pattern"):
        out.append(f"alpha_pattern gives some layers their own alpha; {target} uses one lora_alpha for all")
    return out


def _tgi_modules(f: AdapterFacts, target: str) -> list[str]:
    modules = {m.group(1).rsplit(".", 1)[-1] for k in f.tensors if (m := LORA_KEY.match(k))}
    odd = sorted(modules - TGI_MODULES)
    return [f"LoRA on {', '.join(odd)}; TGI applies LoRA only to {', '.join(sorted(TGI_MODULES))}"] if odd else []


def _sglang_modules(f: AdapterFacts, target: str) -> list[str]:
    out = []
    targets = f.config.get("target_modules")
    if isinstance(targets, str) and targets not in ("all", "all-linear"):
        out.append(f"target_modules is the pattern {targets!r}; SGLang accepts a list of names, 'all' or 'all-linear'")
    modules = {m.group(1).rsplit(".", 1)[-1] for k in f.tensors if (m := LORA_KEY.match(k))}
    odd = sorted(modules - SGLANG_MODULES)
    if odd:
        out.append(f"LoRA on {', '.join(odd)}; SGLang applies LoRA only to {', '.join(sorted(SGLANG_MODULES))}")
    return out


def _base_known(f: AdapterFacts, target: str) -> list[str]:
    base = str(f.config.get("base_model_name_or_path") or "")
    if base.startswith("/") and not Path(base).is_dir():
        return [f"base_model_name_or_path {base} does not exist on this machine"]
    return []


def _rank_of(f: AdapterFacts, module: str) -> int:
    for pattern, r in (f.config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
            return int(r)
    return int(f.config.get("r") or 0)


def _is_full_tensor(name: str, f: AdapterFacts) -> bool:
    """A full weight saved through modules_to_save (e.g. a classifier head or resized embeddings)."""
    return not LORA_KEY.match(name) and "lora_" not in name


RULES: tuple[Rule, ...] = (
    Rule("weights-file", TARGETS, _weights_file, FIX),
    Rule("required-keys", TARGETS, _required_keys, "retrain with finetune (it writes them) or add the keys to adapter_config.json"),
    Rule("lora-only", TARGETS, _lora_only, "train a LoRA adapter (lora.enabled: true)"),
    Rule("lora-pairs", TARGETS, _pairs, "the weights file is incomplete or edited: re-save it from the trained model"),
    Rule("base-model", ("peft", "llama.cpp"), _base_known,
         "pass --base to the command, or edit base_model_name_or_path to a hub id or an existing folder"),
    Rule("tensor-names", SERVERS, _key_names, "save with peft's save_pretrained (finetune train does) so keys are standard"),
    Rule("task", SERVERS, _task, "serve classification adapters with transformers + peft, not {target}"),
    Rule("rank-limit", ("vllm", "tgi"), _rank_limit,
         "retrain with a smaller lora.r, or (vLLM) serve with --max-lora-rank set to an allowed value >= r "
         f"({', '.join(map(str, VLLM_RANKS))})"),
    Rule("modules-to-save", SERVERS, _modules_to_save, "retrain with lora.modules_to_save: [] or serve the merged model (finetune merge)"),
    Rule("dora", SERVERS, _dora, "retrain with lora.use_dora: false, or serve the merged model (finetune merge)"),
    Rule("embeddings", SERVERS, _embeddings,
         "do not add tokens or train embeddings for a served adapter; otherwise serve the merged model (finetune merge)"),
    Rule("bias", SERVERS, _bias, "retrain without bias training, or serve the merged model (finetune merge)"),
    Rule("single-scale", ("sglang", "tgi", "llama.cpp"), _single_scale,
         "for llama.cpp use `finetune export --format gguf` (it folds each layer's true scale into lora_b); "
         "otherwise retrain with lora.use_rslora: false"),
    Rule("tgi-modules", ("tgi",), _tgi_modules, "retrain with lora.target_modules limited to the attention and MLP projections"),
    Rule("sglang-modules", ("sglang",), _sglang_modules,
         "retrain with lora.target_modules: all-linear or a list of the attention and MLP projections"),
)
