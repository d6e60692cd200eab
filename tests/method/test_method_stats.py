"""Per-stage diagnostics a method records (Method.stage_stats): stored per (method, seed, stage)
in results.json as `method_stats`, printed once per stage, and each regulariser or projection
reports its share."""

import json

import pytest
import torch
import yaml

from clbench.method import Method, MethodError, NoOptions, RunContext, StageMeans, call_hook
from clbench.config import TrainConfig
from clbench.run import models
from clbench.training.stage import run_stage
from clbench.training.train import tokenize

from conftest import REPO
from harness import cpu_rt


def _run(tmp_path, methods, tasks=("tiny_parity", "tiny_compare"), steps=3):
    from clbench.cli import main

    cfg = {"name": "stats", "model": "tiny", "tasks": list(tasks), "task_dirs": [str(REPO / "configs" / "tiny_tasks")],
           "methods": methods, "seeds": [0], "threads": 1,
           "train": {"steps": steps, "lr": 3e-3, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 4, "batch_size": 16, "log_samples": False}, "precision": "fp32"}
    path = tmp_path / "stats.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_the_regularisers_share_is_in_results_json_per_stage_and_printed(tmp_path, capsys, one_thread):
    res = _run(tmp_path, [{"name": "ewc", "options": {"ewc_lambda": 1.0e4}}, {"name": "agem"},
                          {"name": "lwf"}, {"name": "olora"}, {"name": "full_ft"}])
    err = capsys.readouterr().err
    stages = {m: res["methods"][m]["seeds"]["0"]["stages"] for m in res["methods"]}
    # stage 1 has nothing to protect: no Fisher, no memory, no teacher, no earlier adapter
    for m in ("ewc", "agem", "lwf", "olora", "full_ft"):
        assert "method_stats" not in stages[m][0], m
    assert "method_stats" not in stages["full_ft"][1]
    two = {m: stages[m][1]["method_stats"] for m in ("ewc", "agem", "lwf", "olora")}
    assert set(two["ewc"]) == {"penalty_ratio", "penalty"} and two["ewc"]["penalty_ratio"] > 0
    assert set(two["agem"]) == {"violated", "projected_fraction"}
    assert 0 <= two["agem"]["violated"] <= 1 and 0 <= two["agem"]["projected_fraction"] <= 1
    assert set(two["lwf"]) == {"kd_ratio"} and two["lwf"]["kd_ratio"] >= 0
    assert set(two["olora"]) == {"penalty_ratio"} and two["olora"]["penalty_ratio"] > 0
    # one console line per stage with the numbers
    assert "[ewc seed 0] stage 2/2 ewc: penalty_ratio=" in err
    assert "stage 1/2 ewc:" not in err


def test_an_old_results_json_without_method_stats_resumes_and_reports(tmp_path, run_cli, one_thread):
    """A results.json written before method_stats existed (stage entries without the field) is
    resumed from and reported."""
    res = _run(tmp_path, [{"name": "ewc", "options": {"ewc_lambda": 1.0e4}}])
    out = tmp_path / "out"
    seed = res["methods"]["ewc"]["seeds"]["0"]
    assert "method_stats" in seed["stages"][1]
    for st in seed["stages"]:
        st.pop("method_stats", None)
    seed["stages"], seed["complete"] = seed["stages"][:1], False  # the old run stopped after stage 1
    (out / "results.json").write_text(json.dumps(res))
    code, _, err = run_cli("run", tmp_path / "stats.yaml", "--output-dir", out)
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())["methods"]["ewc"]["seeds"]["0"]
    assert again["complete"] and "method_stats" in again["stages"][1]
    for st in again["stages"]:  # the old file's stage 1 as it was
        st.pop("method_stats", None)
    (out / "results.json").write_text(json.dumps({**res, "methods": {"ewc": {**res["methods"]["ewc"],
                                                                             "seeds": {"0": again}}}}))
    code, _, err = run_cli("report", out)
    assert code == 0, err


class _Counting(Method):
    def stage_start(self, model, stage):
        self.m = StageMeans()
        return model

    def extra_loss(self, model, batch, stage, out):
        self.m.add("ratio", StageMeans.share(out.loss * 0.5, out.loss))
        self.m.add("step", float(stage.global_step))
        return None

    def stage_stats(self, stage):
        return self.m.means()


def test_stage_means_average_over_the_stages_micro_batches(tok):
    meth = _Counting(NoOptions())
    meth.name = "counting"
    run = RunContext(method="counting", seed=0, tasks=["t1"], device=torch.device("cpu"), tokenizer=tok)
    model = models.build_tiny_model(0, len(tok))
    ex = tokenize([("Number: 2\nEven or odd?\nAnswer:", " even")] * 4, tok, 32)
    _, stats, _ = run_stage(model, meth, ex, TrainConfig(steps=3, batch_size=2, grad_accum=2), run, 1, "t1", cpu_rt(tok))
    assert stats["method_stats"] == pytest.approx({"ratio": 0.5, "step": 1.0})  # steps 0,0,1,1,2,2


def test_stage_stats_must_return_numbers(tok):
    class Bad(Method):
        def stage_stats(self, stage):
            return {"x": "high"}

    meth = Bad(NoOptions())
    meth.name = "bad"
    with pytest.raises(MethodError, match="hook stage_stats returned dict; expected None or a dict of names to numbers"):
        call_hook(meth, "stage_stats", None)


def test_ilora_nlora_osf_report_their_share(tmp_path, one_thread):
    res = _run(tmp_path, [{"name": "ilora"}, {"name": "nlora"}, {"name": "osf"}], steps=2)
    two = {m: res["methods"][m]["seeds"]["0"]["stages"][1]["method_stats"] for m in ("ilora", "nlora", "osf")}
    assert set(two["ilora"]) == {"consistency_ratio"} and two["ilora"]["consistency_ratio"] >= 0
    assert set(two["nlora"]) == {"penalty_ratio"} and two["nlora"]["penalty_ratio"] > 0
    # stage 2 of 2 freezes half of every matrix's directions: the projection removes a real share
    assert set(two["osf"]) == {"projected_fraction"} and 0 < two["osf"]["projected_fraction"] < 1
    one = res["methods"]["nlora"]["seeds"]["0"]["stages"][0]
    assert one["method_stats"]["penalty_ratio"] > 0  # N-LoRA's l1 term acts from stage 1 on


def test_the_report_shows_what_each_mechanism_did(tmp_path, one_thread):
    """The report's table of the per-stage diagnostics holds each method's numbers from results.json,
    stage by stage (– where a stage recorded none)."""
    from clbench.report.build import build_report

    res = _run(tmp_path, [{"name": "ewc", "options": {"ewc_lambda": 1.0e4}}, {"name": "full_ft"}])
    ratio = res["methods"]["ewc"]["seeds"]["0"]["stages"][1]["method_stats"]["penalty_ratio"]
    out = build_report([tmp_path / "out"], tmp_path / "rep")
    page = (out / "report.md").read_text()
    assert "### What each method's mechanism did" in page
    row = next(line for line in page.splitlines() if line.startswith("| ewc | penalty_ratio |"))
    assert row.split("|")[3].strip() == "–" and row.split("|")[4].strip() == f"{ratio:.3g}"
    assert "| full_ft |" not in page.split("### What each method's mechanism did", 1)[1].split("###", 1)[0]
