"""Chat conversations -> {input_ids, labels}, with the assistant mask computed from prefix renderings.

No `{% generation %}` markers are needed: for each trained assistant turn k, the trained tokens lie between
render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]). Two paths compute the same thing:
- exact: tokenizes every prefix with `apply_chat_template` (what inference does) and checks each is a token prefix of
  the whole conversation; slow, used on the first rows of every source as proof, and as the fallback;
- fast: renders all prefixes as strings in one call, tokenizes the whole conversations in one batched call with
  offsets, and maps the prefix lengths to token positions. A token that straddles a boundary sends that row down the
  exact path (which refuses it if the prompt would tokenize differently alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.data.prompting import chat_ids
from finetune.data.tokenize import Boundaries
from finetune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
Messages = list[dict[str, Any]]
Example = dict[str, list[int]]
PROOF_ROWS = 8  # rows per source encoded both ways and compared


class ChatEncoder:
    """Conversations -> {input_ids, labels}, with loss only on the assistant turns data.train_on picks.

    Raises DataError when the tokenizer has no chat template, or a conversation cannot be rendered consistently."""

    def __init__(self, tok: PreTrainedTokenizerBase, train_on: str = "assistant"):
        if not getattr(tok, "chat_template", None):
            raise DataError("the data needs a chat template but the tokenizer has none: set model.chat_template "
                            "(a built-in: chatml, llama3, zephyr, or a .jinja file)")
        self.tok, self.train_on = tok, train_on
        self.fast = bool(getattr(tok, "is_fast", False))
        self.proven = 0  # rows checked against the exact path so far
        self.fallbacks = 0  # rows the fast path handed to the exact path
        self._template: Any = None
        self.bounds = Boundaries(tok)
        self._kwargs: dict[str, Any] = {}

    def targets(self, messages: Messages) -> list[int]:
        """Indices of the assistant turns that carry loss."""
        turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
        return turns[-1:] if self.train_on == "last" else turns

    def encode(self, convs: list[Messages], wheres: list[str]) -> list[Example]:
        if not self.fast:
            return [self.exact(m, w) for m, w in zip(convs, wheres, strict=True)]
        try:
            out = self._fast(convs, wheres)
        except Exception:  # noqa: BLE001 - a row the template refuses: the exact path names it
            return [self.exact(m, w) for m, w in zip(convs, wheres, strict=True)]
        self._prove(convs, wheres, out)
        return out

    def exact(self, messages: Messages, where: str) -> Example:
        try:
            ids = chat_ids(self.tok, messages)
        except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, or a template's own raise_exception()
            raise DataError(f"{where}: the chat template cannot render this conversation ({type(exc).__name__}: "
                            f"{exc}); fix the row (e.g. roles that alternate user/assistant), or set "
                            "model.chat_template to a template that accepts it") from None
        if self.train_on == "all":
            return {"input_ids": ids, "labels": list(ids)}
        labels = [IGNORE] * len(ids)
        for k in self.targets(messages):
            start = self._checked_prefix(ids, messages[:k], True, where)
            end = self._checked_prefix(ids, messages[: k + 1], False, where)
            labels[start:end] = ids[start:end]
        return {"input_ids": ids, "labels": labels}

    def _checked_prefix(self, ids: list[int], part: Messages, gen: bool, where: str) -> int:
        prefix = chat_ids(self.tok, part, add_generation_prompt=gen) if part or gen else []
        if ids[: len(prefix)] != prefix:
            raise DataError(
                f"{where}: the chat template renders the first {len(part)} message(s) differently alone than inside "
                "the whole conversation, so the prompt at inference would not match training. Use a template whose "
                "renderings are prefixes of each other (set model.chat_template), data.train_on: last (only the last "
                "turn's prompt must match), or a different format."
            )
        return len(prefix)

    def _render(self, convs: list[Messages], gen: bool) -> list[str]:
        """Render with the compiled template directly, as apply_chat_template does but without its per-call copying
        of every message (a third of the time). The proof rows in `_prove` check the result against
        apply_chat_template itself."""
        if self._template is None:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._template = _compile_jinja_template(self.tok.chat_template)
            self._kwargs = dict(self.tok.special_tokens_map)
        render = self._template.render
        return [render(messages=m, tools=None, documents=None, add_generation_prompt=gen, **self._kwargs) for m in convs]

    def _fast(self, convs: list[Messages], wheres: list[str]) -> list[Example]:
        full = self._render(convs, False)
        targets = [self.targets(m) if self.train_on != "all" else [] for m in convs]
        starts = iter(self._render([m[:k] for m, ts in zip(convs, targets, strict=True) for k in ts], True))
        # a turn that ends the conversation ends where the full rendering ends: no need to render it again
        ends = iter(self._render([m[: k + 1] for m, ts in zip(convs, targets, strict=True) for k in ts if k + 1 < len(m)], False))
        all_ids = self.bounds.encode(full)
        out = []
        for i, text in enumerate(full):
            spans = [(next(starts), next(ends) if k + 1 < len(convs[i]) else text) for k in targets[i]]
            example = self._labelled(i, text, all_ids[i], spans)
            if example is None:
                self.fallbacks += 1
                example = self.exact(convs[i], wheres[i])
            out.append(example)
        return out

    def _labelled(self, row: int, text: str, ids: list[int], spans: list[tuple[str, str]]) -> Example | None:
        """Labels from the prefix renderings mapped to token positions; None when a boundary is not clean."""
        if self.train_on == "all":
            return {"input_ids": ids, "labels": list(ids)}
        labels = [IGNORE] * len(ids)
        for prompt, upto in spans:
            if not (text.startswith(prompt) and text.startswith(upto)):
                return None
            a, b = self.bounds.token_at(row, prompt), self.bounds.token_at(row, upto)
            if a is None or b is None:
                return None
            labels[a:b] = ids[a:b]
        return {"input_ids": ids, "labels": labels}

    def _prove(self, convs: list[Messages], wheres: list[str], out: list[Example]) -> None:
        """The first rows are also encoded the exact way; any difference means the fast path cannot be trusted for
        this tokenizer and template, so everything goes the exact way from then on."""
        for m, w, ex in zip(convs, wheres, out, strict=True):
            if self.proven >= PROOF_ROWS:
                return
            self.proven += 1
            if self.exact(m, w) != ex:
                self.fast = False
                out[:] = [self.exact(mm, ww) for mm, ww in zip(convs, wheres, strict=True)]
                return


def check_end_of_turn(tok: Any, examples: list[dict[str, Any]], where: str) -> str:
    """The token that ends an answer must be trained, or the model never learns to stop. Checked on the first
    examples (any of them, since truncation may cut it from some). Returns the token's text."""
    trained = {t for ex in examples for t in ex.get("labels", ex.get("chosen_labels", [])) if t != IGNORE}
    if tok.eos_token_id in trained:
        return str(tok.eos_token)
    special = trained & set(getattr(tok, "all_special_ids", []))
    if special:
        return str(tok.convert_ids_to_tokens(sorted(special)[0]))
    raise DataError(
        f"{where}: neither the EOS token ({tok.eos_token!r}) nor any end-of-turn special token is among the trained "
        "tokens of the first examples, so the model would never learn to stop. The chat template must end assistant "
        "turns with EOS or an end-of-turn token; or raise data.max_seq_len if the examples were truncated."
    )
