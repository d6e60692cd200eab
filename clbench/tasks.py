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
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood_rolling")  # rolling: held-out probes only


class TaskError(ClbenchError):
    pass


# clbench.score: name -> (the lm-eval metric read, its transform into a higher-is-better score)
SCORE_TRANSFORMS = {
    # 2^(-bits per byte): the geometric-mean probability the model gives each byte of the text
    "per_byte_likelihood": ("bits_per_byte", lambda bpb: float(2.0 ** (-bpb))),
}


@dataclass
class TaskDef:
    name: str
    path: Path | None  # None: a hub task (lm-eval builds it)
    lm_eval: dict  # the YAML without the clbench block
    clbench: dict = field(default_factory=dict)

    @property
    def prepared(self) -> bool:
        """True when `clbench data prepare` builds the data (from a registry source)."""
        return "source" in self.clbench.get("data", {})

    @property
    def heldout(self) -> bool:
        return bool(self.clbench.get("heldout", False))

    @property
    def hub(self) -> bool:
        """lm-eval's own task of this name, its data from the hub (held-out only; offline: false)."""
        return bool(self.clbench.get("hub", False))

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
    def score_transform(self) -> str | None:
        """`clbench.score`: a named transform of lm-eval's metric into R's higher-is-better scale."""
        name = self.clbench.get("score")
        if name is not None and name not in SCORE_TRANSFORMS:
            raise TaskError(f"task {self.name!r} ({self.path}): clbench.score {name!r} is not one of "
                            f"{', '.join(SCORE_TRANSFORMS)}")
        return name

    def score(self, raw: float) -> float:
        """lm-eval's primary metric as the value that fills R."""
        t = self.score_transform
        return SCORE_TRANSFORMS[t][1](raw) if t else raw

    @property
    def metric_name(self) -> str:
        """What matrix.csv's `metric` column says about this task's values."""
        return self.score_transform or self.primary_metric[0]

    @property
    def primary_metric(self) -> tuple[str, str]:
        """(metric, filter) naming the score that fills R; `clbench.primary_metric` overrides."""
        if self.score_transform:
            return SCORE_TRANSFORMS[self.score_transform][0], "none"
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


def hub_task(name: str) -> TaskDef:
    """A held-out task that is one of lm-eval's standard tasks (arc_easy, hellaswag, ...): lm-eval
    builds it and loads its data from the hub; its first metric fills R."""
    return TaskDef(name=name, path=None, lm_eval={"task": name}, clbench={"hub": True, "heldout": True})


def build_lm_eval_tasks(defs: list[TaskDef], cache: Path) -> dict[str, Any]:
    """lm-eval Task objects for these tasks: clbench's from local JSONL (no hub); `hub` ones by
    name through lm-eval's own task registry (their first metric becomes the primary metric)."""
    from lm_eval.tasks import TaskManager

    local = [d for d in defs if not d.hub]
    out = {}
    if local:
        loaded = TaskManager(include_defaults=False).load([d.lm_eval_config(cache) for d in local])["tasks"]
        out.update({d.name: loaded[d.name] for d in local})
    hub = [d for d in defs if d.hub]
    if hub:
        from lm_eval.tasks import get_task_dict

        got = get_task_dict([d.name for d in hub], TaskManager())
        for d in hub:
            task = got.get(d.name)
            if task is None or isinstance(task, dict) or not hasattr(task, "config"):
                raise TaskError(f"held-out task {d.name!r} is an lm-eval group, not one task; list its tasks by name")
            d.lm_eval["output_type"] = task.OUTPUT_TYPE
            d.lm_eval["metric_list"] = [{"metric": m["metric"]} for m in (task.config.metric_list or [])] \
                or [{"metric": "acc"}]
            out[d.name] = task
    return {d.name: out[d.name] for d in defs}


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
