"""clbench sweep (local, Ray and submitit launchers; skip and resume) and the trackers.

Every run of a sweep is a real `python -m clbench run` subprocess of a tiny config (2 steps per
stage, 4 test examples), so each costs a few seconds of start-up: the file runs 9 of them."""

import json
import os
import shutil

import pytest
import yaml

from conftest import REPO, TINY_CONFIG

from clbench.results.rundir import RunDir

# Every run of these sweeps: the tiny model, 2 steps a stage, 4 test examples, one thread.
FAST = {"train.steps": 2, "eval.limit": 4, "eval.log_samples": False, "threads": 1}


def write_sweep(tmp_path, name="s", **fields):
    doc = {"name": name, "base": str(TINY_CONFIG), "set": dict(FAST), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_dirs(sweep_dir):
    return sorted(p.parent.name for p in sweep_dir.glob("*/results.json"))


def complete(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    return all(s["complete"] for m in res["methods"].values() for s in m["seeds"].values())


# --- validation and expansion (no run starts) ------------------------------------------------------


@pytest.mark.parametrize("fields, expect", [
    ({"grid": {"seeds": [0]}, "lancher": "local"}, "unknown key 'lancher'"),
    ({"grid": {"train.lrr": [1e-3]}}, "'lrr' is not a key of 'train'"),
    ({"grid": {"train.lr.x": [1e-3]}}, "'train.lr' is a value"),
    ({"grid": {"seed": [0, 1]}}, "did you mean 'seeds'"),
    ({"grid": {"seeds": []}}, "grid axis 'seeds' has no values"),
    ({"grid": {"seeds": [0, 0]}}, "lists 0 twice"),
    ({"grid": {"train.lr": [-1.0]}}, "run lr=-1"),
    ({"grid": {"methods.nope.options.r": [4]}}, "names a method no run holds"),
    ({"grid": {"methods": ["no_such_method"]}}, "no_such_method"),
    ({"grid": {"seeds": [0]}, "launcher": "kubernetes"}, "launcher"),
    ({"grid": {"seeds": [0]}, "parallel": 0}, "parallel"),
    ({"grid": {"orders": ["9"]}}, "order"),
])
def test_bad_sweep_is_one_error_before_anything_runs(tmp_path, run_cli, fields, expect):
    path = write_sweep(tmp_path, **fields)
    out = tmp_path / "out"
    code, _, err = run_cli("sweep", path, "--output-dir", out)
    assert code == 2
    assert err.startswith("clbench: error:") and expect in err, err
    assert "Traceback" not in err
    assert not any(out.glob("*/results.json")) and not (out / "logs").exists()


def test_malformed_yaml_names_the_line(tmp_path, run_cli):
    path = tmp_path / "bad.yaml"
    path.write_text("base: x.yaml\ngrid: {seeds: [0, 1}\n")
    code, _, err = run_cli("sweep", path)
    assert code == 2 and f"{path}:2" in err and "malformed YAML" in err


def test_expansion_ids_labels_and_stable_configs(tmp_path, run_cli):
    path = write_sweep(tmp_path, grid={"methods": ["full_ft", "lora"], "methods.lora.options.r": [2, 4],
                                       "seeds": [0, 1]})
    out = tmp_path / "out"
    code, text, _ = run_cli("sweep", path, "--output-dir", out, "--dry-run")
    assert code == 0
    ids = ["full_ft__seed=0", "full_ft__seed=1", "lora__r=2__seed=0", "lora__r=2__seed=1", "lora__r=4__seed=0", "lora__r=4__seed=1"]
    assert sorted(p.stem for p in (out / "configs").glob("*.yaml")) == ids
    for i in ids:
        assert f"{i} " in text
    cfg = yaml.safe_load((out / "configs" / "lora__r=4__seed=1.yaml").read_text())
    assert cfg["seeds"] == [1] and len(cfg["methods"]) == 1
    m = cfg["methods"][0]
    assert m["name"] == "lora" and m["options"]["r"] == 4 and m["options"]["alpha"] == 8  # base options kept
    assert m["label"] == "lora@r=4"  # the report keeps r=2 and r=4 apart, pools seeds
    assert yaml.safe_load((out / "configs" / "full_ft__seed=0.yaml").read_text())["methods"] == [{"name": "full_ft"}]
    # task_dirs point back at the base config's folder, from where the expanded configs live
    assert (out / "configs" / cfg["task_dirs"][0]).resolve() == (REPO / "configs" / "tiny_tasks").resolve()
    before = {p.name: p.read_text() for p in (out / "configs").glob("*.yaml")}
    assert run_cli("sweep", path, "--output-dir", out, "--dry-run")[0] == 0
    assert {p.name: p.read_text() for p in (out / "configs").glob("*.yaml")} == before
    assert not run_dirs(out)


def test_shipped_example_sweep_expands(tmp_path, run_cli):
    code, text, _ = run_cli("sweep", REPO / "configs" / "sweeps" / "tiny-grid.yaml", "--output-dir", tmp_path, "--dry-run")
    assert code == 0 and "6 run(s)" in text


# --- the local launcher: 2 methods x 2 seeds, 2 at a time ------------------------------------------


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    from clbench.cli import main

    tmp = tmp_path_factory.mktemp("local-sweep")
    # keep_checkpoints: all, so that a run can be made to lose its last stage and resume (below)
    path = write_sweep(tmp, name="local", grid={"methods": ["full_ft", "lora"], "seeds": [0, 1]}, parallel=2,
                       set={**FAST, "keep_checkpoints": "all"})
    out = tmp / "out"
    assert main(["sweep", str(path), "--output-dir", str(out)]) == 0
    return path, out


def test_local_sweep_runs_every_grid_point(local_sweep):
    _, out = local_sweep
    assert run_dirs(out) == ["full_ft__seed=0", "full_ft__seed=1", "lora__seed=0", "lora__seed=1"]
    for d in run_dirs(out):
        assert complete(out / d)
        cfg = yaml.safe_load((out / d / "config.yaml").read_text())
        assert len(cfg["methods"]) == 1 and len(cfg["seeds"]) == 1
    index = json.loads((out / "sweep.json").read_text())
    assert {r["status"] for r in index["runs"]} == {"complete"} and all(r["rc"] == 0 for r in index["runs"])


def test_local_sweep_report_pools_seeds_per_method(local_sweep, run_cli):
    import pandas as pd

    _, out = local_sweep
    code, text, err = run_cli("report", out)
    assert code == 0, err
    page = (out / "report" / "report.md").read_text()
    assert "4 run(s), 1 model/stream group(s)" in page
    samples = pd.read_csv(next((out / "report" / "tables").glob("samples__*.csv")))
    assert samples.groupby("method").size().to_dict() == {"full_ft": 2, "lora": 2}


def test_rerun_skips_complete_runs(local_sweep, run_cli):
    path, out = local_sweep
    stamps = {d: (out / d / "results.json").stat().st_mtime_ns for d in run_dirs(out)}
    code, text, _ = run_cli("sweep", path, "--output-dir", out)
    assert code == 0
    assert "4 complete, 0 to run" in text and text.count("complete, skipped") == 4 and "nothing to run" in text
    assert {d: (out / d / "results.json").stat().st_mtime_ns for d in run_dirs(out)} == stamps


def test_run_dir_status_partial_and_changed(local_sweep, tmp_path):
    from clbench.experiments import sweep as S

    path, out = local_sweep
    sw = S.load_sweep(path, out)
    run = next(r for r in sw.runs if r.id == "lora__seed=1")
    d = tmp_path / "copy"
    shutil.copytree(out / run.id, d)
    assert RunDir(d).status(run.cfg) == "complete"
    summary = (d / "summary.csv").read_text()
    (d / "summary.csv").unlink()  # results.json is complete, a derived file is gone: `clbench run` rebuilds it
    assert RunDir(d).status(run.cfg) == "partial"
    (d / "summary.csv").write_text(summary)
    res = json.loads((d / "results.json").read_text())
    res["methods"]["lora"]["seeds"]["1"]["complete"] = False
    (d / "results.json").write_text(json.dumps(res))
    assert RunDir(d).status(run.cfg) == "partial"
    # the config the numbers were computed with is results.json's (as `clbench run` reads it)
    res["run"]["config"]["threads"] = 2  # a non-result field: no difference
    (d / "results.json").write_text(json.dumps(res))
    assert RunDir(d).status(run.cfg) == "partial"
    res["run"]["config"]["train"]["lr"] = 0.5
    (d / "results.json").write_text(json.dumps(res))
    assert RunDir(d).status(run.cfg) == "changed"
    (d / "results.json").unlink()  # a started run that has no result yet
    assert RunDir(d).status(run.cfg) == "partial"
    assert RunDir(tmp_path / "nothing").status(run.cfg) == "new"


# --- submitit (resuming a run) and Ray --------------------------------------------------------------


def test_submitit_local_executor_resumes_an_unfinished_run(local_sweep, run_cli):
    """One run loses its last stage (as if killed during stage 2's successor); the re-run launches
    only that run, here as a job of submitit's local executor, and the run resumes from its checkpoint."""
    pytest.importorskip("submitit")
    path, out = local_sweep
    d = out / "full_ft__seed=1"
    res = json.loads((d / "results.json").read_text())
    s = res["methods"]["full_ft"]["seeds"]["1"]
    s["complete"], s["stages"] = False, s["stages"][:2]
    (d / "results.json").write_text(json.dumps(res))
    assert (d / "checkpoints" / "full_ft" / "seed1" / "stage2.pt").is_file()  # keep_checkpoints: all
    doc = yaml.safe_load(path.read_text())
    doc["slurm"] = {"cluster": "local", "timeout_min": 10, "cpus_per_task": 1}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, text, err = run_cli("sweep", path, "--output-dir", out, "--launcher", "slurm")
    assert code == 0, err + text
    assert "3 complete, 1 to run" in text and "via submitit (local)" in text
    assert complete(d) and any((out / "submitit").iterdir())
    assert "resumed after stage 2" in (out / "logs" / "full_ft__seed=1.log").read_text()
    assert len(json.loads((d / "results.json").read_text())["methods"]["full_ft"]["seeds"]["1"]["stages"]) == 3


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_lr_by_seed(ray_cluster, tmp_path, run_cli):
    import pandas as pd

    path = write_sweep(tmp_path, name="ray", grid={"train.lr": [1e-3, 3e-3], "seeds": [0, 1]}, launcher="ray")
    doc = yaml.safe_load(path.read_text())
    doc["set"]["methods"] = [{"name": "full_ft"}]
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    code, text, err = run_cli("sweep", path, "--output-dir", out)
    assert code == 0, err + text
    assert run_dirs(out) == ["lr=0.001__seed=0", "lr=0.001__seed=1", "lr=0.003__seed=0", "lr=0.003__seed=1"]
    assert all(complete(out / d) for d in run_dirs(out))
    assert yaml.safe_load((out / "lr=0.003__seed=1" / "config.yaml").read_text())["train"]["lr"] == 0.003
    code, _, err = run_cli("report", out)
    assert code == 0, err
    samples = pd.read_csv(next((out / "report" / "tables").glob("samples__*.csv")))
    assert samples.groupby("method").size().to_dict() == {"full_ft@lr=0.001": 2, "full_ft@lr=0.003": 2}
    assert "full_ft@lr=0.003" in (out / "report" / "report.md").read_text()
    code, text, _ = run_cli("sweep", path, "--output-dir", out)
    assert code == 0 and "4 complete, 0 to run" in text


def test_failed_run_is_named_with_its_log(tmp_path, run_cli):
    """A run that fails (here: its run directory is locked by a live process) fails the sweep,
    naming the run and its log, and the other runs still complete."""
    from clbench.results.rundir import RunLock

    path = write_sweep(tmp_path, name="fail", grid={"seeds": [0, 1]})
    doc = yaml.safe_load(path.read_text())
    doc["set"]["methods"] = [{"name": "full_ft"}]
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    with RunLock(out / "seed=0"):  # this process holds seed=0's directory while the sweep runs
        code, text, err = run_cli("sweep", path, "--output-dir", out)
    assert code == 2
    assert "seed=0" in err and f"in use by process {os.getpid()}" in err and "logs/seed=0.log" in err
    assert run_dirs(out) == ["seed=1"] and complete(out / "seed=1")


# --- trackers ----------------------------------------------------------------------------------------


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_tensorboard_tracker_writes_losses_lr_and_scores(tmp_path):
    from clbench.config import load_config
    from clbench.run.trackers import open_trackers

    cfg, _ = load_config(TINY_CONFIG, ["trackers=[tensorboard]"])
    with open_trackers(cfg, tmp_path) as tr:
        for stage in (1, 2):
            for step in range(3):
                tr.log_step("full_ft", 0, stage, step, loss=5.0 - stage - step / 10, lr=1e-3 * (step + 1))
            tr.log_stage("full_ft", 0, stage, {"tiny_parity": 0.5 * stage, "tiny_copy": 0.25})
        tr.log_stage("full_ft", 0, "merged:ties", {"tiny_parity": 0.75})  # a labelled extra row
    d = tmp_path / "tensorboard" / "full_ft" / "seed0"
    losses = _scalars(d, "train/loss")
    assert [s for s, _ in losses] == list(range(6))  # steps counted across stages
    assert [v for _, v in losses] == pytest.approx([4.0, 3.9, 3.8, 3.0, 2.9, 2.8])
    assert [v for _, v in _scalars(d, "train/lr")] == pytest.approx([1e-3, 2e-3, 3e-3] * 2)
    assert _scalars(d, "eval/tiny_parity") == [(1, 0.5), (2, 1.0)]
    assert _scalars(d, "eval/mean") == [(1, pytest.approx(0.375)), (2, pytest.approx(0.625))]
    assert _scalars(d, "eval_merged-ties/tiny_parity") == [(0, 0.75)]


def test_trackers_are_a_non_result_field():
    from clbench.config import NON_RESULT_FIELDS, load_config

    a, _ = load_config(TINY_CONFIG)
    b, _ = load_config(TINY_CONFIG, ["trackers=[tensorboard]"])
    assert "trackers" in NON_RESULT_FIELDS and a.hash() == b.hash() and a.trackers == []


def test_missing_wandb_is_a_clear_config_error(tmp_path, run_cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "wandb" else real(name, *a, **k))
    code, _, err = run_cli("run", TINY_CONFIG, "--set", "trackers=[wandb]", "--output-dir", tmp_path / "r")
    assert code == 2
    assert "trackers" in err and "wandb" in err and "pip install 'clbench[wandb]'" in err
    code, _, err = run_cli("run", TINY_CONFIG, "--set", "trackers=[mlflow]", "--output-dir", tmp_path / "r")
    assert code == 2 and "trackers.0" in err and "tensorboard" in err


def test_run_logs_to_tensorboard(tmp_path, run_cli, one_thread):
    """End to end: `trackers: [tensorboard]` in a run config -> per-step loss and lr, stage scores.
    Needs the tracker wired into loop.run_method and train.train_stage (see clbench/run/trackers.py)."""
    sets = [f"{k}={v}" for k, v in FAST.items()] + ["methods=[{name: full_ft}]", "trackers=[tensorboard]"]
    out = tmp_path / "run"
    code, _, err = run_cli("run", TINY_CONFIG, *[a for s in sets for a in ("--set", s)], "--output-dir", out)
    assert code == 0, err
    d = out / "tensorboard" / "full_ft" / "seed0"
    res = json.loads((out / "results.json").read_text())
    stages = res["methods"]["full_ft"]["seeds"]["0"]["stages"]
    losses = _scalars(d, "train/loss")
    assert len(losses) == 3 * 2  # 3 stages x 2 steps
    assert losses[0][1] == pytest.approx(stages[0]["first_loss"], rel=1e-5)
    assert losses[-1][1] == pytest.approx(stages[-1]["last_loss"], rel=1e-5)
    assert [v for _, v in _scalars(d, "train/lr")] == pytest.approx([3e-3] * 6)
    # each stage's schedule (constant at the config's lr, FAST's 2 steps) at the stage's number
    assert _scalars(d, "schedule/peak_lr") == [(1, pytest.approx(3e-3)), (2, pytest.approx(3e-3)), (3, pytest.approx(3e-3))]
    assert [v for _, v in _scalars(d, "schedule/steps")] == [2.0, 2.0, 2.0]
    R = res["methods"]["full_ft"]["seeds"]["0"]["matrix"]
    parity = _scalars(d, "eval/tiny_parity")
    assert [s for s, _ in parity][-3:] == [1, 2, 3]
    assert parity[-1][1] == pytest.approx(R[3][0])


def test_fresh_sweep_starts_every_run_over(local_sweep, tmp_path, monkeypatch):
    """--fresh: complete runs are launched too, each as `clbench run --fresh` (launcher stubbed;
    on a copy of the sweep so the module's other tests keep theirs)."""
    import io

    from clbench.experiments import sweep as S

    path, out = local_sweep
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    launched = []

    def fake_local(units, parallel, done):
        for run, (cmd, *_rest) in units:
            launched.append((run.id, cmd))
            done(run, {"rc": 0, "seconds": 0.0})

    from clbench.experiments import launch

    monkeypatch.setattr(launch, "launch_local", fake_local)
    text = io.StringIO()
    S.run_sweep(S.load_sweep(path, copy), out=text)  # without --fresh: everything is complete
    assert launched == [] and "4 complete, 0 to run" in text.getvalue()
    text = io.StringIO()
    S.run_sweep(S.load_sweep(path, copy), out=text, fresh=True)
    assert "0 complete, 4 to run from scratch (--fresh)" in text.getvalue()
    assert sorted(i for i, _ in launched) == run_dirs(copy)
    assert all(cmd[-1] == "--fresh" and cmd[cmd.index("--output-dir") + 1] == str((copy / i).resolve()) for i, cmd in launched)
