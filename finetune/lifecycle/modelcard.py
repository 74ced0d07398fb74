"""The model card: README.md in every folder `finetune train` writes (replacing peft's empty template), refreshed by
`finetune eval`, and the card `finetune publish` uploads. One renderer for all three.

YAML front matter the Hub indexes (base_model as a hub id when known, library_name, pipeline_tag, tags, datasets,
eval results as model-index), then what a reader needs to trust and use the folder: what it does, the prompt format it
expects, how it was trained, base vs fine-tuned results, how to load it with peft / transformers and vLLM.

Each generated section sits between `<!-- finetune:NAME -->` markers. A refresh replaces only the sections it is asked
to (eval: the evaluation; publish: all of them, for the hub ids) and the front matter keys finetune owns; text a user
added outside the markers stays. A README.md that finetune did not write (nor peft's template) is never replaced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.lifecycle.cardtext import evaluation, files, number, prompt_format, summary, training, usage
from finetune.lifecycle.folder import AdapterInfo, read_adapter
from finetune.lifecycle.targets import VLLM_RANKS, check_adapter

CARD_FILE = "README.md"
PEFT_TEMPLATE = ("Model Card for Model ID", "[More Information Needed]")
PIPELINE_TAGS = {"causal_lm": "text-generation", "classification": "text-classification"}
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
MARK = re.compile(r"<!-- finetune:([a-z]+) -->\n.*?<!-- /finetune:\1 -->", re.DOTALL)
FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
OWNED_KEYS = ("base_model", "library_name", "pipeline_tag", "license", "tags", "datasets", "model-index")


@dataclass
class CardInput:
    """What a card needs beyond the folder's own records: the Hub repo, base and dataset ids, license, tags, title, and
    how snippets name the folder. All optional: the card in a local folder needs none of them."""

    repo_id: str | None = None  # the Hub repo (publish); None for the card in a local folder
    base_model: str | None = None  # the base as a hub id; None: the recorded base when it is one
    license: str | None = None
    datasets: list[str] = field(default_factory=list)  # hub dataset ids, beside those the job trained on
    tags: list[str] = field(default_factory=list)
    location: str | None = None  # how snippets name the folder when there is no repo_id (default: its path)
    name: str | None = None  # the title (default: the repo or folder name)


def hub_id(ref: str) -> str | None:
    """A hub id from a recorded base: the id itself, or the repo of a Hugging Face cache snapshot; None for a
    plain local folder."""
    cached = HUB_CACHE.search(ref or "")
    if cached:
        return f"{cached[1]}/{cached[2]}"
    if not ref or ref.startswith(("/", ".", "~")) or Path(ref).exists():
        return None
    return ref if REPO_ID.match(ref) or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", ref) else None


def _base_id(info: AdapterInfo, card: CardInput) -> str | None:
    return card.base_model or hub_id(info.base)


EVAL_SECTIONS = ("evaluation", "files")  # what `finetune eval` changes


def write_card(info: AdapterInfo, card: CardInput | None = None, sections: tuple[str, ...] | None = EVAL_SECTIONS) -> Path | None:
    """Write README.md, or refresh `sections` of finetune's card there (all when None); None when the folder holds a
    README that finetune did not write."""
    card = card or CardInput()
    path = info.folder / CARD_FILE
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not is_ours(old) and not is_peft_template(old):
        return None
    path.write_text(update_card(old, info, card, sections) if is_ours(old) else render_card(info, card), encoding="utf-8")
    return path


def card_for_publish(info: AdapterInfo, card: CardInput) -> str:
    """The Hub card: the folder's own README refreshed with the hub ids (keeping a user's additions), or a new one."""
    path = info.folder / CARD_FILE
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    return update_card(old, info, card, None) if is_ours(old) else render_card(info, card)


def is_ours(text: str) -> bool:
    """Whether `text` is a card finetune wrote (it holds finetune's section markers)."""
    return bool(MARK.search(text))


def is_peft_template(text: str) -> bool:
    """Whether `text` is peft's empty model card template, which finetune's card may replace."""
    return all(mark in text for mark in PEFT_TEMPLATE)


def render_card(info: AdapterInfo, card: CardInput | None = None) -> str:
    """A new card for the folder: the Hub front matter, then every generated section between its markers."""
    card = card or CardInput()
    body = "\n\n".join(_block(name, text) for name, text in _sections(info, card).items() if text)
    return f"---\n{_yaml(card_metadata(info, card))}---\n\n{body}\n"


def update_card(text: str, info: AdapterInfo, card: CardInput, sections: tuple[str, ...] | None) -> str:
    """Replace the named generated sections (all when None) and finetune's front matter keys; keep the rest."""
    fresh = _sections(info, card)
    wanted = set(fresh) if sections is None else set(sections)
    present = {m[1] for m in MARK.finditer(text)}

    def swap(match: re.Match[str]) -> str:
        name = match[1]
        return _block(name, fresh[name]) if name in wanted and fresh.get(name) else match[0]

    body = MARK.sub(swap, FRONT.sub("", text, count=1))
    for name in sorted(wanted - present):
        if fresh.get(name):  # e.g. the first evaluation of a card written at save
            body = body.rstrip("\n") + "\n\n" + _block(name, fresh[name]) + "\n"
    meta = _merge_meta(_front_matter(text), card_metadata(info, card))
    return f"---\n{_yaml(meta)}---\n" + ("" if body.startswith("\n") else "\n") + body


def _block(name: str, text: str) -> str:
    return f"<!-- finetune:{name} -->\n{text.strip()}\n<!-- /finetune:{name} -->"


def _yaml(meta: dict[str, Any]) -> str:
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)


def _front_matter(text: str) -> dict[str, Any]:
    match = FRONT.match(text)
    try:
        meta = yaml.safe_load(match[1]) if match else {}
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _merge_meta(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in old.items() if k not in OWNED_KEYS or k in ("license", "base_model")}
    for key, value in new.items():
        if key in ("tags", "datasets"):
            value = sorted({*old.get(key, []), *value}) if key == "tags" else list(dict.fromkeys([*old.get(key, []), *value]))
        merged[key] = value
    return merged


def card_metadata(info: AdapterInfo, card: CardInput) -> dict[str, Any]:
    """The front matter the Hub reads."""
    meta: dict[str, Any] = {}
    base = _base_id(info, card)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers" if info.full else "peft"
    meta["pipeline_tag"] = PIPELINE_TAGS.get(info.task, "text-generation")
    if card.license:
        meta["license"] = card.license
    kind = ["full-fine-tuning"] if info.full else ["lora", "peft"]
    meta["tags"] = sorted({"finetune", "transformers", *kind, *card.tags})
    datasets = list(dict.fromkeys([*_hub_datasets(info), *card.datasets]))
    if datasets:
        meta["datasets"] = datasets
    results = model_index_results(info)
    if results:
        meta["model-index"] = [{"name": card.name or (card.repo_id or info.name).split("/")[-1], "results": results}]
    return meta


def _hub_datasets(info: AdapterInfo) -> list[str]:
    train = info.job.data.train if info.job is not None else None
    return [s.hub for s in train if s.hub] if isinstance(train, list) else []


def eval_report(info: AdapterInfo) -> dict[str, Any]:
    """eval.json beside the model ({} when there is none or it does not parse)."""
    try:
        report = json.loads((info.folder / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def eval_metrics(info: AdapterInfo) -> dict[str, dict[str, Any]]:
    """`finetune eval` task metrics: name -> {base, adapter, delta, better} (scalars only)."""
    metrics = eval_report(info).get("metrics")
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, dict) and number(v.get("adapter"))}


def harness_results(info: AdapterInfo) -> dict[str, dict[str, dict[str, Any]]]:
    """eval.json's lm-evaluation-harness results, task -> metric -> {base, adapter, delta...}; {} when none."""
    harness = eval_report(info).get("harness")
    return harness.get("results", {}) if isinstance(harness, dict) else {}


def model_index_results(info: AdapterInfo) -> list[dict[str, Any]]:
    """eval.json as the Hub's model-index: the fine-tuned side's value of every scalar metric."""
    report, task_type = eval_report(info), PIPELINE_TAGS.get(info.task, "text-generation")
    out = []
    evals, data = eval_metrics(info), report.get("data")
    if evals:
        data = data if isinstance(data, dict) else {}
        name = ", ".join(Path(p.strip()).name for p in str(data.get("path") or "eval data").split(","))
        out.append({"task": {"type": task_type}, "dataset": {"name": name, "type": name},
                    "metrics": [{"name": k, "type": k, "value": m["adapter"]} for k, m in evals.items()]})
    configs = (report.get("harness") or {}).get("tasks", {})
    for task, metrics in harness_results(info).items():
        source = configs.get(task, "registry")
        out.append({"task": {"type": task_type}, "dataset": {"name": task, "type": task if source == "registry" else f"local:{task}"},
                    "metrics": [{"name": f"{task} {k}", "type": k, "value": m["adapter"]} for k, m in metrics.items()]})
    return out


def _sections(info: AdapterInfo, card: CardInput) -> dict[str, str]:
    where = card.repo_id or card.location or str(info.folder)
    base, name = _base_id(info, card), card.name or where.rstrip("/").split("/")[-1]
    return {"summary": summary(info, name, base),
            "prompt": prompt_format(info), "training": training(info, base),
            "evaluation": evaluation(info, eval_report(info), where),
            "usage": usage(info, base, where, name, _vllm_problems(info)), "files": files(info)}


def _vllm_problems(info: AdapterInfo) -> list[str] | None:
    """What would stop vLLM serving this adapter (`finetune check --target vllm`); None when it does not apply."""
    if info.full or info.task != "causal_lm":
        return None
    rank = int(info.adapter_config.get("r") or 16)
    allowed = next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])
    try:
        return [p.message for p in check_adapter(info.folder, "vllm", allowed).problems]
    except Exception as exc:  # noqa: BLE001 - a card is written anyway; the check's own command gives details
        return [f"could not be checked: {exc}"]


def write_new_card(folder: Path, location: str, name: str) -> Path | None:
    """The card of a folder `finetune train` just wrote (still under its temporary name): replaces peft's template."""
    return write_card(read_adapter(folder), CardInput(location=location, name=name), sections=None)
