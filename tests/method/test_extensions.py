"""Users extend clbench without touching the package: a task folder and a method file."""

import csv
import textwrap

USER_METHOD = '''
"""Train only the norms (a user method defined outside the package)."""
from pydantic import BaseModel, ConfigDict
from clbench.method import Method, register


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    which: str = "norm"


@register("norms_only")
class NormsOnly(Method):
    Options = Opts

    def __init__(self, options):
        self.options = options
        self.stages_seen = []

    def setup(self, model, run):
        for n, p in model.named_parameters():
            p.requires_grad_(self.options.which in n)
        return model

    def stage_start(self, model, stage):
        self.stages_seen.append(stage.stage)
        return model
'''

USER_TASK = """task: user_vowel
output_type: multiple_choice
doc_to_text: "Letter: {{letter}}\\nVowel?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list: [{metric: acc}]
clbench:
  description: "is the letter a vowel (user task)"
  data: {train: vowel.train.jsonl, test: vowel.test.jsonl}
"""


def test_user_task_folder_and_method_file(tmp_path, run_cli):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "vowel.yaml").write_text(USER_TASK)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = [f'{{"letter": "{c}", "label": {int(c in "aeiou")}}}' for c in letters]
    (tasks / "vowel.train.jsonl").write_text("\n".join(rows) + "\n")
    (tasks / "vowel.test.jsonl").write_text("\n".join(rows[:10]) + "\n")
    (tasks / "streams.yaml").write_text('mine:\n  orders:\n    "1": [user_vowel, tiny_parity]\n')
    (tmp_path / "norms_only.py").write_text(USER_METHOD)
    from conftest import REPO

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: tiny
        stream: mine
        task_dirs: [my_tasks, {REPO / 'configs' / 'tiny_tasks'}]
        method_files: [norms_only.py]
        methods: [{{name: norms_only}}]
        train: {{steps: 2, max_length: 48}}
        eval: {{limit: 6}}
        precision: fp32
    """))
    code, out, err = run_cli("list", "methods", "--config", cfg)
    assert code == 0 and "norms_only" in out and "full_ft" in out
    code, out, err = run_cli("list", "tasks", "--config", cfg)
    assert code == 0 and "user_vowel" in out and "ready" in out
    code, out, err = run_cli("list", "streams", "--config", cfg)
    assert code == 0 and "mine" in out and "user_vowel -> tiny_parity" in out
    code, out, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
    assert code == 0, err
    with open(tmp_path / "out" / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"norms_only"}
    assert {r["eval_task"] for r in rows} == {"user_vowel", "tiny_parity"}
    assert [r["trained_task"] for r in rows if r["eval_task"] == "user_vowel"] == ["", "user_vowel", "tiny_parity"]
    with open(tmp_path / "out" / "summary.csv") as f:
        (s,) = list(csv.DictReader(f))
    # only the 2 x (2 layers) + final norm vectors of 64 train
    assert int(s["trainable_params"]) == 5 * 64
