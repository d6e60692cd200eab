"""lm-eval task YAML as it is, in the folders a config lists in `task_dirs`.

A folder is read the way `lm_eval --include_path DIR` reads it: every `**/*.yaml` (sorted, without
`__pycache__`), each file through lm-eval's own loader (`lm_eval.tasks._yaml_loader.load_yaml`:
`include:` merged, local keys winning; `!function mod.fn` from `mod.py` beside the file that names
it, else an importable module). A file with `task:` is a task, one with `group:` a group, a task's
`tag:` adds it to a tag; a file with neither (an include-only `_base.yaml`) is no entry.

What clbench adds, because lm-eval leaves it to the working directory:

- relative `dataset_kwargs.data_files` of a local loader (`dataset_path: json`, csv, parquet, text,
  arrow) are resolved against the task YAML's folder; a path found there wins, else the same path
  under the current working directory (where lm-eval, through `datasets`, looks) is used;
- a group or tag in a stream stands for its tasks, in the group's order (a tag's: sorted by name,
  as lm-eval builds it); a group member that overrides fields is refused (a stream trains tasks as
  their YAML defines them).

`Prompting` carries a run's `chat_template` / `system_instruction` to the rendering of training
examples; evaluation passes the same two settings to lm-eval's simple_evaluate.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import yaml

from clbench.errors import ClbenchError

# datasets' packaged loaders that read local `data_files` (for any other dataset_path the paths
# belong to that dataset, e.g. files of a hub repository, and are left alone)
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
_IGNORE = {"__pycache__", ".ipynb_checkpoints"}


class LmEvalYamlError(ClbenchError):
    pass


def read(path: Path) -> dict:
    """One task, group or base YAML read by lm-eval's loader; a syntax error names file, line and
    column, a bad include or `!function` the file and lm-eval's reason."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=True)
    except yaml.YAMLError as e:
        raise LmEvalYamlError(malformed(path, e)) from None
    except (OSError, ValueError, ImportError, AttributeError) as e:  # a missing include, a cycle, a !function
        raise LmEvalYamlError(f"{path}: lm-eval cannot read this task YAML: {type(e).__name__}: {e}") from None
    except SyntaxError as e:  # a !function module (user code) that does not compile: its file and line
        raise LmEvalYamlError(f"{e.filename}:{e.lineno}: syntax error: {e.msg} (a !function module of {path})") from None
    except Exception as e:  # a !function module that raises while it is imported
        import traceback

        last = traceback.extract_tb(e.__traceback__)[-1]
        raise LmEvalYamlError(f"{last.filename}:{last.lineno}: {type(e).__name__}: {e} (importing a !function module "
                              f"of {path})") from e


def malformed(path: Path, e: yaml.YAMLError) -> str:
    """A YAML syntax error as `file:line:column: malformed task YAML: problem`."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    return f"{where}: malformed task YAML: {getattr(e, 'problem', None) or e}"


def folder_entries(folder: Path) -> Iterator[tuple[Path, dict]]:
    """(path, merged config) of every task or group YAML under `folder` (streams.yaml excluded)."""
    files = sorted((p for p in folder.glob("**/*.yaml") if not _IGNORE & set(p.parts) and p.name != "streams.yaml"),
                   key=lambda p: p.as_posix())
    for f in files:
        raw = read(f)
        if "group" in raw or isinstance(raw.get("task"), str) or "class" in raw:
            yield f, raw


def groups(folders) -> dict[str, dict]:
    """{name: {"path", "members"}} of the groups and tags of these folders (lm-eval's meanings)."""
    from dataclasses import fields

    from lm_eval.config.group import GroupConfig

    group_keys = {f.name for f in fields(GroupConfig)}
    out: dict[str, dict] = {}
    for folder in folders:
        for f, raw in folder_entries(folder):
            if "group" in raw and "class" not in raw:
                name = str(raw["group"])
                extra = sorted(set(raw) - group_keys)
                if extra:
                    raise LmEvalYamlError(f"{f}: group {name!r} sets {', '.join(extra)} for its tasks; a clbench stream "
                                          "trains each task as its own YAML defines it: put the fields there")
                if name in out:
                    raise LmEvalYamlError(f"group {name!r} is defined twice: {out[name]['path']} and {f}")
                members = raw.get("task") if isinstance(raw.get("task"), list) else [raw.get("task")]
                out[name] = {"path": f, "members": [_member(f, name, m) for m in members]}
                continue
            for tag in ([raw["tag"]] if isinstance(raw.get("tag"), str) else raw.get("tag") or []):
                entry = out.setdefault(str(tag), {"path": f, "members": [], "tag": True})
                if not entry.get("tag"):
                    raise LmEvalYamlError(f"{f}: tag {tag!r} is also a group ({entry['path']})")
                entry["members"] = sorted({*entry["members"], str(raw["task"])})
    return out


def _member(path: Path, group: str, m: Any) -> str:
    if isinstance(m, str):
        return m
    if isinstance(m, dict) and set(m) == {"task"} and isinstance(m["task"], str):
        return m["task"]
    raise LmEvalYamlError(f"{path}: group {group!r} member {m!r} defines or overrides a task inline; a clbench stream "
                          "takes tasks by name (write the task as its own YAML and list its name)")


def expand(names: list[str], groups_: dict[str, dict], seen: tuple = ()) -> list[str]:
    """Task names with every group or tag replaced by its tasks (recursively; a cycle fails)."""
    out: list[str] = []
    for n in names:
        if n in groups_:
            if n in seen:
                raise LmEvalYamlError(f"group {n!r} contains itself ({' -> '.join((*seen, n))})")
            out += expand(groups_[n]["members"], groups_, (*seen, n))
        else:
            out.append(n)
    return out


def _exists(p: Path) -> bool:
    return bool(glob.glob(str(p))) if glob.has_magic(str(p)) else p.exists()


def resolve_data_files(cfg: dict, yaml_dir: Path) -> Any:
    """The task's `dataset_kwargs.data_files` with relative local paths made absolute: against the
    YAML's folder when found there, else against the working directory (lm-eval's own rule); None
    when the task reads no local files."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if cfg.get("dataset_path") not in LOCAL_BUILDERS or files is None:
        return None

    def one(f: str) -> str:
        if "://" in f or Path(f).is_absolute():
            return f
        here, cwd = os.path.normpath(yaml_dir / f), os.path.normpath(Path.cwd() / f)
        return cwd if not _exists(Path(here)) and _exists(Path(cwd)) else here

    if isinstance(files, dict):
        return {k: [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in files.items()}
    return [one(x) for x in files] if isinstance(files, list) else one(files)


def local_files(resolved: Any) -> dict[str, Path]:
    """{label: path} of resolved data_files ("train", "train[1]" for a list; a bare string or list
    is datasets' single `train` split)."""
    if resolved is None:
        return {}
    items = resolved.items() if isinstance(resolved, dict) else [("train", resolved)]
    out = {}
    for split, v in items:
        for i, f in enumerate(v if isinstance(v, list) else [v]):
            if "://" not in f:
                out[split if not isinstance(v, list) else f"{split}[{i}]"] = Path(f)
    return out


def missing(files: dict[str, Path]) -> list[Path]:
    return [p for p in files.values() if not _exists(p)]


@dataclass(frozen=True)
class Prompting:
    """How a run renders prompts beyond the task's templates: lm-eval's `system_instruction` and,
    with `chat_template`, the tokenizer's chat template (lm-eval's apply_chat_template with
    fewshot_as_multiturn, its default)."""

    tokenizer: Any
    chat_template: bool = False
    system_instruction: str | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """lm-eval's HFLM.apply_chat_template on this tokenizer (the same call, the same fallback
        without the system turn when the template refuses one)."""
        import jinja2
        from lm_eval.models.huggingface import HFLM

        try:
            return HFLM.apply_chat_template(SimpleNamespace(tokenizer=self.tokenizer, chat_template_args={}),
                                            messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # the model's own template (user input): one line naming its file
            line = f" line {e.lineno}:" if getattr(e, "lineno", None) else ""
            raise LmEvalYamlError(f"{_template_file(self.tokenizer)}: the chat template does not render:{line} "
                                  f"{type(e).__name__}: {e}") from None

    def context_kwargs(self) -> dict:
        """The arguments lm-eval's evaluator gives ConfigurableTask.fewshot_context."""
        kw: dict = {"system_instruction": self.system_instruction}
        if self.chat_template:
            kw.update(apply_chat_template=True, fewshot_as_multiturn=True, chat_template=self.render)
        return kw


def _template_file(tokenizer) -> str:
    """Where a tokenizer's chat template was read from (its folder's chat_template.jinja or
    tokenizer_config.json), or the tokenizer's name."""
    from pathlib import Path

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"the chat template of tokenizer {folder}"


def prompting(cfg, tokenizer) -> Prompting | None:
    """The run's Prompting, or None when it renders prompts with the templates alone. A chat
    template on a tokenizer without one fails here, before any training."""
    if not cfg.chat_template and cfg.system_instruction is None:
        return None
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise LmEvalYamlError(f"chat_template: true, but the tokenizer of model {cfg.model!r} has no chat template")
    return Prompting(tokenizer, cfg.chat_template, cfg.system_instruction)
