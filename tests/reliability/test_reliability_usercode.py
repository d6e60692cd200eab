"""Reliability: an error in the user's own code or files (a `!function` module, a model's chat
template, a plugin) is one line naming the file, not a traceback."""

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO

TINY_TASKS = REPO / "configs" / "tiny_tasks"

FUNCTION_TASK = """task: fparity
output_type: multiple_choice
doc_to_text: !function utils.fmt
doc_to_target: label
doc_to_choice: ["even", "odd"]
metric_list:
  - metric: acc
clbench:
  data: {train: tiny_parity.train.jsonl, test: tiny_parity.test.jsonl}
"""


def _config(tmp_path, task_yaml=FUNCTION_TASK, utils=None, **extra):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for split in ("train", "test"):
        shutil.copy(TINY_TASKS / f"tiny_parity.{split}.jsonl", tasks)
    (tasks / "fparity.yaml").write_text(task_yaml)
    (tasks / "utils.py").write_text(utils or 'def fmt(doc):\n    return f"Number: {doc[\'number\']}\\nEven or odd?\\nAnswer:"\n')
    cfg = {"model": "tiny", "tasks": ["fparity"], "task_dirs": ["tasks"], "methods": [{"name": "full_ft"}],
           "train": {"steps": 2}, "eval": {"limit": 4}, "precision": "fp32", "threads": 1, **extra}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "c.yaml"


@pytest.mark.parametrize("utils, expect", [
    ('def fmt(doc):\n    return "Number: " + str(doc["number"] +\n', "utils.py:2: syntax error: '(' was never closed"),
    ('raise RuntimeError("boom")\n', "utils.py:1: RuntimeError: boom (importing a !function module"),
])
def test_a_broken_function_module_is_one_line_naming_it(tmp_path, run_cli, utils, expect):
    cfg = _config(tmp_path, utils=utils)
    code, _, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and "Traceback" not in err and expect in err and str(tmp_path / "tasks") in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_invalid_chat_template_is_one_line_naming_its_file(tmp_path, run_cli):
    from clbench.run import models

    tok = models.build_tiny_tokenizer()
    model = tmp_path / "model"
    models.build_tiny_model(0, len(tok)).save_pretrained(model)
    tok.chat_template = "{% if %}{{ messages }}"
    tok.save_pretrained(model)
    template = next(p for p in (model / "chat_template.jinja", model / "tokenizer_config.json") if p.is_file())
    cfg = _config(tmp_path, model=str(model), chat_template=True)
    code, _, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and "Traceback" not in err, err
    assert f"{template}: the chat template does not render: line 1: TemplateSyntaxError" in err, err
    assert not (tmp_path / "out" / "results.json").exists()  # before any training


def _dist(root: Path, name: str, group: str, entry: str) -> None:
    info = root / f"{name.replace('-', '_')}-1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")


@pytest.mark.parametrize("group, entry, module, msg", [
    ("clbench.tasks", "mine = raising_tasks_xyz:folder", "def folder():\n    raise RuntimeError('no folder today')\n",
     "failed: calling raising_tasks_xyz:folder raised RuntimeError: no folder today"),
    ("clbench.methods", "mine = raising_methods_xyz", "raise ValueError('bad plugin')\n",
     "failed to load: ValueError: bad plugin"),
])
def test_a_plugin_that_raises_is_one_error_naming_it(tmp_path, monkeypatch, group, entry, module, msg):
    from clbench.method import available, load_builtin_methods
    from clbench.method import registry
    from clbench import paths
    from clbench.data import tasks
    from clbench.errors import ClbenchError

    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    _dist(tmp_path, "raising-plugin", group, entry)
    (tmp_path / f"{entry.split('=')[1].strip().split(':')[0]}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._PLUGINS, "done", False)  # plugins are looked up once per process
    with pytest.raises(ClbenchError) as e:
        available() if group == "clbench.methods" else tasks.load_tasks()
    name, value = (s.strip() for s in entry.split("="))
    assert f"entry point {name} = {value} (group {group}, distribution raising-plugin 1.2)" in str(e.value)
    assert msg in str(e.value), str(e.value)
    monkeypatch.undo()
    assert "full_ft" in available() and "trec" in tasks.load_tasks()
