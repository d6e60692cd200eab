"""The held-out general-ability suite: `general`, a perplexity probe scored higher-is-better, and
lm-eval's standard tasks by name for users with a hub."""

import csv
import json

import pytest
import yaml

from conftest import REPO
from harness import cpu_rt


def test_general_expands_to_every_builtin_heldout_task():
    from clbench.data import tasks as T
    from clbench.run.planning import expand_heldout

    defs = T.load_tasks([REPO / "configs" / "tiny_tasks"])
    got = expand_heldout(["general"], defs)
    assert got == sorted(n for n, d in defs.items() if d.heldout and d.path.parent == REPO / "tasks")
    assert {"heldout_date_understanding", "heldout_logical_deduction", "heldout_navigate", "heldout_wiki_ppl"} <= set(got)
    assert expand_heldout(["tiny_copy", "general", "heldout_navigate"], defs)[0] == "tiny_copy"  # no duplicates, order kept
    assert len(expand_heldout(["general", "heldout_navigate"], defs)) == len(got)


def _ppl_task(folder):
    """A tiny user task in the layout of tasks/heldout_wiki_ppl.yaml: rolling log-likelihood of text."""
    lm = yaml.safe_load((REPO / "tasks" / "heldout_wiki_ppl.yaml").read_text())
    lm["task"] = "tiny_ppl"
    lm["clbench"] = {"heldout": True, "score": "per_byte_likelihood",
                     "data": {"test": "tiny_ppl.test.jsonl"}}
    (folder / "tiny_ppl.yaml").write_text(yaml.safe_dump(lm))
    (folder / "tiny_ppl.test.jsonl").write_text("".join(
        json.dumps({"text": t}) + "\n" for t in ["the cat sat on the mat", "a dog ran in the park", "one two three four"]))


def test_perplexity_probe_is_reported_as_per_byte_likelihood(tmp_path, run_cli):
    from clbench.run import models
    from clbench.data import tasks as T
    from clbench.run.evaluate import evaluate

    _ppl_task(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli("run", REPO / "configs" / "tiny.yaml", "--output-dir", out, "--set", "methods=[{name: full_ft}]",
                           "--set", "train.steps=2", "--set", "stream=null", "--set", "tasks=[tiny_parity]",
                           "--set", f"task_dirs=[{REPO / 'configs' / 'tiny_tasks'}, {tmp_path}]",
                           "--set", "heldout=[tiny_ppl]")
    assert code == 0, err
    with open(out / "matrix.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["eval_task"] == "tiny_ppl"]
    assert {r["metric"] for r in rows} == {"per_byte_likelihood"} and {r["eval_group"] for r in rows} == {"heldout"}
    base = next(float(r["value"]) for r in rows if r["stage"] == "0")
    # the base row is 2^(-bits per byte) of lm-eval's own score of the same model
    defs = T.load_tasks([tmp_path])
    model, tok, _ = models.resolve("tiny", None)
    lm_tasks = T.build_lm_eval_tasks([defs["tiny_ppl"]], tmp_path / "cache")
    raw, _, _ = evaluate(model, tok, lm_tasks, {"tiny_ppl": ("bits_per_byte", "none")}, cpu_rt(tok), batch_size=4, log_samples=False)
    assert raw["tiny_ppl"] > 0
    assert base == pytest.approx(2.0 ** -raw["tiny_ppl"], rel=1e-6)
    assert 0 < base < 1


def test_unknown_score_transform_is_named(tmp_path):
    from clbench.data import tasks as T

    _ppl_task(tmp_path)
    y = yaml.safe_load((tmp_path / "tiny_ppl.yaml").read_text())
    y["clbench"]["score"] = "perplexity_inverse"
    (tmp_path / "tiny_ppl.yaml").write_text(yaml.safe_dump(y))
    with pytest.raises(T.TaskError, match="clbench.score 'perplexity_inverse' is not one of per_byte_likelihood"):
        T.load_tasks([tmp_path])["tiny_ppl"].primary_metric


def test_lm_eval_standard_tasks_need_the_hub(tmp_path, run_cli):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["task_dirs"] = [str(REPO / "configs" / "tiny_tasks")]
    cfg["heldout"] = ["arc_easy"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("run", tmp_path / "c.yaml", "--output-dir", tmp_path / "out")
    assert code == 2 and "'arc_easy'" in err and "offline: false" in err
    assert not (tmp_path / "out").exists()


def test_hub_task_goes_through_lm_eval_by_name(tmp_path, monkeypatch):
    """No hub here: lm-eval's get_task_dict is replaced by one returning a locally built task, to
    check clbench's side (the task by name, its first metric as the primary one)."""
    import lm_eval.tasks

    from clbench.data import tasks as T

    defs = T.load_tasks([REPO / "configs" / "tiny_tasks"])
    local = T.build_lm_eval_tasks([defs["tiny_parity"]], tmp_path)["tiny_parity"]
    asked = []

    def fake(names, manager=None):
        asked.append(list(names))
        return {"arc_easy": local}

    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", fake)
    hub = T.hub_task("arc_easy")
    got = T.build_lm_eval_tasks([defs["tiny_compare"], hub], tmp_path)
    assert asked == [["arc_easy"]] and got["arc_easy"] is local and list(got) == ["tiny_compare", "arc_easy"]
    assert hub.primary_metric == ("acc", "none") and hub.heldout
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", lambda names, manager=None: {"arc_easy": {"sub": local}})
    with pytest.raises(T.TaskError, match="is an lm-eval group"):
        T.build_lm_eval_tasks([T.hub_task("arc_easy")], tmp_path)


def test_a_perplexity_probe_cannot_be_trained(tmp_path, run_cli):
    _ppl_task(tmp_path)
    code, _, err = run_cli("run", REPO / "configs" / "tiny.yaml", "--output-dir", tmp_path / "out",
                           "--set", "stream=null", "--set", "tasks=[tiny_parity, tiny_ppl]",
                           "--set", f"task_dirs=[{REPO / 'configs' / 'tiny_tasks'}, {tmp_path}]")
    assert code == 2 and "'tiny_ppl'" in err and "can only be held out" in err
