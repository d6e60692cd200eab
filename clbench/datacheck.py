"""Data validation at plan time: every row of every file a run reads is rendered once through
the task's own lm-eval templates before anything is trained.

lm-eval loads a JSONL file with `datasets`, which gives a row that lacks a field the value
None: a template then renders "Number: None" and a target " None", and training runs on it
without a word (a test file with such a row can also end in a DatasetGenerationError). Here
each raw row is checked against the fields its templates read, then rendered by lm-eval's own
ConfigurableTask methods (doc_to_text, doc_to_target, doc_to_choice, with its jinja
environment), and a multiple-choice target must be one of the row's choices. A bad row fails
naming the file, the line and the field.

lm-eval has no such check of its own; what is written here is only the bookkeeping around its
rendering (which fields a template reads, which line a row is on).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from .errors import ClbenchError

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
    """Render every row of `files` ({split: path}) of one task (a clbench.tasks.TaskDef); returns
    the number of rows checked. Raises DataCheckError naming file, line and field."""
    from lm_eval.utils import apply_template

    cfg = task.lm_eval
    rows = {split: _rows(f) for split, f in files.items()}
    features = {k for docs in rows.values() for _, d in docs for k in d}
    reads = {t: _fields_read(cfg.get(t), features) for t in TEMPLATES if cfg.get(t) is not None}
    render = _renderer(cfg, features)
    mc = cfg.get("output_type") == "multiple_choice"
    n = 0
    for split, docs in rows.items():
        path = files[split]
        for line, doc in docs:
            where = f"{path}:{line}"
            for t, fields in reads.items():
                for f in fields:
                    if doc.get(f) is None:
                        what = "missing" if f not in doc else "null"
                        raise DataCheckError(f"{where}: field {f!r} is {what}, but task {task.name!r}'s {t} reads it")
            try:
                if isinstance(cfg.get("description"), str):
                    apply_template(cfg["description"], doc)
                render["doc_to_text"](doc)
                target = render["doc_to_target"](doc)
                choices = render["doc_to_choice"](doc) if render["doc_to_choice"] else None
            except Exception as e:  # jinja's, ast's and the templates' own errors alike
                raise DataCheckError(f"{where}: task {task.name!r}'s templates do not render this row: "
                                     f"{type(e).__name__}: {e}") from None
            if mc:
                _check_choice(where, task.name, target, choices, reads.get("doc_to_target", []))
            n += 1
    return n


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
        check_task(d, d.check_data(pl.cache))
    for name in pl.heldout:
        d = pl.task_defs[name]
        if not d.hub:
            check_task(d, d.check_data(pl.cache, need_train=False))
    return pl
