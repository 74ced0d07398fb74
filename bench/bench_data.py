"""Benchmark the data pipeline against TRL's SFTTrainer dataset preparation, and streaming memory.

    .venv/bin/python bench/bench_data.py                      # 100k chat rows, with and without packing, + 1M streaming
    .venv/bin/python bench/bench_data.py --rows 20000 --stream-rows 0 --tokenizer PATH

Both pipelines get the same rows (a JSONL file) and the same tokenizer and chat template (chatml with
`{% generation %}` markers, which TRL needs for assistant-only loss and we ignore), and produce the same
{input_ids, labels}: the script checks this on a sample before timing is trusted. Times include reading the file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CHATML_GEN = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ["the", "model", "data", "train", "answer", "question", "paris", "capital", "france", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "alice", "bob", "carol", "json", "name", "age", "value", "list", "token", "batch", "loss", "learning", "rate", "adapter", "weight", "bias", "layer"]
DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / ".cache/models/SmolLM2-135M-Instruct"


def synthetic_chats(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(3, 8)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": text(5, 40)}, {"role": "assistant", "content": text(5, 60)}]
        rows.append({"messages": msgs})
    return rows


def load_tokenizer(path: str | None, tmp: Path) -> Any:
    from transformers import AutoTokenizer

    from finetune.testing import make_tokenizer

    folder = Path(path) if path else DEFAULT_TOKENIZER if DEFAULT_TOKENIZER.exists() else make_tokenizer(tmp / "tok")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML_GEN
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    print(f"tokenizer: {folder} (vocab {len(tok)})")
    return tok


def run_ours(path: Path, tok: Any, max_len: int, packing: bool) -> tuple[float, list[dict[str, Any]]]:
    from finetune.config.data import DataConfig
    from finetune.data import build_data

    start = time.perf_counter()
    bundle = build_data(DataConfig(train=str(path), max_seq_len=max_len, packing=packing, cache=False), tok)
    seconds = time.perf_counter() - start
    if packing:
        print(f"  ours packing efficiency: {bundle.stats['packing_efficiency']:.4f}")
    return seconds, list(bundle.train)


def run_trl(path: Path, tok: Any, max_len: int, packing: bool, tmp: Path) -> tuple[float, list[dict[str, Any]]]:
    """SFTTrainer._prepare_dataset (what SFTTrainer.__init__ runs) without building a model or a trainer."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    args = SFTConfig(output_dir=str(tmp / "trl"), max_length=max_len, assistant_only_loss=True, packing=packing,
                     packing_strategy="bfd", report_to=[], shuffle_dataset=False, bf16=False, use_cpu=True)
    trainer = types.SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=None)
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp / f"hf_cache_{packing}"))  # fresh: no reuse of a previous run
    out = SFTTrainer._prepare_dataset(trainer, ds, tok, args, packing, None, "train")  # type: ignore[arg-type]
    rows = out.to_list()
    return time.perf_counter() - start, rows


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], n: int = 200) -> None:
    same = sum(a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] for a, b in zip(ours[:n], theirs[:n], strict=False))
    print(f"  identical input_ids+labels on the first {n}: {same}/{n}")


def tokens(rows: list[dict[str, Any]]) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def bench(rows: int, tok: Any, tmp: Path, max_len: int) -> None:
    path = tmp / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chats(rows)))
    for packing in (False, True):
        print(f"\n{rows} chat rows, max_len {max_len}, packing={packing}")
        t_ours, ours = run_ours(path, tok, max_len, packing)
        t_trl, theirs = run_trl(path, tok, max_len, packing, tmp)
        if not packing:
            compare(ours, theirs)
        n_tok = tokens(ours)
        print(f"  {'':14}{'seconds':>9}{'rows/s':>11}{'tokens/s':>12}")
        print(f"  {'finetune':14}{t_ours:9.2f}{rows / t_ours:11.0f}{n_tok / t_ours:12.0f}")
        print(f"  {'trl SFT prep':14}{t_trl:9.2f}{rows / t_trl:11.0f}{tokens(theirs) / t_trl:12.0f}")
        print(f"  speed ratio finetune/trl: {t_trl / t_ours:.2f}x")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_streaming(rows: int, tok: Any, tmp: Path, max_len: int) -> None:
    from finetune.config.data import DataConfig
    from finetune.data import build_data

    path = tmp / "stream.jsonl"
    rng = random.Random(1)
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"q{i} " + " ".join(rng.choice(WORDS) for _ in range(8)),
                                "completion": " ".join(rng.choice(WORDS) for _ in range(12))}) + "\n")
    print(f"\nstreaming {rows} rows ({path.stat().st_size / 2**20:.0f} MB file), packing on")
    bundle = build_data(DataConfig(train=str(path), max_seq_len=max_len, streaming=True, packing=True), tok)
    base, peak, n, start = rss_mb(), 0.0, 0, time.perf_counter()
    for n, _ in enumerate(bundle.train, 1):
        if n % 5000 == 0:
            peak = max(peak, rss_mb())
    peak = max(peak, rss_mb())
    print(f"  {bundle.stats['rows']} rows -> {n} packed rows in {time.perf_counter() - start:.1f}s; RSS at start "
          f"{base:.0f} MB, peak {peak:.0f} MB, growth {peak - base:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--stream-rows", type=int, default=1_000_000)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: SmolLM2 if cached, else tiny)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok = load_tokenizer(args.tokenizer, tmp)
        if args.rows:
            bench(args.rows, tok, tmp, args.max_len)
        if args.stream_rows:
            bench_streaming(args.stream_rows, tok, tmp, args.max_len)


if __name__ == "__main__":
    main()
