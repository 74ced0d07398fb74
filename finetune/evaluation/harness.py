"""`finetune eval --harness TASK[,TASK...]`: EleutherAI's lm-evaluation-harness on the base and on the adapter with
identical settings, through its Python API (`simple_evaluate` on an `HFLM` wrapping the model already loaded).

The base side is the same loaded PeftModel with its adapter disabled, as for the task metrics: one load, so the
weights, dtype, device, tokenizer and batch size cannot differ (lm-eval's own `peft=` argument would load the base
twice and read the tokenizer from the base folder rather than the one saved with the adapter). A fully fine-tuned
folder has no adapter to disable: its base is loaded beside it with the same model settings.

The prompt format is the one training used (prompt.json): with the chat template on, lm-eval applies the
tokenizer's chat template with the recorded system prompt as its system instruction and few-shot examples as
multi-turn; with it off, plain prompts and no system prompt (training's plain-text encoding never had one).

Tasks are names from the harness registry (their datasets must be in the local Hugging Face cache or reachable) or
YAML files of the harness's own task format; relative `data_files` in a YAML resolve against the YAML's folder.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

SIDES = ("base", "adapter")
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")  # `datasets` builders that read local files
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
NOT_METRICS = ("alias", "name", "sample_len", "sample_count")


@dataclass
class HarnessOptions:
    """lm-evaluation-harness settings (`finetune eval --harness`), the same for the base and the adapter."""

    tasks: list[str]  # registry names or task YAML files
    limit: float | None = None  # examples per task (a share when < 1), as lm-eval's --limit
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 8
    bootstrap_iters: int = 1000  # stderr of non-mean metrics; mean metrics get theirs analytically


def parse_tasks(value: str) -> list[str]:
    """`--harness a,b,c` -> [a, b, c] (empty items dropped)."""
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        raise FinetuneError("--harness needs at least one task name or task YAML file")
    return tasks


def require_lm_eval() -> None:
    """A clear error, before any model loads, when the optional extra is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise FinetuneError("--harness needs EleutherAI's lm-evaluation-harness: pip install 'finetune[harness]' "
                            "(or pip install lm-eval)") from None


def prompt_settings(chat: bool, system_prompt: str | None) -> dict[str, Any]:
    """The harness's prompt arguments for an adapter trained with (or without) the chat template."""
    return {"apply_chat_template": chat, "system_instruction": system_prompt if chat else None,
            "fewshot_as_multiturn": chat}


class TaskSet:
    """The requested tasks, checked (and their data loaded once) before any model weight is loaded."""

    def __init__(self, names: list[str]):
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        self.names = names
        self.specs: list[str | dict[str, Any]] = [_spec(n) for n in names]
        registry = any(isinstance(s, str) for s in self.specs)
        # The registry index scans thousands of YAML files (~30 s): only built when a registry name is asked for.
        self.manager = TaskManager(include_defaults=registry)
        if registry:
            _check_names([s for s in self.specs if isinstance(s, str)], self.manager.all_tasks)
        self.load()  # datasets fail here, before the model loads

    def load(self) -> list[Any]:
        """Fresh Task objects (evaluation mutates them, so each side gets its own)."""
        try:
            loaded = self.manager.load(self.specs)
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types; all mean "task unavailable"
            raise FinetuneError(_task_error(self.names, exc)) from None
        return list(loaded["tasks"].values()) + list(loaded["groups"].values())

    def sources(self) -> dict[str, str]:
        """Task (or registry name) -> "registry" or the task file it came from."""
        return {(s if isinstance(s, str) else str(s["task"])): ("registry" if isinstance(s, str) else str(Path(n).resolve()))
                for n, s in zip(self.names, self.specs, strict=True)}


def _spec(name: str) -> str | dict[str, Any]:
    path = Path(name).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        return name
    if not path.is_file():
        raise FinetuneError(f"--harness {name}: task file not found: {path.resolve()}")
    cfg = _load_yaml(path)
    if "task" not in cfg or not isinstance(cfg["task"], str):
        raise FinetuneError(f"{path}: not a single harness task (needs a 'task: NAME' key; give a group's task "
                            "YAML files one by one)")
    cfg.setdefault("metadata", {})
    if isinstance(cfg["metadata"], dict):
        cfg["metadata"]["config_source"] = str(path.resolve())
    return _resolve_data_paths(cfg, path.parent.resolve())


def _load_yaml(path: Path) -> dict[str, Any]:
    """lm-eval's own YAML reader (`include:` and `!function` resolved relative to the file)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(path, resolve_func=True)
    except ImportError:  # older lm-eval releases
        from lm_eval.utils import load_yaml_config  # type: ignore[attr-defined]

        cfg = load_yaml_config(yaml_path=str(path))
    except Exception as exc:  # noqa: BLE001 - yaml errors, a !function that does not import...
        raise FinetuneError(f"{path}: cannot read this harness task: {type(exc).__name__}: {exc}") from None
    if not isinstance(cfg, dict):
        raise FinetuneError(f"{path}: a harness task file holds a YAML mapping")
    return cfg


def _resolve_data_paths(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative local data paths are relative to the task file, so the task runs from any working directory."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            return str((folder / value).resolve())
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": fix(kwargs["data_files"])}
    if isinstance(cfg.get("dataset_path"), str) and cfg["dataset_path"] not in LOCAL_LOADERS:
        cfg["dataset_path"] = fix(cfg["dataset_path"])
    return cfg


def _check_names(names: list[str], known: list[str]) -> None:
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FinetuneError(f"--harness {name}: not a task, group or tag of lm-evaluation-harness{hint} "
                                "(`lm-eval ls tasks` lists them; a local task is a .yaml path)")


def _task_error(names: list[str], exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    offline = any(w in text for w in ("offline", "Offline", "ConnectionError", "couldn't reach", "Couldn't reach",
                                      "not find", "doesn't exist", "DatasetNotFound", "LocalEntryNotFound"))
    hint = ("\n  Its dataset is neither in the local Hugging Face cache nor reachable. Download it once where the "
            "hub is reachable (running the same command there fills the cache), or write a local task YAML "
            "(dataset_path: json, dataset_kwargs: {data_files: ...}); see docs/eval.md." if offline else "")
    return f"--harness {','.join(names)}: lm-evaluation-harness could not load the task: {text[:600]}{hint}"


SideModel = Callable[[str], AbstractContextManager[Any]]


def run_harness(use_side: SideModel, tok: Any, tasks: TaskSet, opts: HarnessOptions, prompt: dict[str, Any],
                how_base: str) -> dict[str, Any]:
    """Both sides through lm-eval with the same arguments; the `harness` section of eval.json."""
    from lm_eval import simple_evaluate

    _quiet()
    sides: dict[str, Any] = {}
    for side in SIDES:
        started = time.perf_counter()
        with use_side(side) as model:
            lm = _lm(model, tok, opts.batch_size)
            out = simple_evaluate(model=lm, tasks=tasks.load(), task_manager=tasks.manager, num_fewshot=opts.num_fewshot,
                                  limit=opts.limit, bootstrap_iters=opts.bootstrap_iters, log_samples=False,
                                  batch_size=opts.batch_size, **prompt, **SEEDS)
        if out is None:
            raise FinetuneError("lm-evaluation-harness returned no results (not the main process)")
        sides[side] = {"results": out["results"], "higher_is_better": out.get("higher_is_better") or {},
                       "configuration": configuration(out, lm, opts, prompt),
                       "seconds": round(time.perf_counter() - started, 2)}
    return _section(sides, tasks, opts, prompt, how_base)


def _lm(model: Any, tok: Any, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)


def _quiet() -> None:
    # lm-eval logs a warning per metric without an explicit aggregation; progress bars still show.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def configuration(out: dict[str, Any], lm: Any, opts: HarnessOptions, prompt: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides one side's numbers, as recorded by lm-eval itself plus what it leaves out."""
    import lm_eval

    config = out.get("config", {})
    template = lm.chat_template(True) if prompt["apply_chat_template"] else None
    return {
        "lm_eval_version": lm_eval.__version__, "model_class": type(lm).__name__,
        "model_dtype": str(config.get("model_dtype")), "model_parameters": config.get("model_num_parameters"),
        "device": str(lm.device), "batch_size": opts.batch_size, "max_length": lm.max_length,
        "limit": config.get("limit"), "bootstrap_iters": config.get("bootstrap_iters"),
        "gen_kwargs": config.get("gen_kwargs"), **{k: config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
        **prompt, "chat_template_sha256": _sha(template) if template else None,
        "n_shot": out.get("n-shot"), "n_samples": out.get("n-samples"),
        "task_configs_sha256": _sha(json.dumps(out.get("configs"), sort_keys=True, default=str)),
    }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _section(sides: dict[str, Any], tasks: TaskSet, opts: HarnessOptions, prompt: dict[str, Any],
             how_base: str) -> dict[str, Any]:
    base, adapter = sides["base"], sides["adapter"]
    return {
        "tasks": tasks.sources(), "how_base": how_base,
        "settings": {"limit": opts.limit, "num_fewshot": opts.num_fewshot, "batch_size": opts.batch_size, **prompt},
        "configuration": {side: sides[side]["configuration"] for side in SIDES},
        "results": compare(base["results"], adapter["results"], base["higher_is_better"]),
        "timings": {f"{side}_s": sides[side]["seconds"] for side in SIDES},
    }


def compare(base: dict[str, dict[str, Any]], adapter: dict[str, dict[str, Any]],
            higher_is_better: dict[str, dict[str, bool]] | None = None) -> dict[str, dict[str, Any]]:
    """task -> metric -> {base, adapter, delta, base_stderr, adapter_stderr, better}; `metric` drops lm-eval's
    ',none' filter suffix (other filters stay: 'exact_match,strict-match'). Direction: the task's own
    higher_is_better, else a guess from the name (perplexities, bits per byte and losses are lower-is-better)."""
    higher_is_better = higher_is_better or {}
    out: dict[str, dict[str, Any]] = {}
    for task, values in base.items():
        metrics: dict[str, Any] = {}
        for key, value in values.items():
            if key in NOT_METRICS or "_stderr," in key or not _number(value):
                continue
            other = adapter.get(task, {}).get(key)
            if not _number(other):
                continue
            metric, _, flt = key.partition(",")
            name = metric if flt in ("", "none") else key
            stderr = f"{metric}_stderr,{flt}" if flt else f"{metric}_stderr"
            metrics[name] = {"base": value, "adapter": other, "delta": other - value,
                             "base_stderr": _stderr(values.get(stderr)), "adapter_stderr": _stderr(adapter[task].get(stderr)),
                             "better": _better(metric, higher_is_better.get(task, {}).get(metric))}
        if metrics:
            out[task] = metrics
    return out


def _better(metric: str, higher: bool | None) -> str:
    if higher is None:
        higher = not ("perplexity" in metric or metric in ("bits_per_byte", "ter") or metric.endswith("loss"))
    return "higher" if higher else "lower"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _stderr(v: Any) -> float | None:
    return float(v) if _number(v) else None  # lm-eval writes "N/A" when it has none


def rows(section: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(task, metric, values) over a harness section, in task order."""
    for task, metrics in section.get("results", {}).items():
        for metric, values in metrics.items():
            yield task, metric, values
