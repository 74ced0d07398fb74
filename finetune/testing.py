"""Tiny in-process checkpoints for tests and benchmarks: a byte-level BPE tokenizer with a chatml template and a
small Llama (or BERT-style classifier) built from a config, saved as ordinary Hugging Face folders. No network."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "Extract the name and age as JSON: Alice is 31 years old. {\"name\": \"Alice\", \"age\": 31}",
    "user assistant system hello world answer question 0123456789 , . ! ? : ; ' \" { } [ ] ( ) - _ / \\n",
]


def make_tokenizer(folder: str | Path, chat_template: bool = True, vocab_size: int = 400) -> Path:
    """A tiny byte-level BPE tokenizer trained on CORPUS (chatml special tokens, EOS <|im_end|>, its own pad token),
    saved in `folder` (the chatml template too when `chat_template`); returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None)
    if chat_template:
        fast.chat_template = CHATML
    folder = Path(folder)
    fast.save_pretrained(folder)
    return folder


def make_causal_lm(folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, chat_template: bool = True) -> Path:
    """A tiny LlamaForCausalLM plus tokenizer in `folder`, deterministic for a given seed."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = make_tokenizer(folder, chat_template)
    tok = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_classifier_base(folder: str | Path, seed: int = 0, hidden: int = 32) -> Path:
    """A tiny BERT encoder checkpoint (the classifier head is added at load time, as for a real encoder)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = make_tokenizer(folder, chat_template=False)
    tok = AutoTokenizer.from_pretrained(folder)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """`rows` as JSON lines at `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int = 32) -> list[dict]:
    """A learnable toy task: repeat a name in a fixed answer shape."""
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    return [{"prompt": f"name: {names[i % 8]}", "completion": f"hello {names[i % 8]}"} for i in range(n)]


def farewell_rows(n: int = 32) -> list[dict]:
    """qa_rows answered with "bye" instead of "hello": a second adapter that visibly differs from the first."""
    return [{"prompt": r["prompt"], "completion": r["completion"].replace("hello", "bye")} for r in qa_rows(n)]


def preference_rows(n: int = 32, chat: bool = False) -> list[dict]:
    """qa_rows as preference pairs: "hello <name>" preferred to "bye <name>" (the answers of farewell_rows); with
    `chat`, in TRL's conversational shape (system + user prompt, one assistant message per side)."""
    pairs = [{"prompt": q["prompt"], "chosen": q["completion"], "rejected": f["completion"]}
             for q, f in zip(qa_rows(n), farewell_rows(n), strict=True)]
    if not chat:
        return pairs
    return [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def class_rows(n: int = 32) -> list[dict]:
    """A separable two-class sentiment toy set (text + named label)."""
    words = [("great", "pos"), ("awful", "neg"), ("fine", "pos"), ("bad", "neg")]
    return [{"text": f"{words[i % 4][0]} movie", "label": words[i % 4][1]} for i in range(n)]


def chat_rows(n: int = 32) -> list[dict]:
    """Two-turn chats behind one system prompt: the first answer names the person asked about, the second is fixed."""
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    return [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"who is {names[i % 8]}?"},
                          {"role": "assistant", "content": f"{names[i % 8]} is a friend"},
                          {"role": "user", "content": "and then?"},
                          {"role": "assistant", "content": "the end"}]} for i in range(n)]


JSON_SYSTEM = "Reply with one JSON object with the key name."


def json_rows(n: int = 32) -> list[dict]:
    """Quickstart-shaped chat rows: every row shares a system prompt, the user gives a name, the answer is JSON."""
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    return [{"messages": [{"role": "system", "content": JSON_SYSTEM},
                          {"role": "user", "content": f"name: {names[i % 8]}"},
                          {"role": "assistant", "content": json.dumps({"name": names[i % 8]})}]} for i in range(n)]


def _permute(w, n_head: int):  # type: ignore[no-untyped-def]
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_folder: Path, out: Path) -> Path:
    """Write the tiny HF Llama in `hf_folder` (finetune.testing.make_causal_lm) as an F32 GGUF file with its
    byte-level BPE tokenizer and chat template."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(hf_folder)
    tok = AutoTokenizer.from_pretrained(hf_folder)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(w, tok, hf_folder)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, value in sorted(load_file(str(hf_folder / "model.safetensors")).items()):
        value = value.astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            part = rest.rsplit(".", 1)[0]
            if part == "self_attn.q_proj":
                value = _permute(value, cfg.num_attention_heads)
            elif part == "self_attn.k_proj":
                value = _permute(value, cfg.num_key_value_heads)
            names[name] = f"blk.{i}.{parts[part]}.weight"
        w.add_tensor(names[name], value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add_tokenizer(w, tok, hf_folder: Path) -> None:  # type: ignore[no-untyped-def]
    model = json.loads((hf_folder / "tokenizer.json").read_text())["model"]
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.added_tokens_decoder)  # ids of <|im_start|> and friends: control tokens in GGUF terms
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)


def last(stream: Iterable[T]) -> T | None:
    """The final value of a stream (e.g. the full text of a streamed answer), consuming it; None when empty."""
    from collections import deque

    tail = deque(stream, maxlen=1)
    return tail[0] if tail else None


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.testing DIR`: write a tiny model (DIR/model) and toy data (DIR/train.jsonl, DIR/val.jsonl),
    enough to try the whole pipeline in seconds without downloading anything (configs/tiny.yaml uses .cache/tiny)."""
    import sys

    out = Path((argv if argv is not None else sys.argv[1:] or [".cache/tiny"])[0])
    if not (out / "model" / "config.json").is_file():
        make_causal_lm(out / "model")
    write_jsonl(out / "train.jsonl", qa_rows(64))
    write_jsonl(out / "val.jsonl", qa_rows(8))
    print(f"tiny model and data in {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def load_script(path: Path) -> ModuleType:
    """A script of the repository (scripts/*.py, not a package module) imported by path, for tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
