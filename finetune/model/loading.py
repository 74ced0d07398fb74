"""Load the tokenizer and the base weights from one resolved source, and check that they fit each other and the task."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config.model import ModelConfig
from finetune.errors import ModelError
from finetune.model.lora import NEW_HEAD
from finetune.model.source import Source, resolve_source

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEMPLATES_DIR = Path(__file__).parent / "templates"  # built-in chat templates (model.chat_template)


def load_tokenizer(source: Source, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `source` (AutoTokenizer), with model.chat_template applied when set and a pad token chosen
    (set_pad_token). Raises ModelError when the folder holds no loadable tokenizer."""
    from transformers import AutoTokenizer

    # AutoTokenizer, not a concrete class: a concrete fast class on a custom tokenizer silently gave other ids.
    try:
        tok = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the tokenizer from {source.ref}: {_first_line(exc)}. The folder must hold a "
                         "Hugging Face checkpoint (tokenizer files, config.json, weights)") from None
    if cfg.chat_template:
        tok.chat_template = read_chat_template(cfg.chat_template)
    set_pad_token(tok)
    return tok


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def read_chat_template(name_or_path: str) -> str:
    """The Jinja text of model.chat_template (a .jinja file or a built-in name); ModelError naming the built-ins."""
    path = Path(name_or_path)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    builtin = TEMPLATES_DIR / f"{name_or_path}.jinja"
    if builtin.is_file():
        return builtin.read_text(encoding="utf-8")
    names = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
    raise ModelError(f"model.chat_template: '{name_or_path}' is neither a .jinja file nor a built-in ({', '.join(names)})")


def set_pad_token(tok: PreTrainedTokenizerBase) -> str:
    """Give the tokenizer a pad token that is not EOS where one exists.

    Padding never decides the labels here (the collator masks by length), so even pad == eos keeps the EOS that ends
    each example in the loss; a distinct pad id is still preferred because other tools mask by `input_ids == pad`.
    """
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return "kept"
    if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
        tok.pad_token = tok.unk_token
        return "unk"
    if tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
        return "eos"
    raise ModelError("the tokenizer has neither a pad, an unk nor an eos token; add one to its tokenizer_config.json")


def model_kwargs(cfg: ModelConfig, quantization: str = "none") -> dict[str, Any]:
    """from_pretrained arguments: dtype, attention kernel, and a bitsandbytes config for QLoRA ("4bit"/"8bit")."""
    import torch

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.dtype != "auto":
        kwargs["dtype"] = getattr(torch, cfg.dtype)
    elif not torch.cuda.is_available():
        kwargs["dtype"] = torch.float32  # CPU: keep LoRA math exact; bf16 comes from autocast
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization)
    return kwargs


def training_dtype(cfg: ModelConfig, mixed_precision: str, trains_base: bool, quantization: str = "none") -> ModelConfig:
    """`dtype: auto` resolved for a training run: under bf16 autocast a LoRA run keeps the frozen base in bfloat16
    (half the memory, and no float32 -> bf16 cast of every weight on every forward); the trained weights and the
    optimizer state stay float32 (finetune.model.lora). Full fine-tuning and QLoRA keep their own rules."""
    if cfg.dtype != "auto" or mixed_precision != "bf16" or trains_base or quantization != "none":
        return cfg
    return cfg.model_copy(update={"dtype": "bfloat16"})


def _bnb_config(quantization: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_base_model(
    source: Source, cfg: ModelConfig, task: str, quantization: str = "none", labels: list[str] | None = None
) -> PreTrainedModel:
    """The base weights for `task` (a new classification head sized by `labels`), quantized for QLoRA if asked."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs = model_kwargs(cfg, quantization)
    try:
        if task == "classification":
            labels = labels or ["0", "1"]
            kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
            return _classifier(source, kwargs)
        return AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # a damaged weights file is a SafetensorError
        raise ModelError(f"cannot load model weights from {source.ref}: {_first_line(exc)}") from None


def _classifier(source: Source, kwargs: dict[str, Any]) -> PreTrainedModel:
    """A sequence classifier whose head the base checkpoint usually lacks. transformers reports that head as
    "MISSING ... consider training"; we say it ourselves (model.lora's parameter report: a new head, trained in full
    and saved with the adapter; when an adapter is loaded, its saved head replaces the random one). Other missing
    weights are a real problem and are still reported."""
    import logging

    from transformers import AutoModelForSequenceClassification

    # A filter, not a higher level: transformers 5 runs an extra tensor-parallel check (and warns) when that
    # logger's level is WARNING or above.
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    logger.addFilter(quiet)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(source.folder, output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(quiet)
    missing = sorted(info.get("missing_keys") or [])
    head_names = {_head_name(model)}
    head = [k for k in missing if k.split(".", 1)[0] in head_names]
    other = [k for k in missing if k not in head]
    if other:
        print(f"warning: {len(other)} weights of {source.ref} are missing from the checkpoint and were initialised "
              f"randomly: {', '.join(other[:5])}{', ...' if len(other) > 5 else ''}", file=sys.stderr)
    setattr(model, NEW_HEAD, head)
    return model


class _DropLoadReport:
    """logging filter: transformers' load report table (our own message replaces it)."""

    def filter(self, record: Any) -> bool:
        return "LOAD REPORT" not in str(record.getMessage())


def _head_name(model: Any) -> str:
    """The attribute holding a sequence classifier's head: classifier (BERT-like) or score (decoder models)."""
    for name in ("classifier", "score", "classification_head", "logits_proj"):
        if hasattr(model, name):
            return name
    return "classifier"


def check_pair(model: PreTrainedModel, tok: PreTrainedTokenizerBase, source: Source, task: str) -> None:
    """Fail early, naming both, when the tokenizer can produce ids the model has no embedding row for."""
    embeddings: Any = model.get_input_embeddings()
    rows = int(embeddings.weight.shape[0])
    if len(tok) > rows:
        raise ModelError(
            f"tokenizer and model do not fit: the tokenizer from {source.ref} has {len(tok)} tokens but the model "
            f"from {source.ref} has only {rows} embedding rows. Use the tokenizer that was trained with this model."
        )
    if task == "causal_lm" and tok.eos_token_id is None:
        raise ModelError(f"the tokenizer from {source.ref} has no eos token: a causal LM could never learn to stop.")
    if task == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id  # the classifier finds each row's last real token by pad id


def load_model(
    cfg: ModelConfig, task: str = "causal_lm", quantization: str = "none", labels: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Source]:
    """Tokenizer and weights from the same resolved folder, checked against each other."""
    source = resolve_source(cfg)
    tok = load_tokenizer(source, cfg)
    model = load_base_model(source, cfg, task, quantization, labels)
    check_pair(model, tok, source, task)
    return model, tok, source
