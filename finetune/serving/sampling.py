"""Per-row token choice and text: each request keeps its own sampling settings and random generator, so its output
does not depend on what else is in the batch, and its own detokenizer that holds back text until it is final
(an incomplete UTF-8 character, or the start of a stop string)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.serving.stream import GenerationParams

if TYPE_CHECKING:
    import torch

INCOMPLETE = "\ufffd"  # what decode shows for the first bytes of a character split across tokens


class RowDecoder:
    """One request's output: token choice, stop ids, stop strings and the text emitted so far."""

    def __init__(self, tok: Any, params: GenerationParams, stop_ids: list[int]):
        self.tok, self.params = tok, params
        self.stop_ids = set() if params.ignore_eos else set(stop_ids)
        self.stops = tuple(s for s in params.stop if s)
        self.ids: list[int] = []
        self.tokens = 0
        self.text = ""  # emitted text: the concatenation of every delta
        self.finish: str | None = None
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            import torch

            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def push(self, token: int) -> str:
        """Take the next token; return the text it makes final (maybe ""). Sets `finish` when the answer ends."""
        self.tokens += 1
        if token in self.stop_ids:
            self.finish = "stop"
            return self._emit(self._decoded(), final=True)
        self.ids.append(token)
        full = self._decoded()
        cut = self._stop_at(full)
        if cut is not None:
            self.finish = "stop"
            return self._emit(full[:cut], final=True)
        if self.tokens >= self.params.max_new_tokens:
            self.finish = "length"
            return self._emit(full, final=True)
        return self._emit(full, final=False)

    def _decoded(self) -> str:
        return str(self.tok.decode(self.ids, skip_special_tokens=True))

    def _stop_at(self, full: str) -> int | None:
        if not self.stops:
            return None
        start = max(0, len(self.text) - max(len(s) for s in self.stops))
        found = [i for i in (full.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _emit(self, full: str, final: bool) -> str:
        end = len(full)
        if not final:
            if full.endswith(INCOMPLETE):
                return ""
            end -= self._held(full)
        delta = full[len(self.text) : end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _held(self, full: str) -> int:
        """Length of the longest end of `full` that could begin a stop string (not sent until it is decided)."""
        for n in range(min(len(full), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(full[-n:]) for s in self.stops):
                return n
        return 0


def choose(logits: torch.Tensor, rows: list[RowDecoder]) -> list[int]:
    """The next token of every row from its last-position logits (n x vocab): argmax for greedy rows, nucleus
    sampling with the row's own generator for the others."""
    import torch

    logits = logits.float()
    picked = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.generator is not None:
            probs = torch.softmax(logits[i] / row.params.temperature, dim=-1)
            picked[i] = _nucleus(probs, row.params.top_p, row.generator)
    return [int(t) for t in picked]


def _nucleus(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """Sample among the most likely tokens whose probabilities add up to top_p (the first one always kept)."""
    import torch

    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
