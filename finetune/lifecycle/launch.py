"""The command that serves the same adapters with vLLM or SGLang, for users who outgrow one `finetune serve`
process (`finetune serve --print-vllm / --print-sglang`). The adapters are first held to that server's rules
(lifecycle/targets.py, the same as `finetune check`), so a printed command is one that loads."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.lifecycle.folder import base_source, read_adapter
from finetune.lifecycle.targets import LORA_KEY, VLLM_RANKS, check_adapter, read_facts

LAUNCH_TARGETS = ("vllm", "sglang")


@dataclass
class LaunchPlan:
    """The launch command of a vLLM or SGLang server (`argv`, and `command` as one shell-quoted line), or the problems
    that stop it (then `argv` is empty)."""

    target: str
    argv: list[str] = field(default_factory=list)  # empty when a problem stops it
    problems: list[str] = field(default_factory=list)  # "<adapter>: [rule] message -> fix: ..."

    @property
    def command(self) -> str:
        """`argv` as one shell-quoted command line."""
        return " ".join(shlex.quote(a) for a in self.argv)


def launch_plan(target: str, folders: list[str | Path], base: str | None = None, host: str | None = None,
                port: int | None = None) -> LaunchPlan:
    """The launch command of `target` for these adapters on their (shared) base, or the problems that stop it."""
    if target not in LAUNCH_TARGETS:
        raise FinetuneError(f"no launch command for {target!r}; choose one of {', '.join(LAUNCH_TARGETS)}")
    if not folders:
        raise FinetuneError(f"--print-{target} needs at least one adapter folder")
    plan = LaunchPlan(target)
    facts = [read_facts(f) for f in folders]
    ranks = [_max_rank(f.config) for f in facts]
    vllm_rank = next((r for r in VLLM_RANKS if r >= max(ranks)), None)
    for folder in folders:
        result = check_adapter(folder, target, vllm_rank or max(ranks))
        plan.problems += [f"{folder}: {p.line()}" for p in result.problems]
    bases = {_base_ref(f, base) for f in folders}
    if len(bases) > 1:
        plan.problems.append(f"the adapters were trained on different bases ({', '.join(sorted(bases))}): "
                             f"{target} serves one base per process; pass --base to name the one to use")
    if plan.problems:
        return plan
    names = [read_adapter(f).name for f in folders]
    modules = [f"{n}={Path(f).resolve()}" for n, f in zip(names, folders, strict=True)]
    model = bases.pop()
    if target == "vllm":
        plan.argv = ["vllm", "serve", model, "--enable-lora", "--max-lora-rank", str(vllm_rank),
                     "--max-loras", str(len(folders)), "--lora-modules", *modules]
    else:
        targets = sorted({m.group(1).rsplit(".", 1)[-1] for f in facts for k in f.tensors if (m := LORA_KEY.match(k))})
        plan.argv = ["python", "-m", "sglang.launch_server", "--model-path", model, "--enable-lora",
                     "--max-lora-rank", str(max(ranks)), "--max-loras-per-batch", str(len(folders)),
                     "--lora-target-modules", *targets, "--lora-paths", *modules]
    plan.argv += [*(["--host", host] if host else []), *(["--port", str(port)] if port else [])]
    return plan


def _max_rank(config: dict) -> int:
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def _base_ref(folder: str | Path, base: str | None) -> str:
    """The base as those servers load it: a hub id, or a local Hugging Face folder (a GGUF base's conversion)."""
    info = read_adapter(folder)
    try:
        return base_source(info, base)[0].ref
    except FinetuneError:  # not in the local cache: the recorded id is what the other machine downloads
        return base or info.base
