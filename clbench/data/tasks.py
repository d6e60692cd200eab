"""The task catalogue: every task definition and stream, read in one place.

A task is an lm-eval task YAML: a plain one (lm-eval's `dataset_path` says where its data is), or
one with a `clbench:` block saying where clbench finds it. The same lm-eval Task object that
evaluates a task also renders its training examples (the request lm-eval builds for the document
with zero shots, then the target: _pair), so training and evaluation prompts cannot drift apart.

Where tasks come from: tasks/*.yaml (built in), tasks/presets/*.yaml (the canonical benchmark
presets, data from the original releases on the user's disk), plugin folders, each read by
clbench's loader (which resolves lm-eval's `!function module.name`: a function of module.py
beside the YAML), and the folders of a config's `task_dirs`, read as lm-eval's --include_path
reads them (clbench.data.lmeval_yaml: include:, groups and tags); streams from the streams.yaml of
each, and the groups and tags of the task_dirs. With `offline: false` a name no folder defines is
one of lm-eval's registry tasks.

A clbench task's data is either prepared by `clbench data prepare` (clbench.data: a registry
package and a builder, or `release:<layout>` for a preset) into <cache>/data/<task>/{train,test}.jsonl,
or given by the user as files relative to the YAML (clbench.data.train / clbench.data.test).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from clbench import paths
from clbench.data import lmeval_yaml
from clbench.data import presets
from clbench.data.presets import RELEASE_PREFIX
from clbench.errors import ClbenchError, ConfigError, DataError

REQUIRED = ("task", "output_type", "doc_to_text", "doc_to_target", "metric_list")
PRESETS_DIR = paths.PRESETS_DIR
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood_rolling")  # rolling: probes and `kind: text` tasks


class TaskError(ClbenchError):
    pass


# clbench.score: name -> (the lm-eval metric read, its transform into a higher-is-better score)
SCORE_TRANSFORMS = {
    # 2^(-bits per byte): the geometric-mean probability the model gives each byte of the text
    "per_byte_likelihood": ("bits_per_byte", lambda bpb: float(2.0 ** (-bpb))),
}


GEN_SUFFIX = "_gen"


def twin_name(name: str) -> str:
    """A task's twin of the other kind by name: `trec_gen` (generation, exact match) <-> `trec`
    (log-likelihood multiple choice), the same documents and prompt (eval.other_kind)."""
    return name[: -len(GEN_SUFFIX)] if name.endswith(GEN_SUFFIX) else name + GEN_SUFFIX


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
    def release(self) -> bool:
        """True for a preset task: its data is read from a release on the user's disk (clbench.data.presets)."""
        return str(self.clbench.get("data", {}).get("source", "")).startswith(RELEASE_PREFIX)

    @property
    def heldout(self) -> bool:
        return bool(self.clbench.get("heldout", False))

    @property
    def text(self) -> bool:
        """`clbench.kind: text`: raw text, trained as packed blocks with the loss on every token
        (clbench.data.packing) and scored by lm-eval's rolling log-likelihood."""
        return self.clbench.get("kind") == "text"

    @property
    def hub(self) -> bool:
        """lm-eval's own registry task of this name, its data from the hub (offline: false)."""
        return bool(self.clbench.get("hub", False))

    @property
    def native(self) -> bool:
        """A plain lm-eval task YAML (no clbench.data): lm-eval's `dataset_path` says where its data is."""
        return not self.hub and "data" not in self.clbench

    def data_files(self, cache: Path) -> dict[str, Path]:
        data = self.clbench.get("data", {})
        if self.hub:
            files = {}
        elif self.native:
            files = lmeval_yaml.local_files(lmeval_yaml.resolve_data_files(self.lm_eval, self.path.parent))
        elif self.prepared:
            d = paths.data_dir(cache) / self.name
            files = {"test": d / "test.jsonl"}
            if data.get("train", 1):  # held-out (test-only) tasks set train: 0
                files["train"] = d / "train.jsonl"
        else:
            files = {k: (self.path.parent / data[k]).resolve() for k in ("train", "test") if k in data}
        return files

    def check_data(self, cache: Path, need_train: bool = True, data_root: Path | None = None,
                   stream: str | None = None) -> dict[str, Path]:
        """The task's data files, each checked to exist and parse; a missing file fails saying how to
        get it (for a preset: where its release is expected, `data_root` or $CLBENCH_DATA_ROOT, and
        the command that prepares it: for `stream` when given)."""
        files = self.data_files(cache)
        if self.hub or self.native:  # lm-eval loads the data; datacheck builds the task and reads every document
            return self._check_lm_eval_data(files, need_train)
        needed = ["test"] + (["train"] if need_train else [])
        if self.release and not all(files[s].is_file() for s in needed):
            raise TaskError(presets.not_prepared_message(self.name, self.clbench["data"], data_root, stream))
        for split in needed:
            f = files.get(split)
            if f is None:
                raise TaskError(f"task {self.name!r} ({self.path}): clbench.data has no {split!r} file")
            if not f.is_file():
                hint = (f"; run `clbench data prepare` (or `clbench data prepare --tasks {self.name}`)" if self.prepared else "")
                raise TaskError(f"task {self.name!r}: {split} data file not found: {f}{hint}")
            if not read_jsonl(f):  # names file and line of a malformed line
                raise TaskError(f"task {self.name!r}: {split} data file {f} holds no documents")
        return files

    def _check_lm_eval_data(self, files: dict[str, Path], need_train: bool) -> dict[str, Path]:
        if need_train and not self.hub and not self.lm_eval.get("training_split"):
            raise TaskError(f"task {self.name!r} ({self.path}) has no training documents: its YAML sets no "
                            "`training_split` (a validation_split is evaluated, never trained on); set one, or hold "
                            "the task out (`heldout:`)")
        gone = lmeval_yaml.missing(files)
        if gone:
            raise TaskError(f"task {self.name!r} ({self.path}): data file not found: {gone[0]} (a relative data_files "
                            f"path is read from the YAML's folder, else from the working directory {Path.cwd()})")
        return files

    def lm_eval_config(self, cache: Path) -> dict:
        cfg = copy.deepcopy(self.lm_eval)
        if self.native:  # as the YAML says, its local data files found (lmeval_yaml.resolve_data_files)
            resolved = lmeval_yaml.resolve_data_files(cfg, self.path.parent)
            if resolved is not None:
                cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolved}
            return cfg
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


_MODULES: dict[Path, Any] = {}


def _import_function(yaml_path: Path, dotted: str):
    """`!function module.name` -> the function `name` of <yaml folder>/module.py (lm-eval's rule)."""
    mod_name, _, fn = dotted.rpartition(".")
    mpath = (yaml_path.parent / f"{mod_name.replace('.', '/')}.py").resolve()
    if mpath not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"clbench_tasks_{mpath.stem}_{len(_MODULES)}", mpath)
        if spec is None or spec.loader is None or not mpath.is_file():
            raise TaskError(f"{yaml_path}: !function {dotted}: no module {mpath}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:  # user code: one line naming the file and line, not a traceback
            raise TaskError(f"{mpath}:{e.lineno}: syntax error: {e.msg} (imported by {yaml_path}: !function {dotted})") from None
        except Exception as e:
            raise TaskError(f"{mpath}: importing it failed: {type(e).__name__}: {e} "
                            f"(imported by {yaml_path}: !function {dotted})") from e
        _MODULES[mpath] = module
    try:
        return getattr(_MODULES[mpath], fn)
    except AttributeError:
        raise TaskError(f"{yaml_path}: !function {dotted}: {mpath} has no {fn}") from None


def read_yaml(path: Path) -> Any:
    """A task or streams YAML (`!function` resolved); a syntax error names the file, line and column."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _import_function(path, loader.construct_scalar(node)))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except yaml.YAMLError as e:
        raise TaskError(lmeval_yaml.malformed(path, e)) from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All documents of a JSONL file (blank lines skipped); a bad line raises DataError
    naming the file and the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from e
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: malformed JSON line: {e}") from None
        if not isinstance(doc, dict):
            raise DataError(f"{path}:{n}: malformed JSON line: expected an object, got {type(doc).__name__}")
        docs.append(doc)
    return docs


def parse_task_file(path: Path, raw: dict | None = None) -> TaskDef:
    """A task YAML, read by clbench's loader, or `raw` as lm-eval's loader read it (a task_dirs
    folder: lmeval_yaml). Without a `clbench.data` block it is a plain lm-eval task."""
    raw = read_yaml(path) if raw is None else dict(raw)
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task YAML must be a mapping")
    if not isinstance(raw.get("clbench") or {}, dict):
        raise TaskError(f"{path}: the `clbench:` block must be a mapping")
    if "data" not in (raw.get("clbench") or {}):
        return _native_task(path, raw)
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
    if cl.get("kind", "text") != "text" or ("kind" in cl and raw["output_type"] != "loglikelihood_rolling"):
        raise TaskError(f"{path}: clbench.kind {cl['kind']!r}: the only kind is `text`, on an output_type "
                        "loglikelihood_rolling task (raw text trained with the loss on every token)")
    data = cl["data"]
    if "source" not in data and "test" not in data:
        raise TaskError(f"{path}: clbench.data needs either `source` (prepared data) or `test` (and `train`) file paths")
    t = TaskDef(name=str(raw["task"]), path=path.resolve(), lm_eval=raw, clbench=cl)
    if (path.parent.resolve() == PRESETS_DIR.resolve()) != t.release:
        raise TaskError(f"{path}: clbench.data.source `{RELEASE_PREFIX}<layout>` is for the presets in {PRESETS_DIR} only"
                        if t.release else f"{path}: a preset task's clbench.data.source must be `{RELEASE_PREFIX}<layout>`")
    return t


NATIVE_CLBENCH_KEYS = {"description", "license", "heldout", "score", "primary_metric"}


def _native_task(path: Path, raw: dict) -> TaskDef:
    """A plain lm-eval task: its data is wherever its `dataset_path` (with dataset_kwargs) says,
    loaded by lm-eval; a `clbench:` block may add only what lm-eval cannot say (NATIVE_CLBENCH_KEYS)."""
    cl = raw.pop("clbench", None) or {}
    name = raw.get("task")
    unknown = sorted(set(cl) - NATIVE_CLBENCH_KEYS)
    if unknown:
        raise TaskError(f"{path}: clbench.{unknown[0]} needs clbench.data; a task without it (lm-eval's dataset_path) "
                        f"takes only {', '.join(sorted(NATIVE_CLBENCH_KEYS))} in its clbench block")
    if not isinstance(name, str):
        raise TaskError(f"{path}: task YAML is missing required field(s): task")
    if "dataset_path" not in raw and "class" not in raw:
        raise TaskError(f"{path}: task {name!r} has neither lm-eval's `dataset_path` nor a `clbench: {{data: ...}}` block "
                        "(source+builder, or train/test files): nothing says where its documents are")
    out_type = raw.setdefault("output_type", "generate_until")  # lm-eval's default
    if out_type not in OUTPUT_TYPES:
        raise TaskError(f"{path}: output_type {out_type!r} is not supported; choose one of {', '.join(OUTPUT_TYPES)}")
    if out_type == "multiple_choice" and "doc_to_choice" not in raw:
        raise TaskError(f"{path}: a multiple_choice task needs doc_to_choice")
    return TaskDef(name=name, path=path.resolve(), lm_eval=raw, clbench=cl)


def _task_files(d: Path, own: bool) -> Iterable[tuple[Path, dict | None]]:
    """clbench's own folders (built-in, presets, plugins): their *.yaml, read by clbench's loader. A
    task_dirs folder as lm-eval's --include_path reads it (every **/*.yaml through lm-eval's loader;
    its groups and tags are streams: load_streams)."""
    if own:
        return ((f, None) for f in sorted(d.glob("*.yaml")) if f.name != "streams.yaml")
    return ((f, raw) for f, raw in lmeval_yaml.folder_entries(d) if "group" not in raw or "class" in raw)


def _folders(extra_dirs: Iterable) -> list[Path]:
    return [*paths.task_folders(), *map(Path, extra_dirs)]  # built-in, presets, clbench.tasks plugins


def load_tasks(extra_dirs: Iterable = ()) -> dict[str, TaskDef]:
    """All tasks: built-in ones, the presets, then user folders (a user task may not shadow another)."""
    tasks: dict[str, TaskDef] = {}
    extra = list(extra_dirs)
    folders = _folders(extra)
    own = len(folders) - len(extra)
    for i, d in enumerate(folders):
        if not d.is_dir():
            raise ConfigError(f"task folder not found: {d}")
        for f, raw in _task_files(d, own=i < own):
            t = parse_task_file(f, raw)
            if t.name in tasks:
                raise TaskError(f"task {t.name!r} is defined twice: {tasks[t.name].path} and {f}")
            tasks[t.name] = t
    return tasks


def load_streams(extra_dirs: Iterable = (), tasks: dict[str, TaskDef] | None = None) -> dict[str, dict]:
    """{name: {"description", "orders": {order: [task, ...]}}} from the streams.yaml of tasks/, the
    presets and each user task folder. Each order must be a permutation of the same tasks; a
    stream defined twice is an error naming both files. A preset's stream also says which release
    its data comes from ("preset": the layout name, clbench.data.presets)."""
    streams: dict[str, dict] = {}
    origin: dict[str, Path] = {}
    for d in _folders(extra_dirs):
        p = d / "streams.yaml"
        if not p.is_file():
            continue
        raw = read_yaml(p) or {}
        if not isinstance(raw, dict):
            raise DataError(f"{p}: expected a mapping of stream names")
        for name, body in raw.items():
            name = str(name)
            if name in streams:
                raise DataError(f"stream {name} is defined twice: {origin[name]} and {p}")
            streams[name] = _parse_stream(name, body, p)
            origin[name] = p
            if d == PRESETS_DIR:
                tasks = tasks if tasks is not None else load_tasks(extra_dirs)
                first = tasks[next(iter(streams[name]["orders"].values()))[0]]
                streams[name]["preset"] = first.clbench["data"]["source"][len(RELEASE_PREFIX):]
    for name, g in lmeval_yaml.groups(map(Path, extra_dirs)).items():  # an lm-eval group or tag: a one-order stream
        if name in streams:
            raise DataError(f"stream {name} is defined twice: {origin[name]} and {g['path']} (an lm-eval group or tag)")
        kind = "tag" if g.get("tag") else "group"
        streams[name] = {"description": f"lm-eval {kind} ({g['path']})", "orders": {"1": g["members"]}, "group": True}
        origin[name] = g["path"]
    return streams


def _parse_stream(name: str, body: Any, where: Path) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("orders"), dict) or not body["orders"]:
        raise DataError(f"{where}: stream {name} needs `orders: {{\"1\": [task, ...], ...}}`")
    unknown = set(body) - {"description", "orders"}
    if unknown:
        raise DataError(f"{where}: stream {name} has unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    orders: dict[str, list[str]] = {}
    first = None
    for oname, tasks in body["orders"].items():
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise DataError(f"{where}: stream {name} order {oname} must be a non-empty list of task names")
        if len(set(tasks)) != len(tasks):
            raise DataError(f"{where}: stream {name} order {oname} repeats a task: {tasks}")
        if first is not None and sorted(tasks) != sorted(first):
            raise DataError(f"{where}: stream {name} order {oname} {tasks} is not a reordering of {first}")
        first = first or tasks
        orders[str(oname)] = list(tasks)
    return {"description": str(body.get("description", "")), "orders": orders}


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
    try:  # an lm-eval group or tag of a task_dirs folder stands for its tasks
        names = lmeval_yaml.expand(names, {k: {"members": s["orders"]["1"]} for k, s in streams.items() if s.get("group")})
    except lmeval_yaml.LmEvalYamlError as e:
        raise ConfigError(str(e)) from None
    unknown = [n for n in names if n not in tasks]
    if unknown and not cfg.offline:  # lm-eval's own registry tasks (boolq, arc_easy, ...), data from the hub
        tasks.update({n: hub_task(n, heldout=False) for n in unknown})
    elif unknown:
        raise ConfigError(f"unknown task(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(tasks))}; "
                          "lm-eval's registry tasks (boolq, arc_easy, ...) load from the hub: set `offline: false`")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"duplicate task(s) in the stream: {', '.join(dup)}")
    return names


# --- lm-eval task objects and training examples --------------------------------------


def hub_task(name: str, heldout: bool = True) -> TaskDef:
    """One of lm-eval's registry tasks (boolq, arc_easy, hellaswag, ...), held out or in the stream
    (offline: false): lm-eval builds it and loads its data from the hub; its first metric fills R."""
    return TaskDef(name=name, path=None, lm_eval={"task": name}, clbench={"hub": True, "heldout": heldout})


_MANAGERS: dict[bool, Any] = {}


def task_manager(builtin: bool = False):
    """lm-eval's TaskManager, one per process for each kind: builtin=True indexes lm-eval's own
    ~14,000 task YAML files (7-28 s; only for `hub` tasks named by lm-eval name); builtin=False
    indexes nothing, and builds clbench's tasks from their configs (build_lm_eval_tasks) and
    evaluates them (clbench.run.evaluate)."""
    if builtin not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[builtin] = TaskManager(include_defaults=builtin)
    return _MANAGERS[builtin]


def _adopt_metrics(d: TaskDef, task) -> None:
    """What lm-eval built decides the output type, and the metrics where the YAML names none."""
    d.lm_eval["output_type"] = task.OUTPUT_TYPE
    if not d.lm_eval.get("metric_list"):
        d.lm_eval["metric_list"] = [{"metric": m["metric"]} for m in (task.config.metric_list or [])] \
            or [{"metric": m} for m in task._metric_fn_list] or [{"metric": "acc"}]


def build_lm_eval_tasks(defs: list[TaskDef], cache: Path) -> dict[str, Any]:
    """lm-eval Task objects for these tasks: a clbench task from its JSONL, a plain lm-eval task
    from its YAML as lm-eval's loader read it (data_files found: lmeval_yaml), `hub` ones by name
    through lm-eval's own task registry."""
    out = {}
    for d in defs:
        if d.hub:
            continue
        try:
            out[d.name] = task_manager().load([d.lm_eval_config(cache)])["tasks"][d.name]
        except Exception as e:  # datasets' and lm-eval's errors alike: name the task and its file
            if not d.native:
                raise
            raise TaskError(f"task {d.name!r} ({d.path}): lm-eval cannot build it: {type(e).__name__}: {e}") from None
        if d.native:
            _adopt_metrics(d, out[d.name])
    hub = [d for d in defs if d.hub]
    if hub:
        from lm_eval.tasks import get_task_dict

        got = get_task_dict([d.name for d in hub], task_manager(builtin=True))
        for d in hub:
            task = got.get(d.name)
            if task is None or isinstance(task, dict) or not hasattr(task, "config"):
                raise TaskError(f"lm-eval task {d.name!r} is an lm-eval group or tag, not one task; list its tasks by name")
            d.lm_eval.pop("metric_list", None)
            _adopt_metrics(d, task)
            out[d.name] = task
    return {d.name: out[d.name] for d in defs}


def training_examples(task, eos_token: str | None = None,
                      prompting: lmeval_yaml.Prompting | None = None) -> list[tuple[str, str]] | list[str]:
    """(context, continuation) pairs of the task's training documents (lm-eval's training_docs(),
    process_docs applied), rendered as lm-eval renders its evaluation requests (_pair); for a
    raw-text task (loglikelihood_rolling) the document strings that lm-eval scores."""
    if not task.has_training_docs():
        raise TaskError(f"task {task.config.task!r} has no training split")
    if task.OUTPUT_TYPE == "loglikelihood_rolling":  # a `kind: text` task: its documents, packed by clbench.data.packing
        return [task.doc_to_target(doc) for doc in task.training_docs()]
    return [_pair(task, doc, i, eos_token, prompting) for i, doc in enumerate(task.training_docs())]


def run_examples(task, tokenizer, cfg) -> list:
    """training_examples as a run (a RunConfig) renders them: EOS after a generation target, the
    run's system_instruction and chat template (lmeval_yaml.prompting)."""
    eos = tokenizer.eos_token if task.OUTPUT_TYPE == "generate_until" else None
    return training_examples(task, eos, lmeval_yaml.prompting(cfg, tokenizer))


def _pair(task, doc, i: int, eos_token: str | None, prompting: lmeval_yaml.Prompting | None) -> tuple[str, str]:
    """One document as lm-eval's evaluator renders its request (fewshot_context with no shots, its
    gen_prefix, the run's system instruction and chat template), then the target: for multiple
    choice the gold choice's own request (construct_requests: target_delimiter, dropped under a chat
    template as lm-eval drops it); for generation target_delimiter (the same rule) + target + EOS."""
    kw = prompting.context_kwargs() if prompting else {}
    chat = bool(kw.get("apply_chat_template"))
    ctx = task.fewshot_context(doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc), **kw)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        reqs = task.construct_requests(doc=doc, ctx=ctx, metadata=(task.config.task, i, task.config.repeats), apply_chat_template=chat)
        gold = task.doc_to_text(doc) if task.multiple_input else target  # winogrande-style: the gold context
        gold = gold[0] if isinstance(gold, list) else gold
        if not isinstance(gold, int):
            gold = list(task.doc_to_choice(doc)).index(str(gold))
        return tuple(reqs[gold].arguments[:2])
    prefix = task.config.gen_prefix
    delim = task.config.target_delimiter if not chat or (prefix and not prefix[-1].isspace()) else ""
    text = target[0] if isinstance(target, list) else str(target)
    return ctx, f"{delim}{text}{eos_token or ''}"


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
