"""The catalogue of bad inputs: each case runs one `finetune` command on a bad input and must end with the expected
exit code, a message holding the expected fragment, no traceback, and the working folders exactly as they were
(nothing written, nothing deleted: a snapshot of every path, size, content hash and mtime before and after).

Exit codes: 2 = the config (file:line, hint), 1 = any other refused input. Cases are grouped by area; the counts per
area are asserted so the table cannot shrink unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune.testing import chat_rows, class_rows, qa_rows, write_jsonl

AREAS = ("config", "data", "model", "output", "resume", "adapters", "publish", "demo")
TOKEN = "hf_" + "Qz7" * 12  # token-shaped, not a real token


@dataclass
class Ctx:
    """What a case can use: its own folder (the working directory), the shared tiny models, and copies of the
    trained adapters and checkpoints made on request."""

    root: Path
    tiny_lm: Path
    tiny_enc: Path
    trained: Path  # session job folder: <trained>/tiny/job.yaml, adapters/tiny, adapters/.work/tiny/checkpoints
    cls_adapter: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def job(self) -> Path:
        return self.root / "job.yaml"

    @property
    def adapter(self) -> Path:
        return self.root / "adapters" / "tiny"

    @property
    def ckpts(self) -> Path:
        return self.root / "adapters" / ".work" / "tiny" / "checkpoints"

    def values(self) -> dict[str, str]:
        return {"root": str(self.root), "job": str(self.job), "adapter": str(self.adapter), "tiny_lm": str(self.tiny_lm),
                "tiny_enc": str(self.tiny_enc), "trained_job": str(self.trained / "tiny" / "job.yaml"),
                "cls": str(self.root / "adapters" / "cls"), "ckpts": str(self.ckpts)}


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    argv: tuple[str, ...]
    code: int
    message: str
    setup: Callable[[Ctx], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


# --- setups: each writes the bad input into ctx.root -------------------------------------------------------------

def job(**sections: Any) -> Callable[[Ctx], None]:
    """A job.yaml over the tiny model and ./train.jsonl (qa rows unless `rows` is given), sections merged in."""
    def write(ctx: Ctx) -> None:
        base: dict[str, Any] = {
            "model": {"name_or_path": str(ctx.tiny_lm)},
            "data": {"train": "train.jsonl", "max_seq_len": 64, "cache": False},
            "lora": {"r": 4, "alpha": 8},
            "train": {"max_steps": 2, "micro_batch_size": 4, "precision": "fp32"},
            "output": {"dir": "adapters", "run_name": "tiny"},
        }
        for name, values in sections.items():
            if isinstance(values, dict):
                base.setdefault(name, {}).update(values)
            else:
                base[name] = values
        ctx.job.write_text(yaml.safe_dump(base, sort_keys=False))
        if not (ctx.root / "train.jsonl").exists():
            write_jsonl(ctx.root / "train.jsonl", qa_rows(8))
    return write


def data(name: str, content: bytes | str | list[dict[str, Any]], **data_cfg: Any) -> Callable[[Ctx], None]:
    """A data file (raw bytes, text or JSON rows) and a job that trains on it."""
    def write(ctx: Ctx) -> None:
        path = ctx.root / name
        if isinstance(content, list):
            write_jsonl(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        job(data={"train": name, **data_cfg})(ctx)
    return write


def text_file(name: str, content: str | bytes) -> Callable[[Ctx], None]:
    def write(ctx: Ctx) -> None:
        path = ctx.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return write


def both(*setups: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        for setup in setups:
            setup(ctx)
    return run


def adapter(ctx: Ctx) -> None:
    shutil.copytree(ctx.trained / "adapters" / "tiny", ctx.adapter)


def cls_adapter(ctx: Ctx) -> None:
    shutil.copytree(ctx.cls_adapter, ctx.root / "adapters" / "cls")


def damaged(edit: Callable[[Path], None]) -> Callable[[Ctx], None]:
    """A copy of the trained adapter with one file edited."""
    def write(ctx: Ctx) -> None:
        adapter(ctx)
        edit(ctx.adapter)
    return write


def truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-300])


def nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def edit_json(name: str, **changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        value = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**value, **changes}))
    return edit


def checkpoints(ctx: Ctx) -> None:
    """The session run's checkpoints (steps 2 and 4), as if this folder had trained them."""
    shutil.copytree(ctx.trained / "adapters" / ".work", ctx.root / "adapters" / ".work")


def ckpt_edit(edit: Callable[[Path], None], which: tuple[str, ...] = ("step-00000004",)) -> Callable[[Ctx], None]:
    def write(ctx: Ctx) -> None:
        checkpoints(ctx)
        for name in which:
            edit(ctx.ckpts / name)
    return write


def corrupt_weights(folder: Path) -> None:
    (folder / "trainable.safetensors").write_bytes(b"\0" * 40)


def legacy_format(folder: Path) -> None:
    """How finetune <= 0.x wrote checkpoints: a pickled optim.pt and no format number."""
    state = json.loads((folder / "trainer_state.json").read_text())
    state.pop("format")
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "optimizer.pt").rename(folder / "optim.pt")


class _RunsCode:
    """Unpickling this calls os.system: what a malicious shared checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def malicious(folder: Path) -> None:
    with open(folder / "optimizer.pt", "wb") as fh:
        pickle.dump({"optimizer": _RunsCode(folder.parents[4] / "pwned"), "scheduler": {}, "rng": {}}, fh)


def no_login(ctx: Ctx) -> None:
    ctx.monkeypatch.delenv("HF_TOKEN", raising=False)
    ctx.monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(ctx.root / "no-token"))


def unwritable(ctx: Ctx) -> None:
    """As root nothing is unwritable, so the permission answer is what we simulate."""
    real = os.access
    target = str(ctx.root / "locked")
    ctx.monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == target else real(p, mode, **kw))
    (ctx.root / "locked").mkdir()
    job(output={"dir": "locked/adapters"})(ctx)


RAISING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}"
                    "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
ASSISTANT_FIRST = [{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"},
                                 {"role": "assistant", "content": "y"}]}]
CONTENT_NULL = [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}]

V = "config validate {job}"
T = "train {job}"
P = "data preview {job}"
CASES: list[Case] = [
    # --- config: exit 2 with file:line and a hint, from `config validate` and `train` alike -----------------------
    Case("binary config", "config", ("config", "validate", "{root}/bin.yaml"), 2, "not a text file",
         text_file("bin.yaml", b"\x00\xff\xfe\x01 binary")),
    Case("config is a folder", "config", ("config", "validate", "{root}"), 2, "is a folder"),
    Case("config missing", "config", ("config", "validate", "{root}/nope.yaml"), 2, "config file not found"),
    Case("yaml syntax", "config", ("config", "validate", "{root}/bad.yaml"), 2, "not valid YAML",
         text_file("bad.yaml", "model: {name_or_path: x\n")),
    Case("yaml list", "config", ("config", "validate", "{root}/list.yaml"), 2, "expected a mapping",
         text_file("list.yaml", "- a\n- b\n")),
    Case("duplicate key", "config", ("config", "validate", "{root}/dup.yaml"), 2, "key given twice",
         text_file("dup.yaml", "model: {name_or_path: x}\ndata: {train: t.jsonl}\nlora:\n  r: 4\n  r: 8\n")),
    Case("typo with suggestion", "config", (*V.split(), "lora.rank=8"), 2, "did you mean 'lora.r'", job()),
    Case("fp16 on cpu: validate", "config", (*V.split(), "train.precision=fp16"), 2, "fp16 needs a CUDA GPU", job()),
    Case("fp16 on cpu: train", "config", (*T.split(), "train.precision=fp16"), 2, "fp16 needs a CUDA GPU", job()),
    Case("qlora without lora: validate", "config", (*V.split(), "lora.enabled=false", "lora.quantization=4bit"), 2,
         "lora.enabled is false", job()),
    Case("qlora without lora: train", "config", (*T.split(), "lora.enabled=false", "lora.quantization=4bit"), 2,
         "lora.enabled is false", job()),
    Case("streaming without max_steps", "config", (*V.split(), "data.streaming=true", "train.max_steps=null"), 2,
         "set train.max_steps", job()),
    Case("val_size and validation", "config", (*V.split(), "data.val_size=0.1", "data.validation=train.jsonl"), 2,
         "not both", job()),
    Case("eval_every without validation: train", "config", (*T.split(), "train.eval_every=1"), 2,
         "needs validation data", job()),
    Case("early stopping without eval_every", "config", (*V.split(), "train.early_stopping_patience=2"), 2,
         "train.eval_every is not set", job()),
    Case("micro batch 1e12", "config", (*V.split(), "train.micro_batch_size=1000000000000"), 2,
         "less than or equal to 65536", job()),
    Case("max_seq_len absurd", "config", (*V.split(), "data.max_seq_len=100000000000"), 2,
         "less than or equal to 1048576", job()),
    Case("lora.r absurd", "config", (*V.split(), "lora.r=1000000000"), 2, "less than or equal to 4096", job()),
    Case("val_size fractional count", "config", (*V.split(), "data.val_size=2.5"), 2, "neither a share", job()),
    Case("classification packing", "config", (*V.split(), "task=classification", "data.packing=true"), 2,
         "data.packing: false", job()),
    Case("override without =", "config", (*V.split(), "lora.r"), 2, "must look like section.key=value", job()),
    Case("model folder missing", "config", (*T.split(), "model.name_or_path=./no-model"), 2, "folder not found", job()),
    Case("resume folder missing", "config", (*T.split(), "train.resume=./no-ckpt"), 2,
         "checkpoint folder not found", job()),
    Case("run name with a slash", "config", (*V.split(), "output.run_name=a/b"), 2, "should match pattern", job()),
    Case("negative learning rate", "config", (*V.split(), "train.learning_rate=-1"), 2, "greater than 0", job()),
    Case("data file missing", "config", (*T.split(), "data.train=missing.jsonl"), 2, "file not found", job()),
    Case("gguf file missing", "config", (*V.split(), "model.gguf_file=nope.gguf"), 2, "file not found", job()),
    Case("output.dir is a file", "config", (*T.split(), "output.dir=taken"), 2, "is a file",
         both(job(), text_file("taken", "x"))),
    Case("output.dir under a file", "config", (*T.split(), "output.dir=taken/sub"), 2, "which is a file",
         both(job(), text_file("taken", "x"))),
    Case("output.dir unwritable", "config", T.split(), 2, "permission denied", unwritable),
    # --- data: exit 1, file:line, each skippable with data.on_bad_rows: skip ---------------------------------------
    Case("not UTF-8 jsonl", "data", P.split(), 1, "train.jsonl:2: not UTF-8",
         data("train.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')),
    Case("assistant first", "data", P.split(), 1, "starts with an assistant turn", data("train.jsonl", ASSISTANT_FIRST)),
    Case("content null", "data", P.split(), 1, "'content': null", data("train.jsonl", CONTENT_NULL)),
    Case("corrupt parquet", "data", P.split(), 1, "cannot read the parquet file",
         data("train.parquet", b"PAR1 this is not parquet")),
    Case("ragged csv short row", "data", P.split(), 1, "train.csv:3: 1 cell for 2 columns",
         data("train.csv", "prompt,completion\na,b\nc\n")),
    Case("ragged csv long row", "data", P.split(), 1, "train.csv:3: 3 cells for 2 columns",
         data("train.csv", "prompt,completion\na,b\nc,d,e\n")),
    Case("completion null", "data", P.split(), 1, "field 'completion' is null",
         data("train.jsonl", [{"prompt": "a", "completion": None}])),
    Case("invalid json line", "data", P.split(), 1, "train.jsonl:1: not valid JSON", data("train.jsonl", "{oops\n")),
    Case("json line not an object", "data", P.split(), 1, "expected a JSON object", data("train.jsonl", "[1, 2]\n")),
    Case("unknown columns", "data", P.split(), 1, "cannot tell the data format", data("train.jsonl", [{"foo": "x"}])),
    Case("empty file", "data", P.split(), 1, "holds no rows", data("train.jsonl", "")),
    Case("no assistant turn", "data", P.split(), 1, "no assistant turn",
         data("train.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])),
    Case("sharegpt unknown speaker", "data", P.split(), 1, "unknown speaker",
         data("train.jsonl", [{"conversations": [{"from": "alien", "value": "x"}]}])),
    Case("message not an object", "data", P.split(), 1, "message 0 should be an object",
         data("train.jsonl", [{"messages": ["hello"]}])),
    Case("json file not UTF-8", "data", P.split(), 1, "not UTF-8", data("train.json", b'[{"text": "\xff"}]')),
    Case("unsupported extension", "data", P.split(), 1, "unsupported extension", data("train.xml", "<a/>")),
    Case("glob matches nothing", "data", (*P.split(), "data.train=nothing/*.jsonl"), 1, "no data files found", job()),
    Case("chat template refuses row", "data", (*P.split(), "model.chat_template={root}/raise.jinja"), 1,
         "the chat template cannot render", both(data("train.jsonl", [{"messages": [
             {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}]),
             text_file("raise.jinja", RAISING_TEMPLATE))),
    Case("every row bad under skip", "data", (*P.split(), "data.on_bad_rows=skip"), 1, "holds no rows",
         data("train.jsonl", "{oops\n{oops\n")),
    Case("label not in data.labels", "data", (*P.split(), "task=classification", "model.name_or_path={tiny_enc}",
                                                "data.labels=[pos,neg]"), 1, "is not one of data.labels",
         data("train.jsonl", [*class_rows(4), {"text": "meh", "label": "neutral"}])),
    Case("chat data for classification", "data", (*P.split(), "task=classification"), 1,
         "needs data in the classification format", data("train.jsonl", chat_rows(2))),
    Case("label data for causal lm", "data", P.split(), 1, "needs task: classification",
         data("train.jsonl", class_rows(4))),
    # --- model: exit 1 ----------------------------------------------------------------------------------------------
    Case("target_modules match nothing", "model", (*T.split(), "lora.target_modules=[nope_proj]"), 1,
         "Its linear layers are called: embed_tokens, q_proj", job()),
    Case("model folder without a checkpoint", "model", (*T.split(), "model.name_or_path={root}/empty"), 1,
         "cannot load the tokenizer", both(job(), text_file("empty/README", "nothing here"))),
    Case("tokenizer but no weights", "model", (*T.split(), "model.name_or_path={root}/tok"), 1,
         "cannot load model weights", both(job(), lambda ctx: _tokenizer_only(ctx))),
    Case("unknown model_type", "model", (*T.split(), "model.name_or_path={root}/odd"), 1, "cannot load",
         both(job(), lambda ctx: _model_copy(ctx, "odd", config={"model_type": "no-such-architecture"}))),
    Case("base weights truncated", "model", (*T.split(), "model.name_or_path={root}/cut"), 1,
         "cannot load model weights", both(job(), lambda ctx: _model_copy(ctx, "cut", cut=True))),
    Case("unknown chat template name", "model", (*P.split(), "model.chat_template=vicuna"), 1,
         "neither a .jinja file nor a built-in", job()),
    # --- output: never replace or delete what finetune did not write ----------------------------------------------
    Case("adapter exists", "output", T.split(), 1, "exists; choose another name", both(job(), adapter)),
    Case("foreign folder with overwrite", "output", (*T.split(), "output.overwrite=true"), 1,
         "a folder finetune did not write", both(job(), text_file("adapters/tiny/mine.txt", "mine"))),
    Case("merge into the working directory", "output", ("merge", "{adapter}", "--out", ".", "--overwrite"), 1,
         "a folder finetune did not write", adapter),
    Case("merge onto a file", "output", ("merge", "{adapter}", "--out", "{root}/notes.txt", "--overwrite"), 1,
         "it is a file", both(adapter, text_file("notes.txt", "mine"))),
    Case("merge onto an adapter", "output", ("merge", "{adapter}", "--out", "{adapter}", "--overwrite"), 1,
         "an adapter output, not a merged-model", adapter),
    Case("merge target exists", "output", ("merge", "{adapter}", "--out", "{root}/m"), 1, "exists",
         both(adapter, text_file("m/x", "x"))),
    Case("export onto a foreign file", "output", ("export", "{adapter}", "--format", "gguf", "--out", "{root}/a.txt"),
         1, "it is not a GGUF file", both(adapter, text_file("a.txt", "mine"))),
    Case("import-gguf onto a foreign folder", "output", ("import-gguf", "{root}/m.gguf", "{root}/dst"), 1,
         "is not an import of", both(text_file("m.gguf", b"GGUF"), text_file("dst/x", "x"))),
    # --- resume: a checkpoint must belong to this job -----------------------------------------------------------------
    Case("checkpoint beyond max_steps", "resume", ("train", "{trained_job}", "output.dir={root}/adapters",
                                                   "train.resume=auto", "train.max_steps=2", "data.cache=false"), 1,
         "beyond the 2 steps", checkpoints),
    Case("checkpoint of another rank", "resume", ("train", "{trained_job}", "output.dir={root}/adapters",
                                                  "train.resume=auto", "lora.r=8", "data.cache=false"), 1,
         "lora.r: 4 in the checkpoint, 8 now", checkpoints),
    Case("checkpoint of another learning rate", "resume",
         ("train", "{trained_job}", "output.dir={root}/adapters", "train.resume=auto", "train.learning_rate=0.5",
          "data.cache=false"), 1, "train.learning_rate: 0.01 in the checkpoint, 0.5 now", checkpoints),
    Case("checkpoint of other data", "resume", ("train", "{trained_job}", "output.dir={root}/adapters",
                                                "train.resume=auto", "data.max_seq_len=32", "data.cache=false"), 1,
         "data:", checkpoints),
    Case("every checkpoint damaged", "resume", ("train", "{trained_job}", "output.dir={root}/adapters",
                                                "train.resume=auto", "data.cache=false"), 1,
         "none of the 2 checkpoints", ckpt_edit(corrupt_weights, ("step-00000002", "step-00000004"))),
    Case("explicit damaged checkpoint", "resume", ("train", "{trained_job}", "output.dir={root}/adapters",
                                                   "train.resume={ckpts}/step-00000004", "data.cache=false"), 1,
         "damaged", ckpt_edit(corrupt_weights)),
    Case("pickled checkpoint of old finetune", "resume",
         ("train", "{trained_job}", "output.dir={root}/adapters", "train.resume={ckpts}/step-00000004",
          "data.cache=false"), 1, "could run code", ckpt_edit(legacy_format)),
    Case("malicious optimizer state", "resume",
         ("train", "{trained_job}", "output.dir={root}/adapters", "train.resume={ckpts}/step-00000004",
          "data.cache=false"), 1, "loading it could run code; refused", ckpt_edit(malicious)),
    Case("resume path not a checkpoint", "resume", ("train", "{trained_job}", "output.dir={root}/adapters",
                                                    "train.resume={root}", "data.cache=false"), 1,
         "not a checkpoint folder"),
    # --- adapters: damaged or mismatched adapter folders -----------------------------------------------------------
    Case("truncated weights: eval", "adapters", ("eval", "{adapter}", "--data", "{root}/e.jsonl"), 1,
         "the file is truncated", both(damaged(truncate), data("e.jsonl", qa_rows(2)))),
    Case("truncated weights: merge", "adapters", ("merge", "{adapter}", "--out", "{root}/m"), 1,
         "the file is truncated", damaged(truncate)),
    Case("truncated weights: export", "adapters", ("export", "{adapter}", "--format", "gguf"), 1,
         "the file is truncated", damaged(truncate)),
    Case("truncated weights: check", "adapters", ("check", "{adapter}", "--target", "peft"), 1,
         "the file is truncated", damaged(truncate)),
    Case("truncated weights: demo", "adapters", ("demo", "{adapter}"), 1, "the file is truncated", damaged(truncate)),
    Case("NaN weights: check", "adapters", ("check", "{adapter}", "--target", "vllm"), 1, "NaN or inf",
         damaged(nan_weights)),
    Case("adapter_config not JSON", "adapters", ("merge", "{adapter}", "--out", "{root}/m"), 1, "not readable as JSON",
         damaged(lambda f: (f / "adapter_config.json").write_text("{oops"))),
    Case("adapter_config not JSON: check", "adapters", ("check", "{adapter}", "--target", "peft"), 1,
         "not readable as JSON", damaged(lambda f: (f / "adapter_config.json").write_text("{oops"))),
    Case("not an adapter folder", "adapters", ("eval", "{root}/plain"), 1, "not an adapter folder",
         text_file("plain/x.txt", "x")),
    Case("adapter folder missing", "adapters", ("merge", "{root}/nope", "--out", "{root}/m"), 1,
         "adapter folder not found"),
    Case("merge --base of another model", "adapters", ("merge", "{adapter}", "--out", "{root}/m", "--base", "{tiny_enc}"),
         1, "does not fit the base model", adapter),
    Case("eval --base of another model", "adapters", ("eval", "{adapter}", "--data", "{root}/e.jsonl", "--base",
                                                      "{tiny_enc}"), 1, "does not fit the base model",
         both(adapter, data("e.jsonl", qa_rows(2)))),
    Case("recorded base gone", "adapters", ("merge", "{adapter}", "--out", "{root}/m"), 1, "Pass --base",
         damaged(edit_json("adapter_config.json", base_model_name_or_path="/nonexistent/base"))),
    Case("merge a whole model", "adapters", ("merge", "{root}/full", "--out", "{root}/m"), 1, "no adapter to merge",
         text_file("full/config.json", "{}")),
    Case("export a classifier", "adapters", ("export", "{cls}", "--format", "gguf"), 1, "cannot be exported",
         cls_adapter),
    Case("adapters list of a missing folder", "adapters", ("adapters", "list", "--dir", "{root}/none"), 1,
         "adapters folder not found"),
    Case("eval data missing", "adapters", ("eval", "{adapter}", "--data", "{root}/none.jsonl"), 1,
         "no data files found", adapter),
    # --- publish ---------------------------------------------------------------------------------------------------
    Case("bad repo id", "publish", ("publish", "{adapter}", "--repo-id", "not a repo", "--dry-run"), 1, "USER/NAME",
         adapter),
    Case("local base without --base-model", "publish", ("publish", "{adapter}", "--repo-id", "me/x"), 1,
         "--base-model", adapter),
    Case("no token", "publish", ("publish", "{adapter}", "--repo-id", "me/x", "--base-model", "org/b"), 1,
         "no Hugging Face token", both(adapter, no_login)),
    Case("offline", "publish", ("publish", "{adapter}", "--repo-id", "me/x", "--base-model", "org/b"), 1,
         "HF_HUB_OFFLINE=1 is set", adapter, {"HF_TOKEN": TOKEN}),
    Case("token in the system prompt", "publish",
         ("publish", "{adapter}", "--repo-id", "me/x", "--dry-run", "--out", "{root}/hub"), 1,
         "shaped like a credential", damaged(edit_json("prompt.json", system_prompt=f"use {TOKEN} to log in"))),
    Case("out folder not empty", "publish",
         ("publish", "{adapter}", "--repo-id", "me/x", "--dry-run", "--out", "{root}/hub"), 1, "is not empty",
         both(adapter, text_file("hub/keep.txt", "mine"))),
    # --- demo: argument and auth checks before any model loads -----------------------------------------------------
    Case("auth file missing", "demo", ("demo", "{adapter}", "--auth-file", "{root}/none.txt"), 1,
         "--auth-file", adapter),
    Case("auth file is a folder", "demo", ("demo", "{adapter}", "--auth-file", "{root}"), 1, "is a folder", adapter),
    Case("auth file bad line", "demo", ("demo", "{adapter}", "--auth-file", "{root}/auth.txt"), 1,
         "expected user:password", both(adapter, text_file("auth.txt", "alice\n"))),
    Case("auth file empty", "demo", ("demo", "{adapter}", "--auth-file", "{root}/auth.txt"), 1,
         "no user:password line", both(adapter, text_file("auth.txt", "# nobody\n"))),
    Case("auth file not text", "demo", ("demo", "{adapter}", "--auth-file", "{root}/auth.txt"), 1,
         "not a UTF-8 text file", both(adapter, text_file("auth.txt", b"\xff\xfe"))),
    Case("auth env malformed", "demo", ("demo", "{adapter}"), 1, "FINETUNE_DEMO_AUTH", adapter,
         {"FINETUNE_DEMO_AUTH": "no-colon"}),
    Case("port out of range", "demo", ("demo", "{adapter}", "--port", "70000"), 1, "--port must be between", adapter),
    Case("max new tokens zero", "demo", ("demo", "{adapter}", "--max-new-tokens", "0"), 1, "--max-new-tokens", adapter),
    Case("concurrency absurd", "demo", ("demo", "{adapter}", "--concurrency", "100000"), 1, "--concurrency", adapter),
    Case("base folder missing", "demo", ("demo", "--base", "{root}/nope"), 1, "folder not found"),
]


def _model_copy(ctx: Ctx, name: str, config: dict[str, Any] | None = None, cut: bool = False) -> None:
    folder = ctx.root / name
    shutil.copytree(ctx.tiny_lm, folder)
    if config:
        edit_json("config.json", **config)(folder)
    if cut:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])


def _tokenizer_only(ctx: Ctx) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ctx.tiny_lm).save_pretrained(ctx.root / "tok")


# --- the run -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, train_tiny: Callable[..., Path]) -> Path:
    """One real run with checkpoints at steps 2 and 4 (lr 0.01, r 4): the adapter and checkpoints cases copy."""
    root = tmp_path_factory.mktemp("bad_inputs_run")
    train_tiny(root, tiny_lm, qa_rows(16), "tiny", steps=4,
               train={"checkpoint_every": 2, "keep_last": 2, "learning_rate": 0.01})
    return root


@pytest.fixture(scope="module")
def cls_trained(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path, train_tiny: Callable[..., Path]) -> Path:
    return train_tiny(tmp_path_factory.mktemp("bad_inputs_cls"), tiny_encoder, class_rows(8), "cls", "classification",
                      steps=2)


def snapshot(*folders: Path) -> dict[str, tuple[int, str, int]]:
    """Every path under `folders` with its size, content hash and mtime (folders: -1, '', 0)."""
    out: dict[str, tuple[int, str, int]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                out[str(path)] = (-1, "", 0)
            else:
                out[str(path)] = (path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tiny_lm: Path, tiny_encoder: Path, trained: Path, cls_trained: Path,
                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main

    root = tmp_path / "work"
    root.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    ctx = Ctx(root, tiny_lm, tiny_encoder, trained, cls_trained, monkeypatch)
    if case.setup:
        case.setup(ctx)
    argv = [a.format(**ctx.values()) for a in case.argv]
    before = snapshot(root, cache)
    code = main(argv)
    out = capsys.readouterr()
    printed = out.err + out.out
    assert "Traceback" not in printed and "this is a bug" not in printed, printed
    assert code == case.code, printed
    assert case.message in printed, printed
    assert snapshot(root, cache) == before, "the command wrote or deleted something"


def test_catalogue_covers_every_area() -> None:
    counts = Counter(c.area for c in CASES)
    assert set(counts) == set(AREAS)
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert min(counts.values()) >= 4, counts
