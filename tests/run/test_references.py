"""Reference runs (mode multitask / single), intransigence, and merged rows from a real tiny run."""

import csv
import json

import pytest
import torch
import yaml

from conftest import REPO
from harness import cpu_rt

TASKS = ["tiny_parity", "tiny_compare", "tiny_copy"]
STEPS = 6


def _config(**over):
    cfg = {
        "name": "refs", "model": "tiny", "stream": "tiny3", "order": "1",
        "task_dirs": [str(REPO / "configs" / "tiny_tasks")], "seeds": [0],
        "train": {"lr": 3.0e-3, "steps": STEPS, "batch_size": 8, "max_length": 64},
        "eval": {"limit": 10, "batch_size": 16}, "precision": "fp32", "threads": 1, "keep_checkpoints": "all",
        "methods": [
            {"name": "full_ft", "merge": [{"how": "task_arithmetic", "lam": 1.0, "label": "sum"},
                                          {"how": "dare_linear", "density": 0.5, "label": "dare"}]},
            {"name": "full_ft", "label": "mtl", "mode": "multitask"},
            {"name": "full_ft", "label": "single", "mode": "single",
             "merge": [{"how": "ties", "density": 0.5}, {"how": "task_arithmetic", "lam": 0.5},
                       {"how": "dare_ties", "density": 0.5}]},
        ],
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def refs_run(tmp_path_factory):
    from clbench.cli import main

    d = tmp_path_factory.mktemp("refs")
    (d / "refs.yaml").write_text(yaml.safe_dump(_config()))
    out = d / "run"
    assert main(["run", str(d / "refs.yaml"), "--output-dir", str(out)]) == 0
    return d, out


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rows_of(out, method, stage):
    got = {r["eval_task"]: float(r["value"]) for r in read(out / "matrix.csv")
           if r["method"] == method and r["stage"] == str(stage) and r["eval_group"] == "stream"}
    assert set(got) == set(TASKS), (method, stage, got)
    return [got[t] for t in TASKS]


def test_multitask_trains_once_on_all_tasks_with_the_streams_budget(refs_run):
    _, out = refs_run
    res = json.loads((out / "results.json").read_text())
    mtl = res["methods"]["mtl"]
    assert mtl["mode"] == "multitask"
    stages = mtl["seeds"]["0"]["stages"]
    assert len(stages) == 1 and stages[0]["task"] == "multitask"
    assert stages[0]["steps"] == STEPS * len(TASKS)  # the sum of the stages' budgets
    stage_labels = {r["stage"] for r in read(out / "matrix.csv") if r["method"] == "mtl"}
    assert stage_labels == {"0", "multitask"}
    joint = rows_of(out, "mtl", "multitask")
    summ = {r["method"]: r for r in read(out / "summary.csv")}
    assert summ["mtl"]["mode"] == "multitask"
    assert float(summ["mtl"]["acc"]) == pytest.approx(sum(joint) / len(joint))
    assert summ["mtl"]["bwt"] == ""  # a reference has no stream metrics


def test_intransigence_is_joint_minus_the_diagonal(refs_run):
    _, out = refs_run
    joint = rows_of(out, "mtl", "multitask")
    diag = [rows_of(out, "full_ft", k)[k - 1] for k in (1, 2, 3)]
    per_task = [a - r for a, r in zip(joint, diag)]
    summ = {r["method"]: r for r in read(out / "summary.csv")}
    assert float(summ["full_ft"]["intransigence"]) == pytest.approx(sum(per_task) / 3)
    res = json.loads((out / "results.json").read_text())
    entry = res["methods"]["full_ft"]["seeds"]["0"]["intransigence"]
    assert entry["reference"] == "mtl"
    assert entry["per_task"] == pytest.approx(per_task)
    assert summ["single"]["intransigence"] == ""  # references get none


def test_single_mode_starts_every_stage_from_the_base_model(refs_run):
    _, out = refs_run
    res = json.loads((out / "results.json").read_text())
    seq = res["methods"]["full_ft"]["seeds"]["0"]["stages"]
    single = res["methods"]["single"]["seeds"]["0"]["stages"]
    # Stage 1 of both starts from the base model with the same seed: identical training and scores.
    assert single[0]["first_loss"] == seq[0]["first_loss"] and single[0]["last_loss"] == seq[0]["last_loss"]
    assert rows_of(out, "single", 1) == rows_of(out, "full_ft", 1)
    # Stage 2 of the stream starts from stage 1's model, single's from the base: different first losses.
    assert single[1]["first_loss"] != seq[1]["first_loss"]
    summ = {r["method"]: r for r in read(out / "summary.csv")}
    diag = [rows_of(out, "single", k)[k - 1] for k in (1, 2, 3)]
    assert summ["single"]["mode"] == "single" and float(summ["single"]["la"]) == pytest.approx(sum(diag) / 3)


def test_merged_rows_and_the_sum_of_stage_vectors_is_the_final_model(refs_run):
    from clbench import checkpoint
    from clbench.run import models
    from clbench.method import merging

    _, out = refs_run
    stages = {r["stage"] for r in read(out / "matrix.csv") if r["method"] == "single"}
    assert {"merged:ties", "merged:task_arithmetic", "merged:dare_ties"} <= stages
    # Sequential stage vectors tau_t = theta_t - theta_{t-1} add up to the final model, so the
    # lam = 1 task-arithmetic row scores exactly like stage 3.
    assert rows_of(out, "full_ft", "merged:sum") == rows_of(out, "full_ft", 3)
    base_model, _, _ = models.resolve("tiny", None)
    base = base_model.state_dict()
    ck = out / "checkpoints" / "full_ft" / "seed0"
    diffs = [checkpoint.load_state_diff(ck / f"taskvec{t}.pt") for t in (1, 2, 3)]
    vectors = merging.vectors_from_diffs(base, diffs, cumulative=True)
    merged = merging.task_arithmetic({k: v for k, v in base.items() if k not in merging.tied_aliases(base)}, vectors, 1.0)
    final = checkpoint.load(ck / "stage3.pt")["diff"]
    changed = [k for k, e in final.items() if e[0] != "alias"]
    assert changed
    for k in changed:
        torch.testing.assert_close(merged[k], checkpoint.diff_value(base, final, k).float(), atol=1e-6, rtol=0)
    # single mode: tau_t = theta_t - theta_0, one vector per task, each from the base
    single = [checkpoint.load_state_diff(out / "checkpoints" / "single" / "seed0" / f"taskvec{t}.pt") for t in (1, 2, 3)]
    taus = merging.vectors_from_diffs(base, single, cumulative=False)
    k = changed[0]
    torch.testing.assert_close(taus[1][k], checkpoint.diff_value(base, single[1], k).float() - base[k].float())


def test_report_shows_references_and_intransigence(refs_run):
    from clbench.report.build import build_report

    _, out = refs_run
    rep = build_report([out], out / "report")
    page = (rep / "report.md").read_text()
    assert "### Reference runs" in page and "Intransigence" in page
    summary = (rep / "tables" / "summary__tiny__tiny3.md").read_text()
    assert "| full_ft |" in summary and "| mtl |" not in summary and "| single |" not in summary
    refs = (rep / "tables" / "references__tiny__tiny3.md").read_text()
    assert "mtl (multitask)" in refs and "single (single-task)" in refs and "intransigence vs mtl" in refs


def test_an_interrupted_merge_is_redone_without_training_again(refs_run, run_cli):
    d, out = refs_run
    res = json.loads((out / "results.json").read_text())
    res["methods"]["full_ft"]["seeds"]["0"]["complete"] = False
    (out / "results.json").write_text(json.dumps(res))
    before = rows_of(out, "full_ft", "merged:sum"), rows_of(out, "full_ft", "merged:dare")
    rows = [r for r in read(out / "matrix.csv") if not (r["method"] == "full_ft" and r["stage"].startswith("merged:"))]
    with open(out / "matrix.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    code, _, err = run_cli("run", d / "refs.yaml", "--output-dir", out)
    assert code == 0, err
    assert "resumed after stage 3" in err and "stage 1/3" not in err
    assert err.count("already complete") == 2  # mtl and single
    # DARE's drops come from the run's seed: the merge redone scores the same
    assert (rows_of(out, "full_ft", "merged:sum"), rows_of(out, "full_ft", "merged:dare")) == before


@pytest.mark.parametrize("method, msg", [
    ({"name": "full_ft", "mode": "multitask", "merge": [{"how": "ties"}]}, "merge needs per-stage task vectors"),
    ({"name": "full_ft", "merge": [{"how": "lota_additive", "lam": 0.5}]}, "lota_additive has no lam"),
    ({"name": "lota", "merge": [{"how": "lota_additive"}]}, "lota_additive needs mode: single"),
    ({"name": "full_ft", "merge": [{"how": "ties"}, {"how": "ties", "density": 0.1}]}, "share the row name"),
    ({"name": "full_ft", "mode": "joint"}, "mode"),
    ({"name": "full_ft", "merge": [{"how": "average"}]}, "merge.0.how"),
    ({"name": "full_ft", "merge": [{"how": "dare_linear", "scope": "global"}]}, "scope: global is for ties only"),
    ({"name": "full_ft", "merge": [{"how": "task_arithmetic", "density": 0.5}]}, "task_arithmetic has no density"),
    ({"name": "full_ft", "merge": [{"how": "dare_ties", "density": 0}]}, "merge.0.density"),
])
def test_bad_reference_and_merge_config_is_named(tmp_path, run_cli, method, msg):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(methods=[method])))
    code, _, err = run_cli("run", tmp_path / "c.yaml", "--output-dir", tmp_path / "run")
    assert code == 2 and msg in err
    assert not (tmp_path / "run" / "matrix.csv").exists()


# --- O-LoRA's single-task reference: no penalty against adapters never trained ----------------


def test_olora_single_mode_has_no_penalty_against_untrained_adapters():
    """Mode single trains every stage as a fresh run from the base model: stage 2's adapter alone
    is active and has no orthogonality penalty (the other adapters were never trained: random A,
    B = 0), so the reference is plain LoRA on the task. In the stream, stage 2's penalty is
    lambda1 * sum |A_1 A_2^T| over the adapted layers."""
    from clbench.method import RunContext, call_hook, load_method_file, make_method
    from clbench.run import models
    from clbench.config import TrainConfig
    from clbench.training.stage import run_stage, start_stage
    from clbench.training.train import tokenize

    load_method_file(REPO / "methods" / "olora.py")
    tok = models.build_tiny_tokenizer()
    ex = tokenize([("Copy: abc\nAnswer:", " abc"), ("Copy: 4421\nAnswer:", " 4421")], tok, 64)
    cfg = TrainConfig(lr=1e-2, steps=2, batch_size=2, max_length=64)
    cpu = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        meth = make_method("olora", {"lambda1": 0.5})
        run = RunContext(method="olora", seed=0, tasks=["a", "b"], device=cpu, tokenizer=tok)
        return meth, call_hook(meth, "setup", models.build_tiny_model(0, len(tok)), run), run

    def penalty_at_stage_2(meth, model, run):
        model, stage = start_stage(model, meth, ex, cfg, run, 2, "b", cpu_rt(tok))
        active = model.base_model.active_adapters
        return active, call_hook(meth, "extra_loss", model, {}, stage, None), model

    meth, model, run = fresh()  # mode single: stage 2 is a fresh run
    active, pen, _ = penalty_at_stage_2(meth, model, run)
    assert list(active) == ["stage2"] and pen is None

    meth, model, run = fresh()  # the stream: stage 1 trained first
    model, _, _ = run_stage(model, meth, ex, cfg, run, 1, "a", cpu_rt(tok))
    active, pen, model = penalty_at_stage_2(meth, model, run)
    assert list(active) == ["stage1", "stage2"]
    want = sum((m.lora_A["stage1"].weight @ m.lora_A["stage2"].weight.T).abs().sum()
               for m in model.modules() if hasattr(m, "lora_A") and "stage1" in getattr(m, "lora_A", {}))
    torch.testing.assert_close(pen, 0.5 * want)
