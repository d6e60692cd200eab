"""Data validation at plan time: every row of every file a run reads is rendered once through
the task's own lm-eval templates before anything is trained.

lm-eval loads a JSONL file with `datasets`, which gives a row that lacks a field the value
None: a template then renders "Number: None" and a target " None", and training runs on it
without a word (a test file with such a row can also end in a DatasetGenerationError). Here
each raw row is checked against the fields its templates read, then rendered by lm-eval's own
ConfigurableTask methods (doc_to_text, doc_to_target, doc_to_choice, with its jinja
environment), and a multiple-choice target must be one of the row's choices. A bad row fails
naming the file, the line and the field. A task whose data lm-eval loads itself (a plain lm-eval
YAML, a registry task) is checked the same way on the documents of its built Task, named by
split and position; a stream task among them must have training documents.

lm-eval has no such check of its own; what is written here is only the bookkeeping around its
rendering (which fields a template reads, which line a row is on).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from clbench.data.tasks import build_lm_eval_tasks
from clbench.errors import ClbenchError

TEMPLATES = ("description", "doc_to_text", "doc_to_target", "doc_to_choice")


class DataCheckError(ClbenchError):
    pass


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, document) of each non-blank line (check_data has already parsed them)."""
    return [(n, json.loads(line)) for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1)
            if line.strip()]


def _fields_read(template, features: set[str]) -> list[str]:
    """The document fields a template reads: a bare field name (lm-eval then takes doc[name]), or
    the top-level variables of a jinja template."""
    from jinja2 import meta
    from lm_eval.utils import env

    if isinstance(template, list):
        return [f for t in template for f in _fields_read(t, features)]
    if not isinstance(template, str):
        return []  # an int index or a function: nothing to name
    if template in features:
        return [template]
    return sorted(meta.find_undeclared_variables(env.parse(template)) - set(env.globals))


def _renderer(cfg: dict, features: set[str]):
    from lm_eval.api.task import ConfigurableTask

    conf = SimpleNamespace(doc_to_text=cfg.get("doc_to_text"), doc_to_target=cfg.get("doc_to_target"),
                           doc_to_choice=cfg.get("doc_to_choice"), fewshot_delimiter=cfg.get("fewshot_delimiter", "\n\n"))
    # what lm-eval's ConfigurableTask.doc_to_* read of a task: its config and the data's columns
    view = SimpleNamespace(prompt=None, features=sorted(features), config=conf, _config=conf)
    return {
        "doc_to_text": lambda doc: ConfigurableTask.doc_to_text(view, doc),
        "doc_to_target": lambda doc: ConfigurableTask.doc_to_target(view, doc),
        "doc_to_choice": (lambda doc: ConfigurableTask.doc_to_choice(view, doc)) if conf.doc_to_choice is not None else None,
    }


def check_task(task, files: dict[str, Path]) -> int:
    """Render every row of `files` ({split: path}) of one task (a clbench.data.tasks.TaskDef); returns
    the number of rows checked. Raises DataCheckError naming file, line and field."""
    from lm_eval.utils import apply_template

    cfg = task.lm_eval
    rows = {split: _rows(f) for split, f in files.items()}
    features = {k for docs in rows.values() for _, d in docs for k in d}
    render = _renderer(cfg, features)
    if isinstance(cfg.get("description"), str):
        render["description"] = lambda doc: apply_template(cfg["description"], doc)
    check = _row_checker(task.name, cfg, features, render)
    for split, docs in rows.items():
        for line, doc in docs:
            check(f"{files[split]}:{line}", doc)
    return sum(len(docs) for docs in rows.values())


def check_lm_task(task, lm_task, need_train: bool) -> int:
    """A task whose documents lm-eval loads itself (a plain lm-eval task YAML, a registry task):
    with need_train its training documents must exist, and every training and evaluation document
    (process_docs applied) must render through the lm-eval Task's own doc_to_* methods."""
    c = lm_task.config
    where = task.path or "lm-eval's registry"
    splits = []
    if need_train:
        docs = list(lm_task.training_docs()) if lm_task.has_training_docs() else []
        if not docs:
            raise DataCheckError(f"task {task.name!r} ({where}) has no training documents (training_split "
                                 f"{c.training_split!r}); a stream task needs them: hold it out (`heldout:`) instead")
        splits.append((c.training_split, docs))
    splits.append((c.test_split or c.validation_split, list(lm_task.eval_docs)))
    render = {"doc_to_text": lm_task.doc_to_text, "doc_to_target": lm_task.doc_to_target,
              "doc_to_choice": lm_task.doc_to_choice if c.doc_to_choice is not None else None,
              "description": lambda doc: lm_task.resolve_field(doc, c.description)}
    templates = {t: getattr(c, t, None) for t in TEMPLATES}
    check = _row_checker(task.name, templates | {"output_type": c.output_type}, set(lm_task.features), render)
    for split, docs in splits:
        for i, doc in enumerate(docs, 1):
            check(f"task {task.name!r} ({where}), {split} document {i}", doc)
    return sum(len(docs) for _, docs in splits)


def _row_checker(name: str, cfg: dict, features: set[str], render: dict):
    """check(where, doc): every field the templates read is present and not null, the templates
    render, and a multiple-choice target is one of the row's choices."""
    reads = {t: _fields_read(cfg.get(t), features) for t in TEMPLATES if cfg.get(t) is not None}
    mc = cfg.get("output_type") == "multiple_choice"

    def check(where: str, doc: dict) -> None:
        for t, fields in reads.items():
            for f in fields:
                if doc.get(f) is None:
                    what = "missing" if f not in doc else "null"
                    raise DataCheckError(f"{where}: field {f!r} is {what}, but task {name!r}'s {t} reads it")
        try:
            if "description" in render:
                render["description"](doc)
            render["doc_to_text"](doc)
            target = render["doc_to_target"](doc)
            choices = render["doc_to_choice"](doc) if render["doc_to_choice"] else None
        except Exception as e:  # jinja's, ast's and the templates' own errors alike
            raise DataCheckError(f"{where}: task {name!r}'s templates do not render this row: "
                                 f"{type(e).__name__}: {e}") from None
        if mc:
            _check_choice(where, name, target, choices, reads.get("doc_to_target", []))

    return check


def _check_choice(where: str, name: str, target, choices, target_fields: list[str]) -> None:
    field = f" (field {', '.join(map(repr, target_fields))})" if target_fields else ""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise DataCheckError(f"{where}: task {name!r}'s doc_to_choice gives {choices!r}, not a list of choices")
    for t in target if isinstance(target, list) else [target]:
        ok = (0 <= t < len(choices)) if isinstance(t, int) and not isinstance(t, bool) else (t in choices)
        if not ok:
            raise DataCheckError(f"{where}: target {t!r}{field} is not one of task {name!r}'s choices "
                                 f"(an index 0-{len(choices) - 1} or one of {list(choices)!r})")


def check_stage_keys(cfg, names: list[str]) -> None:
    """Each key of `stages:` must name a task of the stream or a stage number 1..T: any other key
    would be ignored without a word."""
    for key in cfg.stages:
        if key in names:
            continue
        if key.isdigit() and 1 <= int(key) <= len(names):
            continue
        raise DataCheckError(f"stages.{key}: not a task of the stream ({', '.join(names)}) nor a stage number "
                             f"1-{len(names)}")


def check_plan(pl):
    """Everything a run will read, before it starts: the `stages:` keys, every row of the stream's
    train and test files and of the local held-out tasks' test files. Returns the plan."""
    check_stage_keys(pl.cfg, pl.task_names)
    for name in pl.task_names:
        d = pl.task_defs[name]
        if d.hub or d.native:  # lm-eval loads the data: the built task's documents are checked
            check_lm_task(d, build_lm_eval_tasks([d], pl.cache)[name], need_train=True)
        else:
            check_task(d, d.check_data(pl.cache))
    for name in pl.heldout:
        d = pl.task_defs[name]
        if d.native:
            check_lm_task(d, build_lm_eval_tasks([d], pl.cache)[name], need_train=False)
        elif not d.hub:  # a held-out registry task is built (from the hub) when the run starts
            check_task(d, d.check_data(pl.cache, need_train=False))
    return pl
