"""Batched tokenization with token boundaries, for finding where a rendered prefix ends in the token stream.

Asking the tokenizer for character offsets costs about as much as tokenizing itself. For byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen, SmolLM...) with no normaliser, every token stands for a fixed byte string, so
the byte offsets follow from a table of token byte lengths; a row whose token bytes do not add up to its text is
handed to the offsets path. Other tokenizers use the offsets the tokenizer reports.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any


class Boundaries:
    """Token ids of a batch of texts, and `token_at(row, char)` for prefix lengths in characters."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.lengths = _byte_lengths(tok)

    def encode(self, texts: list[str]) -> list[list[int]]:
        self.texts = texts
        if self.lengths is None:
            enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
            self.ids, self.ends = [list(x) for x in enc["input_ids"]], [[int(b) for _, b in o] for o in enc["offset_mapping"]]
            self.starts = [[int(a) for a, _ in o] for o in enc["offset_mapping"]]
            return self.ids
        import numpy as np

        self.ids = [e.ids for e in self.tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        self.ends, self.starts = [], []
        for text, ids in zip(texts, self.ids, strict=True):
            lens = self.lengths[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, dtype=np.int64)
            ends = np.cumsum(lens)
            if (int(ends[-1]) if len(ends) else 0) != len(text.encode("utf-8")):
                self.ends.append([])  # tokens do not spell the text byte for byte: no boundary can be trusted
                self.starts.append([])
                continue
            self.ends.append(ends.tolist())
            self.starts.append((ends - lens).tolist())
        return self.ids

    def token_at(self, row: int, prefix: str) -> int | None:
        """Index of the first token at or after the end of `prefix` (a prefix of texts[row]); None if a token
        straddles that point or boundaries are unknown for the row."""
        starts, ends = self.starts[row], self.ends[row]
        if not ends and self.ids[row]:
            return None
        pos = len(prefix) if self.lengths is None else len(prefix.encode("utf-8"))
        i = bisect_left(starts, pos)
        if i > 0 and ends[i - 1] > pos:
            return None
        return i


def _byte_lengths(tok: Any) -> Any:
    """Byte length of every token id, or None when the tokenizer is not plain byte-level BPE."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    if not hasattr(backend, "encode_batch_fast"):
        return None
    import numpy as np

    lengths = np.zeros(max(len(tok), backend.get_vocab_size(with_added_tokens=True)), dtype=np.int64)
    for token, i in backend.get_vocab(with_added_tokens=False).items():
        lengths[i] = len(token)  # byte-level alphabet: one character per byte
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if added.lstrip or added.rstrip:
            return None  # such tokens swallow neighbouring spaces: their byte length is not fixed
        lengths[i] = len(added.content.encode("utf-8"))
    return lengths
