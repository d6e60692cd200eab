"""Tasks: an lm-eval task YAML plus a `clbench:` block saying where its data comes from.

The same lm-eval Task object that evaluates a task also renders its training examples
(`fewshot_context` with zero shots = description + doc_to_text, then target_delimiter +
the target), so training and evaluation prompts cannot drift apart.

Built-in tasks live in tasks/*.yaml; users add folders of YAMLs with `task_dirs`.
A task's data is either prepared by `clbench data prepare` (clbench.data.source) into
<cache>/data/<task>/{train,test}.jsonl, or given by the user as files relative to the
YAML (clbench.data.train / clbench.data.test).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import paths
from .errors import ClbenchError, ConfigError

REQUIRED = ("task", "output_type", "doc_to_text", "doc_to_target", "metric_list")
OUTPUT_TYPES = ("multiple_choice", "generate_until")


class TaskError(ClbenchError):
    pass


@dataclass
class TaskDef:
    name: str
    path: Path
    lm_eval: dict  # the YAML without the clbench block
    clbench: dict = field(default_factory=dict)

    @property
    def prepared(self) -> bool:
        """True when `clbench data prepare` builds the data (from a registry source)."""
        return "source" in self.clbench.get("data", {})

    @property
    def heldout(self) -> bool:
        return bool(self.clbench.get("heldout", False))

    def data_files(self, cache: Path) -> dict[str, Path]:
        data = self.clbench.get("data", {})
        if self.prepared:
            d = paths.data_dir(cache) / self.name
            files = {"test": d / "test.jsonl"}
            if data.get("train", 1):  # held-out (test-only) tasks set train: 0
                files["train"] = d / "train.jsonl"
        else:
            files = {k: (self.path.parent / data[k]).resolve() for k in ("train", "test") if k in data}
        return files

    def check_data(self, cache: Path, need_train: bool = True) -> dict[str, Path]:
        files = self.data_files(cache)
        needed = ["test"] + (["train"] if need_train else [])
        for split in needed:
            f = files.get(split)
            if f is None:
                raise TaskError(f"task {self.name!r} ({self.path}): clbench.data has no {split!r} file")
            if not f.is_file():
                hint = (f"; run `clbench data prepare` (or `clbench data prepare --tasks {self.name}`)" if self.prepared else "")
                raise TaskError(f"task {self.name!r}: {split} data file not found: {f}{hint}")
            from .data import read_jsonl

            if not read_jsonl(f):  # names file and line of a malformed line
                raise TaskError(f"task {self.name!r}: {split} data file {f} holds no documents")
        return files

    def lm_eval_config(self, cache: Path) -> dict:
        cfg = copy.deepcopy(self.lm_eval)
        files = {k: str(v) for k, v in self.data_files(cache).items()}
        cfg["dataset_path"] = "json"
        cfg["dataset_kwargs"] = {"data_files": files}
        cfg.setdefault("test_split", "test")
        if "train" in files:
            cfg.setdefault("training_split", "train")
        return cfg

    @property
    def primary_metric(self) -> tuple[str, str]:
        """(metric, filter) naming the score that fills R; `clbench.primary_metric` overrides."""
        if "primary_metric" in self.clbench:
            m, _, f = str(self.clbench["primary_metric"]).partition(",")
            return m, f or "none"
        metric = self.lm_eval["metric_list"][0]["metric"]
        filters = self.lm_eval.get("filter_list") or []
        return metric, (filters[0]["name"] if filters else "none")


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise TaskError(f"{where}: malformed task YAML: {getattr(e, 'problem', None) or e}") from None


def parse_task_file(path: Path) -> TaskDef:
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task YAML must be a mapping")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise TaskError(f"{path}: task YAML is missing required field(s): {', '.join(missing)}")
    if raw["output_type"] not in OUTPUT_TYPES:
        raise TaskError(f"{path}: output_type {raw['output_type']!r} is not supported; choose one of {', '.join(OUTPUT_TYPES)}")
    if raw["output_type"] == "multiple_choice" and "doc_to_choice" not in raw:
        raise TaskError(f"{path}: a multiple_choice task needs doc_to_choice")
    cl = raw.pop("clbench", None) or {}
    if not isinstance(cl, dict) or not isinstance(cl.get("data"), dict):
        raise TaskError(f"{path}: task YAML needs a `clbench: {{data: ...}}` block (source+builder, or train/test files)")
    data = cl["data"]
    if "source" not in data and "test" not in data:
        raise TaskError(f"{path}: clbench.data needs either `source` (prepared data) or `test` (and `train`) file paths")
    return TaskDef(name=str(raw["task"]), path=path.resolve(), lm_eval=raw, clbench=cl)


def load_tasks(extra_dirs: list[Path] = ()) -> dict[str, TaskDef]:
    """All tasks: built-in ones, then user folders (a user task may not shadow another)."""
    tasks: dict[str, TaskDef] = {}
    for d in [paths.BUILTIN_TASKS_DIR, *extra_dirs]:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"task folder not found: {d}")
        for f in sorted(d.glob("*.yaml")):
            if f.name == "streams.yaml":
                continue
            t = parse_task_file(f)
            if t.name in tasks:
                raise TaskError(f"task {t.name!r} is defined twice: {tasks[t.name].path} and {f}")
            tasks[t.name] = t
    from .presets import load_preset_tasks  # canonical presets: tasks/presets/, data from the releases

    for name, t in load_preset_tasks().items():
        if name in tasks:
            raise TaskError(f"task {name!r} is defined twice: {tasks[name].path} and {t.path}")
        tasks[name] = t
    return tasks


def resolve_stream(cfg, tasks: dict[str, TaskDef], streams: dict[str, dict]) -> list[str]:
    """The ordered task list of a run config; unknown names fail listing the valid ones."""
    if cfg.tasks:
        names = list(cfg.tasks)
    else:
        if cfg.stream not in streams:
            raise ConfigError(f"unknown stream {cfg.stream!r}; available: {', '.join(sorted(streams)) or '(none)'}")
        orders = streams[cfg.stream]["orders"]
        if cfg.order not in orders:
            raise ConfigError(f"stream {cfg.stream!r} has no order {cfg.order!r}; orders: {', '.join(orders)}")
        names = list(orders[cfg.order])
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(tasks))}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"duplicate task(s) in the stream: {', '.join(dup)}")
    return names


# --- lm-eval task objects and training examples --------------------------------------


def build_lm_eval_tasks(defs: list[TaskDef], cache: Path) -> dict[str, Any]:
    """lm-eval Task objects for these tasks (data loaded from local JSONL, no hub)."""
    from lm_eval.tasks import TaskManager

    cfgs = [d.lm_eval_config(cache) for d in defs]
    loaded = TaskManager(include_defaults=False).load(cfgs)["tasks"]
    return {d.name: loaded[d.name] for d in defs}


def training_examples(task, eos_token: str | None = None) -> list[tuple[str, str]]:
    """(context, continuation) pairs rendered by the task's own lm-eval templates."""
    if not task.has_training_docs():
        raise TaskError(f"task {task.config.task!r} has no training split")
    out = []
    delim = task.config.target_delimiter
    for doc in task.training_docs():
        ctx = task.fewshot_context(doc, num_fewshot=0)
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            text = choices[target] if isinstance(target, int) else str(target)
        else:
            text = target[0] if isinstance(target, list) else str(target)
            if eos_token:
                text = text + eos_token
        out.append((ctx, f"{delim}{text}"))
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize exactly as lm-eval's HFLM scores a (context, continuation) pair: trailing
    spaces move into the continuation, and the continuation's ids are the tail of the
    whole string's encoding (no special tokens, as HFLM does for causal models)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]
