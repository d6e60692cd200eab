"""Plan-time data validation (clbench.data.datacheck): a row whose template reads a missing field, or
whose target is not one of its choices, fails before any model is loaded, naming file, line and
field; so do `stages:` keys that name no task of the stream and no stage."""

import json

import pytest

from conftest import REPO

TINY_TASKS = REPO / "configs" / "tiny_tasks"

TASK_YAML = """task: t
output_type: multiple_choice
doc_to_text: "Number: {{number}}\\nParity:"
doc_to_target: label
doc_to_choice: ["even", "odd"]
metric_list: [{metric: acc}]
clbench: {data: {train: t.train.jsonl, test: t.test.jsonl}}
"""

GEN_YAML = """task: g
output_type: generate_until
doc_to_text: "Copy: {{text}}\\nCopy:"
doc_to_target: "{{target}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 8}
metric_list: [{metric: exact_match}]
clbench: {data: {train: g.train.jsonl, test: g.test.jsonl}}
"""

GOOD_ROWS = [{"number": 3, "label": 1}, {"number": 4, "label": 0}, {"number": 7, "label": "odd"}]

CONFIG = """
model: tiny
tasks: [{tasks}]
task_dirs: [{dir}]
methods: [{{name: full_ft}}]
train: {{steps: 1, max_length: 64}}
eval: {{limit: 2}}
precision: fp32
"""


def write_task(tmp_path, train, test, yaml_text=TASK_YAML, name="t"):
    d = tmp_path / "tasks"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(yaml_text)
    for split, rows in (("train", train), ("test", test)):
        (d / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(tmp_path, run_cli, train, test, extra=(), yaml_text=TASK_YAML, name="t"):
    d = write_task(tmp_path, train, test, yaml_text, name)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(tasks=name, dir=d))
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, "--output-dir", out, *extra)
    return code, err, d, out


@pytest.mark.parametrize("split", ["train", "test"])
def test_row_missing_a_template_field_names_file_line_and_field(tmp_path, run_cli, split):
    bad = GOOD_ROWS[:1] + [{"label": 0}] + GOOD_ROWS[1:]
    rows = {"train": GOOD_ROWS, "test": GOOD_ROWS, split: bad}
    code, err, d, out = run(tmp_path, run_cli, rows["train"], rows["test"])
    assert code == 2 and err.startswith("clbench: error: ") and "Traceback" not in err
    assert f"{d / f't.{split}.jsonl'}:2: field 'number' is missing, but task 't''s doc_to_text reads it" in err, err
    assert not out.exists()  # before anything was written or loaded


@pytest.mark.parametrize("split", ["train", "test"])
def test_row_missing_its_target_names_file_line_and_field(tmp_path, run_cli, split):
    rows = {"train": GOOD_ROWS, "test": GOOD_ROWS, split: GOOD_ROWS + [{"number": 9}]}
    code, err, d, _ = run(tmp_path, run_cli, rows["train"], rows["test"])
    assert code == 2 and "Traceback" not in err
    assert f"t.{split}.jsonl:4: field 'label' is missing, but task 't''s doc_to_target reads it" in err, err


@pytest.mark.parametrize("label, shown", [(2, "2"), ("seven", "'seven'"), (-1, "-1")])
def test_target_that_is_not_a_choice(tmp_path, run_cli, label, shown):
    code, err, d, _ = run(tmp_path, run_cli, GOOD_ROWS + [{"number": 5, "label": label}], GOOD_ROWS)
    assert code == 2 and "Traceback" not in err
    assert (f"{d / 't.train.jsonl'}:4: target {shown} (field 'label') is not one of task 't''s choices "
            "(an index 0-1 or one of ['even', 'odd'])") in err, err


def test_null_field_is_named_too(tmp_path, run_cli):
    code, err, _, _ = run(tmp_path, run_cli, GOOD_ROWS, [{"number": None, "label": 1}])
    assert code == 2 and "t.test.jsonl:1: field 'number' is null" in err, err


def test_generation_task_row_missing_its_target(tmp_path, run_cli):
    rows = [{"text": "ab", "target": "ab"}, {"text": "cd"}]
    code, err, _, _ = run(tmp_path, run_cli, rows, rows[:1], yaml_text=GEN_YAML, name="g")
    assert code == 2 and "g.train.jsonl:2: field 'target' is missing, but task 'g''s doc_to_target reads it" in err, err


def test_every_row_of_good_files_is_checked(tmp_path):
    from clbench.data import datacheck, tasks

    d = write_task(tmp_path, GOOD_ROWS, GOOD_ROWS[:2])
    t = tasks.parse_task_file(d / "t.yaml")
    assert datacheck.check_task(t, {"train": d / "t.train.jsonl", "test": d / "t.test.jsonl"}) == 5
    tiny = tasks.load_tasks([TINY_TASKS])
    for name in ("tiny_parity", "tiny_compare", "tiny_copy"):
        files = tiny[name].data_files(tmp_path)
        lines = sum(1 for f in files.values() for line in f.read_text().splitlines() if line.strip())
        assert datacheck.check_task(tiny[name], files) == lines > 0


@pytest.mark.parametrize("key, needle", [
    ("tiny_parityy", "stages.tiny_parityy: not a task of the stream (tiny_parity, tiny_compare, tiny_copy) nor a stage number 1-3"),
    ("'9'", "stages.9: not a task of the stream (tiny_parity, tiny_compare, tiny_copy) nor a stage number 1-3"),
    ("'0'", "stages.0: not a task of the stream"),
])
def test_stage_key_outside_the_stream(tmp_path, run_cli, key, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(tasks="tiny_parity, tiny_compare, tiny_copy", dir=TINY_TASKS)
                   + f"stages: {{tiny_copy: {{steps: 2}}, '2': {{lr: 0.01}}, {key}: {{steps: 3}}}}\n")
    code, _, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and "Traceback" not in err and needle in err, err
    assert not (tmp_path / "out").exists()
