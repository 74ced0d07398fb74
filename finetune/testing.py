"""Tiny in-process checkpoints for tests and benchmarks: a byte-level BPE tokenizer with a chatml template and a
small Llama (or BERT-style classifier) built from a config, saved as ordinary Hugging Face folders. No network."""

from __future__ import annotations

import json
from pathlib import Path

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int = 32) -> list[dict]:
    """A learnable toy task: repeat a name in a fixed answer shape."""
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    return [{"prompt": f"name: {names[i % 8]}", "completion": f"hello {names[i % 8]}"} for i in range(n)]


def chat_rows(n: int = 32) -> list[dict]:
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    return [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"who is {names[i % 8]}?"},
                          {"role": "assistant", "content": f"{names[i % 8]} is a friend"},
                          {"role": "user", "content": "and then?"},
                          {"role": "assistant", "content": "the end"}]} for i in range(n)]


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
