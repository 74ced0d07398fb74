"""The OpenAI wire format that `finetune serve` speaks: request bodies (validated with pydantic, each field once),
response and stream-chunk bodies, and error objects. Only what the server implements is accepted; OpenAI features
it does not implement are refused by name rather than silently ignored."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.serving.stream import Chunk

MAX_STOP = 4  # OpenAI's limit on stop sequences

# field -> the value that means "not used"; anything else is refused with a clear message
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
               "tool_choice": (None, "none", "auto"), "functions": (None, []), "best_of": (None, 1),
               "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0)}


class TextPart(BaseModel):
    """A text part of a message's content list (the only part type accepted)."""

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message: a string, or a list of text parts joined by `text()`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined without separators)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    """`stream_options`: with include_usage, a last chunk carries the token usage."""

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")  # unknown fields are checked against UNSUPPORTED, then ignored

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says (benchmarks)

    def stops(self) -> tuple[str, ...]:
        """`stop` as a tuple of strings (empty when not set)."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def refused(self) -> list[tuple[str, str]]:
        """(field, why) for every setting this server cannot honour."""
        out = []
        if self.n != 1:
            out.append(("n", f"n={self.n}: this server returns exactly one choice per request (n=1)"))
        if len(self.stops()) > MAX_STOP:
            out.append(("stop", f"at most {MAX_STOP} stop sequences, got {len(self.stops())}"))
        extra = self.model_extra or {}
        for name, unused in UNSUPPORTED.items():
            if name in extra and extra[name] not in unused:
                out.append((name, f"'{name}' is not supported by finetune serve"))
        return out

    def new_tokens(self) -> int | None:
        """The requested maximum of new tokens; None: the server's limit (a value above it is refused)."""
        return self.max_tokens


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions: the messages; max_completion_tokens wins over max_tokens."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def new_tokens(self) -> int | None:
        """max_completion_tokens (OpenAI's current name), else max_tokens; None when neither is set."""
        return self.max_completion_tokens or self.max_tokens

    def as_prompt(self) -> list[dict[str, str]]:
        """The messages as the engine takes them (developer messages are system messages)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: one prompt string (a list of exactly one is accepted)."""

    prompt: str | list[str]

    def text(self) -> str | None:
        """The one prompt string (a list of exactly one is accepted, as OpenAI clients send); None otherwise."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if len(self.prompt) == 1 else None


class ClassifyRequest(BaseModel):
    """POST /v1/classify (finetune's own endpoint): one text or a list of texts for a classifier."""

    model: str = Field(min_length=1)
    input: str | list[str]

    def texts(self) -> list[str]:
        """`input` as a list of texts."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


# -- responses ----------------------------------------------------------------------------------------------------


def usage(chunk: Chunk) -> dict[str, int]:
    """The OpenAI `usage` object of a finished generation."""
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.tokens,
            "total_tokens": chunk.prompt_tokens + chunk.tokens}


def finish(chunk: Chunk) -> str | None:
    """OpenAI knows stop and length; a cancelled request has no client left to read it."""
    return chunk.finish_reason if chunk.finish_reason in ("stop", "length") else None


def chat_response(rid: str, model: str, created: int, chunk: Chunk) -> dict[str, Any]:
    """A `chat.completion` body: one choice holding the whole answer, with its finish reason and usage."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": chunk.text},
                         "finish_reason": finish(chunk), "logprobs": None}],
            "usage": usage(chunk)}


def completion_response(rid: str, model: str, created: int, chunk: Chunk) -> dict[str, Any]:
    """A `text_completion` body: one choice holding the whole text, with its finish reason and usage."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": chunk.text, "finish_reason": finish(chunk), "logprobs": None}],
            "usage": usage(chunk)}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str], reason: str | None) -> dict[str, Any]:
    """One streamed `chat.completion.chunk`: the `delta` of the message, and the finish reason on the last one."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}


def completion_chunk(rid: str, model: str, created: int, text: str, reason: str | None) -> dict[str, Any]:
    """One streamed `text_completion` chunk: the new text, and the finish reason on the last one."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, chunk: Chunk) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(chunk)}


def model_list(ids: list[str], root: str, created: int) -> dict[str, Any]:
    """GET /v1/models: every id as a model, the adapters with parent "base", all with root `root`."""
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "finetune",
                                        "root": root, "parent": None if i == "base" else "base"} for i in ids]}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object: message, type (`kind`), and the parameter and code when known."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def now() -> int:
    """The `created` timestamp of a response: Unix time in whole seconds."""
    return int(time.time())
