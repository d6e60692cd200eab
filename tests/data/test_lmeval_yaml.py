"""Plain lm-eval task YAML in a task_dirs folder (no `clbench:` block) are stream tasks: the folder
is read as `lm_eval --include_path` reads it (include:, !function, process_docs, groups, tags),
local data_files are found beside the YAML, training examples are lm-eval's own requests for the
training documents, lm-eval's registry tasks (offline: false) are stream tasks by name, and a task
without training documents fails at plan time naming it."""

import csv
import json
import textwrap

import pytest
import yaml

from conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "lmeval_tasks"
TINY_TASKS = REPO / "configs" / "tiny_tasks"


def test_the_folder_is_indexed_as_lm_evals_include_path():
    from lm_eval.tasks import TaskManager

    from clbench.data import tasks as T

    defs = T.load_tasks([FIXTURES])
    mine = {n for n, d in defs.items() if d.path and FIXTURES in d.path.parents}
    tm = TaskManager(include_path=str(FIXTURES), include_defaults=False)
    assert mine == set(tm.all_subtasks) == {"lm_vowel", "lm_next", "lm_vowel_eval_only"}  # _base.yaml: no entry
    vowel = defs["lm_vowel"]
    assert vowel.native and vowel.lm_eval["output_type"] == "multiple_choice"  # from the included _base.yaml
    assert callable(vowel.lm_eval["process_docs"])  # !function utils.upper_letter beside the YAML
    assert vowel.data_files(None)["train"] == FIXTURES / "data" / "vowel.train.jsonl"  # relative to the YAML
    streams = T.load_streams([FIXTURES], defs)
    assert set(tm.all_groups) == {"lm_letters"} and set(tm.all_tags) == {"letter_tasks"}
    assert streams["lm_letters"]["orders"] == {"1": ["lm_vowel", "lm_next"]}  # the group's order
    assert streams["letter_tasks"]["orders"] == {"1": ["lm_next", "lm_vowel"]}  # a tag's: by name, as lm-eval


def test_training_examples_are_lm_evals_requests_for_the_training_documents(tmp_path):
    """Reference: lm-eval's own Task of the same YAML evaluating the training split with no shots;
    each training example is its request for the gold choice (generation: its context, then
    target_delimiter + target + EOS)."""
    from lm_eval.tasks import TaskManager

    from clbench.data import tasks as T

    defs = T.load_tasks([FIXTURES])
    built = T.build_lm_eval_tasks([defs["lm_vowel"], defs["lm_next"]], tmp_path)
    assert built["lm_vowel"].config.num_fewshot == 1  # evaluation keeps the YAML's shots; training has none
    for name, task in built.items():
        pairs = T.training_examples(task, "</s>")
        ref = TaskManager(include_defaults=False).load([{**defs[name].lm_eval_config(tmp_path), "test_split": "train",
                                                         "num_fewshot": 0}])["tasks"][name]
        ref.build_all_requests()
        docs = list(ref.eval_docs)
        assert len(pairs) == len(docs) == len(list(task.training_docs()))
        for inst in ref.instances:
            doc = docs[inst.doc_id]
            if name == "lm_vowel":
                if inst.idx == doc["label"]:
                    assert pairs[inst.doc_id] == inst.args
            else:
                assert pairs[inst.doc_id] == (inst.args[0], f" {doc['next']}</s>")
    assert pairs[0][0] == "Letter: a\nNext letter:"
    assert T.training_examples(built["lm_vowel"])[0] == (
        "Decide whether the letter is a vowel.\n\nLetter: A\nVowel?\nAnswer:", " yes")  # process_docs: upper case


def _task_yaml(folder, name, **kw):
    body = {"task": name, "dataset_path": "json", "output_type": "multiple_choice", "training_split": "train",
            "test_split": "test", "doc_to_text": "Number: {{n}}\nParity:", "doc_to_target": "label",
            "doc_to_choice": ["even", "odd"], "metric_list": [{"metric": "acc"}], **kw}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(body))


def _rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_data_files_beside_the_yaml_then_the_working_directory_and_parquet(tmp_path, monkeypatch):
    import pandas as pd

    from clbench.data import tasks as T

    folder, work = tmp_path / "tasks", tmp_path / "work"
    rows = [{"n": i, "label": i % 2} for i in range(6)]
    _rows(folder / "d" / "train.jsonl", rows)
    _rows(work / "d" / "test.jsonl", rows[:3])  # only under the working directory
    _task_yaml(folder, "p_json", dataset_kwargs={"data_files": {"train": "d/train.jsonl", "test": "d/test.jsonl"}})
    pd.DataFrame(rows).to_parquet(folder / "rows.parquet")
    _task_yaml(folder, "p_parquet", dataset_path="parquet",
               dataset_kwargs={"data_files": {"train": "rows.parquet", "test": "rows.parquet"}})
    _task_yaml(folder, "p_gone", dataset_kwargs={"data_files": {"train": "d/train.jsonl", "test": "nowhere.jsonl"}})
    monkeypatch.chdir(work)
    defs = T.load_tasks([folder])
    assert defs["p_json"].data_files(None) == {"train": folder / "d" / "train.jsonl", "test": work / "d" / "test.jsonl"}
    built = T.build_lm_eval_tasks([defs["p_json"], defs["p_parquet"]], tmp_path)
    assert [len(list(t.training_docs())) for t in built.values()] == [6, 6]
    assert len(list(built["p_json"].eval_docs)) == 3
    with pytest.raises(T.TaskError, match=r"'p_gone'.*data file not found: .*tasks/nowhere.jsonl"):
        defs["p_gone"].check_data(tmp_path)


def _stand_in(tmp_path, training: bool = True):
    """lm-eval's registry task `boolq` offline: a local task of that name, returned by a replaced
    get_task_dict (as tests of held-out hub tasks do)."""
    from clbench.data import tasks as T

    folder = tmp_path / "standin"
    rows = [{"n": i, "label": i % 2} for i in range(8)]
    _rows(folder / "train.jsonl", rows)
    _rows(folder / "test.jsonl", rows[:4])
    _task_yaml(folder, "boolq", dataset_kwargs={"data_files": {"train": "train.jsonl", "test": "test.jsonl"}},
               training_split="train" if training else None)
    return T.build_lm_eval_tasks([T.load_tasks([folder])["boolq"]], tmp_path)["boolq"]


def _use_stand_in(monkeypatch, task):
    import lm_eval.tasks

    from clbench.data import tasks as T

    asked = []
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", lambda names, manager=None: asked.append(list(names)) or {"boolq": task})
    real = T.task_manager  # with no index of lm-eval's ~14,000 built-in YAML files for the hub tasks
    monkeypatch.setattr(T, "task_manager", lambda builtin=False: None if builtin else real())
    return asked


def _config(tmp_path, tasks, **extra):
    cfg = {"model": "tiny", "tasks": tasks, "task_dirs": [str(FIXTURES), str(TINY_TASKS)],
           "methods": [{"name": "full_ft"}], "train": {"steps": 2, "max_length": 64, "batch_size": 4},
           "eval": {"limit": 4, "log_samples": False}, "precision": "fp32", "threads": 1, **extra}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_a_stream_of_an_lm_eval_group_and_a_registry_task_runs(tmp_path, run_cli, monkeypatch, one_thread):
    asked = _use_stand_in(monkeypatch, _stand_in(tmp_path))
    cfg = _config(tmp_path, ["lm_letters", "boolq"], offline=False, heldout=["lm_vowel_eval_only"])
    code, out, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
    assert code == 0, err
    assert asked and all(a == ["boolq"] for a in asked)
    with open(tmp_path / "out" / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    trained = [r["trained_task"] for r in rows if r["eval_task"] == "lm_next"]
    assert trained == ["", "lm_vowel", "lm_next", "boolq"]  # the group stands for its tasks, in its order
    assert {r["eval_task"] for r in rows if r["eval_group"] == "heldout"} == {"lm_vowel_eval_only"}
    assert {r["metric"] for r in rows if r["eval_task"] == "lm_next"} == {"exact_match"}


def test_a_task_without_training_documents_fails_at_plan_time(tmp_path, run_cli, monkeypatch):
    code, _, err = run_cli("run", _config(tmp_path, ["lm_vowel_eval_only"]), "--output-dir", tmp_path / "out")
    assert code == 2 and "'lm_vowel_eval_only'" in err and "no training documents" in err, err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli("run", _config(tmp_path, ["boolq"]), "--output-dir", tmp_path / "out")
    assert code == 2 and "'boolq'" in err and "offline: false" in err, err  # offline: no registry task
    _use_stand_in(monkeypatch, _stand_in(tmp_path, training=False))
    code, _, err = run_cli("run", _config(tmp_path, ["boolq"], offline=False), "--output-dir", tmp_path / "out")
    assert code == 2 and "'boolq'" in err and "no training documents" in err, err
    assert not (tmp_path / "out").exists()


def test_bad_rows_groups_and_blocks_are_refused_naming_them(tmp_path, run_cli):
    from clbench.data import lmeval_yaml, tasks as T

    folder = tmp_path / "t"
    _rows(folder / "train.jsonl", [{"n": 1, "label": 1}, {"label": 0}])
    _rows(folder / "test.jsonl", [{"n": 2, "label": 0}])
    _task_yaml(folder, "holes", dataset_kwargs={"data_files": {"train": "train.jsonl", "test": "test.jsonl"}})
    cfg = _config(tmp_path, ["holes"], task_dirs=[str(folder)])
    code, _, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and "task 'holes'" in err and "train document 2" in err and "field 'n' is" in err, err

    (folder / "g.yaml").write_text("group: g\ntask: [{task: holes, num_fewshot: 2}]\n")
    with pytest.raises(lmeval_yaml.LmEvalYamlError, match=r"g.yaml: group 'g' member .* overrides a task inline"):
        T.load_streams([folder])
    (folder / "g.yaml").write_text(textwrap.dedent("""\
        task: nodata
        doc_to_text: x
        clbench: {description: a task nobody says where its documents are}
    """))
    with pytest.raises(T.TaskError, match="'nodata' has neither lm-eval's `dataset_path` nor a `clbench: {data"):
        T.load_tasks([folder])
    (folder / "g.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(lmeval_yaml.LmEvalYamlError, match=r"g.yaml:3:1: malformed task YAML"):
        T.load_tasks([folder])


def test_groups_and_tags_are_listed_as_streams(tmp_path, run_cli):
    code, out, err = run_cli("list", "streams", "--config", _config(tmp_path, ["lm_letters"]))
    assert code == 0, err
    assert "lm_letters: lm-eval group" in out and "order 1: lm_vowel -> lm_next  [data ready]" in out
    assert "letter_tasks: lm-eval tag" in out and "order 1: lm_next -> lm_vowel" in out


def test_data_prepare_takes_a_config_whose_tasks_name_a_group(tmp_path, run_cli):
    """`clbench data prepare --config` expands a group in `tasks:` as a run does (its tasks need no
    preparation: their data is the YAML's own data_files)."""
    code, out, err = run_cli("data", "prepare", "--config", _config(tmp_path, ["lm_letters"]))
    assert code == 0, err
    code, _, err = run_cli("data", "prepare", "--config", _config(tmp_path, ["lm_letters", "no_such_task"]))
    assert code == 2 and "no_such_task" in err, err
