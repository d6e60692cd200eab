"""Reliability: resume after SIGKILL with the identical result, locks, atomic writes, NaN
handling, determinism, and a clear early error for every kind of bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from conftest import REPO, TINY_CONFIG
from harness import cpu_rt

TINY_TASKS = REPO / "configs" / "tiny_tasks"
EVERY_STAGE = ("--set", "checkpoint_interval=0")  # tiny stages take ~1 s: by default none would get a checkpoint


def clbench(*args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "clbench", *map(str, args)], capture_output=True, text=True, env=e, **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = clbench("run", TINY_CONFIG, "--output-dir", out, *EVERY_STAGE)
    assert r.returncode == 0, r.stderr
    return out


def test_same_seed_same_matrix(reference_run, tmp_path):
    r = clbench("run", TINY_CONFIG, "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()


def test_different_seed_changes_data_order():
    import torch

    from clbench.training.stage import stage_seed
    from clbench.training.train import Example, batch_stream

    ex = [Example([i, i + 1], 1) for i in range(32)]

    def first_batches(seed):
        g = torch.Generator().manual_seed(stage_seed(seed, 1))
        it = batch_stream(ex, 4, g)
        return [tuple(e.input_ids[0] for e in next(it)) for _ in range(3)]

    assert first_batches(0) == first_batches(0)
    assert first_batches(0) != first_batches(1)


def test_resume_after_sigkill_gives_identical_matrix(reference_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "clbench", "run", str(TINY_CONFIG), "--output-dir", str(out), *EVERY_STAGE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "checkpoints" / "full_ft" / "seed0" / "stage1.pt"

    def stage1_recorded():  # results.json is written last after a stage: then the stage is done
        try:
            res = json.loads((out / "results.json").read_text())
            return first.exists() and len(res["methods"]["full_ft"]["seeds"]["0"]["stages"]) == 1
        except (FileNotFoundError, KeyError):
            return False

    deadline = time.time() + 240
    while not stage1_recorded() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: stage 2 of full_ft has started
    proc.wait()
    assert stage1_recorded(), "the run ended before its first checkpoint"
    rows = (out / "matrix.csv").read_text().splitlines()
    assert len(rows) - 1 < 2 * 4 * 3, "the kill came after the run had finished"
    assert (out / ".lock").exists()  # SIGKILL leaves the lock: the next run must see it is stale
    # a kill during a checkpoint write leaves the writer's temporary file: the resume removes it
    partial = first.parent / f".clbench-tmp-{proc.pid}-k1ll3d_0-stage2.pt"  # temp_file's name, of the killed writer
    partial.write_bytes(b"half a checkpoint")
    r = clbench("run", TINY_CONFIG, "--output-dir", out, *EVERY_STAGE)
    assert r.returncode == 0, r.stderr
    assert "resum" in r.stderr
    assert not partial.exists() and f"removed checkpoints/full_ft/seed0/{partial.name}: the temp file" in r.stderr
    assert (out / "config.yaml").is_file()  # the cleanup touches only temp files
    assert (out / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()
    assert not (out / ".lock").exists()


def test_ctrl_c_then_resume_gives_identical_matrix(reference_run, tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit 130 with one line saying where the results are, the lock
    released, and the same command finishes with the uninterrupted matrix."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "clbench", "run", str(TINY_CONFIG), "--output-dir", str(out), *EVERY_STAGE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # stderr is drained by a thread while we wait: a child writing into a full pipe blocks before
    # it records stage 1, and the interrupt would then come at the wrong time
    import threading

    lines: list[str] = []
    # the stage's summary line is printed after the stage is recorded, so it is what we wait for:
    # waiting on results.json instead let the interrupt land between the write and the print
    stage1_done = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "stage 1/3 tiny_parity: 20 steps" in line:
                stage1_done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 240
    while not stage1_done.is_set() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=60)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "clbench: interrupted; results of completed stages are in the run directory" in err
    assert "Traceback" not in err and not (out / ".lock").exists()
    assert "[full_ft seed 0] stage 1/3 tiny_parity" in err  # the tag is text, not console markup
    rows = (out / "matrix.csv").read_text().splitlines()
    assert len(rows) - 1 < 2 * 4 * 3, "the interrupt came after the run had finished"
    r = clbench("run", TINY_CONFIG, "--output-dir", out, *EVERY_STAGE)
    assert r.returncode == 0, r.stderr
    assert "resum" in r.stderr
    assert (out / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()


def test_checkpoints_are_diffs_and_keep_last(reference_run):
    """keep_checkpoints: last keeps one stage checkpoint while a method runs (the sigkill test
    resumes from it) and none once the method is complete: nothing resumes from them then, so
    the last stage's is not even written."""
    ck = reference_run / "checkpoints"
    assert list((ck / "full_ft" / "seed0").iterdir()) == [] and list((ck / "lora" / "seed0").iterdir()) == []
    res = json.loads((reference_run / "results.json").read_text())
    full = [s["checkpoint_mb"] for s in res["methods"]["full_ft"]["seeds"]["0"]["stages"]]
    lora = [s["checkpoint_mb"] for s in res["methods"]["lora"]["seeds"]["0"]["stages"]]
    assert full[-1] is None and lora[-1] is None
    assert 0 < lora[0] < full[0] / 3  # LoRA's checkpoint holds its adapter, not a model copy


def test_diff_roundtrip_is_exact():
    import torch

    from clbench import checkpoint
    from clbench.run import models

    tok = models.build_tiny_tokenizer()
    m = models.build_tiny_model(0, len(tok))
    ref = checkpoint.snapshot(m)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, :3] += 1.0  # sparse change
        m.model.layers[1].self_attn.q_proj.weight.mul_(1.5)  # dense change
    diff = checkpoint.model_diff(m, ref)
    assert diff["model.layers.0.mlp.up_proj.weight"][0] == "sparse"
    assert diff["model.layers.1.self_attn.q_proj.weight"][0] == "dense"
    assert "model.layers.0.self_attn.k_proj.weight" not in diff
    m2 = models.build_tiny_model(0, len(tok))
    checkpoint.apply_diff(m2, ref, diff)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_different_config_is_refused_and_fresh_starts_over(reference_run, tmp_path):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(reference_run, out)
    r = clbench("run", TINY_CONFIG, "--output-dir", out, "--set", "train.lr=0.5")
    assert r.returncode == 2
    assert "different config" in r.stderr and "train.lr: 0.003 -> 0.5" in r.stderr and "Traceback" not in r.stderr
    r = clbench("run", TINY_CONFIG, "--output-dir", out, "--set", "train.lr=0.5", "--set", "train.steps=2", "--fresh")
    assert r.returncode == 0, r.stderr
    assert "resum" not in r.stderr and "already complete" not in r.stderr  # nothing was taken from the old results
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["config"]["train"]["lr"] == 0.5 and res["run"]["config_changes"] == []
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.5
    assert all(s["steps"] == 2 for m in res["methods"].values() for s in m["seeds"]["0"]["stages"])
    assert (out / "matrix.csv").read_text() != (reference_run / "matrix.csv").read_text()


def test_config_change_on_complete_results_is_refused_and_changes_nothing(reference_run, tmp_path, run_cli):
    """--allow-config-change continues unfinished methods only: a complete method is never run
    again, so a change bearing on it would leave numbers that disagree with the config."""
    import shutil

    out = tmp_path / "r"
    shutil.copytree(reference_run, out)
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "results.json", "matrix.csv", "summary.csv")}
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, "--set", "methods.1.options.r=8", "--allow-config-change")
    assert code == 2 and err.startswith("clbench: error: ") and "Traceback" not in err
    assert "lora seed 0 (complete" in err and "full_ft" not in err.split("differences:")[0], err
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, "--set", "eval.limit=10", "--allow-config-change")
    assert code == 2 and "full_ft seed 0 (complete" in err and "lora seed 0 (complete" in err and "eval.limit: 20 -> 10" in err
    assert {f: (out / f).read_bytes() for f in before} == before
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out)  # the original config is still this directory's
    assert code == 0, err
    assert "already complete" in err and (out / "matrix.csv").read_bytes() == before["matrix.csv"]


def test_run_that_failed_before_any_result_does_not_bind_the_directory(tmp_path, run_cli):
    """A run that stops before its first result (here the model's weights do not load) leaves no
    config that refuses the corrected re-run."""
    model = tmp_path / "model"
    model.mkdir()
    tok = __import__("clbench.run.models", fromlist=["x"]).build_tiny_tokenizer()
    tok.save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64,
                                                   "intermediate_size": 128, "num_hidden_layers": 1,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2}))
    (model / "model.safetensors").write_bytes(b"not safetensors")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD.replace("model: tiny", f"model: {model}").replace("stream: tiny3", "tasks: [tiny_parity]"))
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 2 and "Traceback" not in err and f"model folder {model}: its model does not load" in err, err
    assert not (out / "results.json").exists()
    cfg.write_text(GOOD.replace("stream: tiny3", "tasks: [tiny_parity]"))
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 0, err
    assert "different config" not in err and (out / "results.json").is_file()


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    from clbench.results import contract as results

    f = tmp_path / "matrix.csv"
    results.atomic_write_text(f, "old\n")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(results.WriteError, match=f"writing {f} failed: disk full"):
        results.atomic_write_text(f, "new\n")
    assert f.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["matrix.csv"]


NAN_METHOD = '''
import torch
from pydantic import BaseModel
from clbench.method import Method, register

class Opts(BaseModel):
    nan_at_stage: int = 2

@register("nan_after")
class NanAfter(Method):
    Options = Opts
    def __init__(self, o):
        self.o = o
    def setup(self, model, run):
        return model
    def extra_loss(self, model, batch, stage, out):
        return torch.tensor(float("nan")) if stage.stage == self.o.nan_at_stage else None
'''


def _nan_config(tmp_path, name="nan_after", steps=3, limit=8):
    """A tiny3 run of NAN_METHOD registered as `name` (its loss turns NaN at stage 2)."""
    (tmp_path / f"{name}.py").write_text(NAN_METHOD.replace('@register("nan_after")', f'@register("{name}")'))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: tiny
        stream: tiny3
        task_dirs: [{TINY_TASKS}]
        method_files: [{name}.py]
        methods: [{{name: {name}}}]
        train: {{steps: {steps}, max_length: 64}}
        eval: {{limit: {limit}}}
        precision: fp32
        checkpoint_interval: 0
    """))
    return cfg


def test_nan_loss_stops_with_clear_error_and_resumes_after_change(tmp_path):
    cfg = _nan_config(tmp_path)
    out = tmp_path / "out"
    r = clbench("run", cfg, "--output-dir", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "non-finite loss" in r.stderr and "stage 2 (tiny_compare), step 1" in r.stderr and "'nan_after'" in r.stderr
    stages = {line.split(",")[2] for line in (out / "matrix.csv").read_text().splitlines()[1:]}
    assert stages == {"0", "1"}  # what was computed stays on disk
    r = clbench("run", cfg, "--output-dir", out, "--set", "methods.0.options.nan_at_stage=99")
    assert r.returncode == 2 and "--allow-config-change" in r.stderr
    r = clbench("run", cfg, "--output-dir", out, "--set", "methods.0.options.nan_at_stage=99", "--allow-config-change")
    assert r.returncode == 0, r.stderr
    assert "resumed after stage 1" in r.stderr
    stages = [line.split(",")[2] for line in (out / "matrix.csv").read_text().splitlines()[1:]]
    assert sorted(set(stages)) == ["0", "1", "2", "3"] and len(stages) == 12
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["config_changes"] == [["methods: [{'name': 'nan_after', 'label': None, 'options': {}, 'train': "
                                             "None, 'mode': 'sequential', 'merge': []}] -> [{'name': 'nan_after', "
                                             "'label': None, 'options': {'nan_at_stage': 99}, 'train': None, 'mode': "
                                             "'sequential', 'merge': []}]"]]
    assert res["run"]["config"]["methods"][0]["options"] == {"nan_at_stage": 99}


def test_a_start_writes_config_yaml_once(tmp_path, run_cli, monkeypatch):
    """The run directory has one writer (clbench.results.rundir.RunDir): a start that records a config change
    writes config.yaml once (it was written twice: with the change record, then again by the loop).
    In this process, so the method gets a name of its own: the registry is the process's, and
    other tests register `nan_after` from other files."""
    from clbench.results import contract as results

    cfg = _nan_config(tmp_path, "nan_after_once", steps=2, limit=4)
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 2 and "non-finite loss" in err
    writes = []
    real = results.atomic_write_text
    monkeypatch.setattr(results, "atomic_write_text", lambda path, text: writes.append(path.name) or real(path, text))
    code, _, err = run_cli("run", cfg, "--output-dir", out, "--set", "methods.0.options.nan_at_stage=99",
                           "--allow-config-change")
    assert code == 0, err
    assert "config changed" in err and writes.count("config.yaml") == 1, writes
    assert yaml.safe_load((out / "config.yaml").read_text())["methods"][0]["options"] == {"nan_at_stage": 99}


# --- bad input: each case fails early, one readable message, no traceback ------------

GOOD = f"""
model: tiny
stream: tiny3
task_dirs: [{TINY_TASKS}]
methods: [{{name: full_ft}}]
train: {{steps: 2}}
eval: {{limit: 4}}
precision: fp32
"""


def _bad_task_dir(tmp_path, yaml_text, train_lines=None):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "t.yaml").write_text(yaml_text)
    (d / "t.train.jsonl").write_text("\n".join(train_lines or ['{"x": "a", "label": 0}']) + "\n")
    (d / "t.test.jsonl").write_text('{"x": "b", "label": 1}\n')
    return d


TASK_YAML = """task: t
output_type: multiple_choice
doc_to_text: "{{x}}"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list: [{metric: acc}]
clbench: {data: {train: t.train.jsonl, test: t.test.jsonl}}
"""


def _model_dir(tmp_path, name, config_json):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config_json)
    return d


def _case(tmp_path, name):
    """(config text, extra args, expected message parts) for one bad-input case."""
    cases = {
        "unknown_method": (GOOD.replace("full_ft", "fulll_ft"), [], ["unknown method 'fulll_ft'", "available:", "full_ft", "lora"]),
        "unknown_task": (GOOD.replace("stream: tiny3", "tasks: [tiny_parity, nope]"), [], ["unknown task(s) 'nope'", "tiny_copy"]),
        "unknown_stream": (GOOD.replace("tiny3", "tiny9"), [], ["unknown stream 'tiny9'", "available:", "tiny3"]),
        "malformed_yaml": (GOOD + "train: [oops\n", [], ["c.yaml:", "malformed YAML"]),
        "unknown_key": (GOOD + "evall: {}\n", [], ["unknown key 'evall'", "allowed keys:"]),
        "wrong_type": (GOOD, ["--set", "train.batch_size=big"], ["train.batch_size", "integer"]),
        "lr_not_positive": (GOOD, ["--set", "train.lr=0"], ["train.lr", "greater than 0"]),
        "empty_stream": (GOOD.replace("stream: tiny3", "tasks: []"), [], ["`tasks` is empty"]),
        "duplicate_task": (GOOD.replace("stream: tiny3", "tasks: [tiny_copy, tiny_copy]"), [], ["duplicate task(s) in the stream: tiny_copy"]),
        "bad_method_option": (GOOD.replace("{name: full_ft}", "{name: lora, options: {r: 0}}"), [], ["lora options", "r", "greater than 0"]),
        "missing_model": (GOOD.replace("model: tiny", f"model: {tmp_path}/no-such-model"), [], ["no-such-model", "does not exist"]),
        "unknown_alias": (GOOD.replace("model: tiny", "model: smollm3-9b"), [], ["smollm3-9b", "not an alias"]),
        "model_config_not_json": (GOOD.replace("model: tiny", f"model: {_model_dir(tmp_path, 'm1', '{not json')}"), [],
                                  [f"{tmp_path}/m1/config.json is not valid JSON"]),
        "model_type_unknown": (GOOD.replace("model: tiny", "model: " + str(_model_dir(tmp_path, "m2", json.dumps({"model_type": "lama"})))),
                               [], [f"{tmp_path}/m2/config.json is not a usable transformers config", "`lama`"]),
        "model_without_tokenizer": (GOOD.replace("model: tiny", "model: " + str(_model_dir(tmp_path, "m3", json.dumps({"model_type": "llama"})))),
                                    [], [f"model folder {tmp_path}/m3: its tokenizer does not load"]),
        "set_below_scalar": (GOOD, ["--set", "train.steps.x.y=1"], ["--set train.steps.x.y: train.steps is 2, not a mapping"]),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["unknown_method", "unknown_task", "unknown_stream", "malformed_yaml", "unknown_key",
                                  "wrong_type", "lr_not_positive", "empty_stream", "duplicate_task", "bad_method_option",
                                  "missing_model", "unknown_alias", "model_config_not_json", "model_type_unknown",
                                  "model_without_tokenizer", "set_below_scalar"])
def test_bad_config_input(tmp_path, run_cli, name):
    text, extra, needles = _case(tmp_path, name)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, out, err = run_cli("run", cfg, "--output-dir", tmp_path / "out", *extra)
    assert code == 2
    assert err.startswith("clbench: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "out").exists()  # failed before anything was written


def _run_with_tasks(tmp_path, run_cli, task_yaml, train_lines=None):
    d = _bad_task_dir(tmp_path, task_yaml, train_lines)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD.replace(f"task_dirs: [{TINY_TASKS}]", f"task_dirs: [{d}]").replace("stream: tiny3", "tasks: [t]"))
    return run_cli("run", cfg, "--output-dir", tmp_path / "out")


def test_malformed_jsonl_names_file_and_line(tmp_path, run_cli):
    code, _, err = _run_with_tasks(tmp_path, run_cli, TASK_YAML, ['{"x": "a", "label": 0}', '{"x": "b", label: 1}'])
    assert code == 2 and "t.train.jsonl:2: malformed JSON line" in err


def test_missing_data_file(tmp_path, run_cli):
    code, _, err = _run_with_tasks(tmp_path, run_cli, TASK_YAML.replace("t.test.jsonl", "gone.jsonl"))
    assert code == 2 and "test data file not found" in err and "gone.jsonl" in err


def test_task_yaml_missing_field(tmp_path, run_cli):
    code, _, err = _run_with_tasks(tmp_path, run_cli, TASK_YAML.replace("doc_to_target: label\n", ""))
    assert code == 2 and "t.yaml: task YAML is missing required field(s): doc_to_target" in err


def test_user_method_file_errors(tmp_path, run_cli):
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    (tmp_path / "noproto.py").write_text("from clbench.method import register\n@register('noproto')\nclass X:\n    pass\n")
    for f, needle in (("broken.py", "failed to import: ModuleNotFoundError"), ("noproto.py", "must subclass clbench.method.Method")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(GOOD + f"method_files: [{f}]\n")
        code, _, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
        assert code == 2 and f in err and needle in err and "Traceback" not in err


def test_debug_flag_shows_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD.replace("full_ft", "nope"))
    r = clbench("--debug", "run", cfg)
    assert r.returncode != 0 and "Traceback" in r.stderr and "unknown method 'nope'" in r.stderr


def test_tied_weights_are_stored_once():
    import torch

    from clbench import checkpoint
    from clbench.run import models

    tok = models.build_tiny_tokenizer()
    m = models.build_tiny_model(0, len(tok))
    ref = checkpoint.snapshot(m)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(2.0)
    diff = checkpoint.model_diff(m, ref)
    assert diff["model.embed_tokens.weight"][0] == "dense" and diff["lm_head.weight"] == ("alias", "model.embed_tokens.weight")
    m2 = models.build_tiny_model(0, len(tok))
    checkpoint.apply_diff(m2, ref, diff)
    assert torch.equal(m2.lm_head.weight, m.lm_head.weight) and m2.lm_head.weight is m2.model.embed_tokens.weight


# --- checkpoints written in the background while the stage is evaluated ------------------


def test_evaluation_leaves_the_rng_states_as_it_found_them():
    """lm-eval seeds torch, numpy and random for its own draws; the loop's evaluation (a real
    lm-eval run on the tiny model) must not move training's random stream (the stage checkpoint
    takes the RNG states before it)."""
    import random

    import numpy as np
    import torch

    from clbench.run import models
    from clbench.data import tasks as taskcat
    from clbench.config import load_config
    from clbench.run.evaluate import evaluate
    from clbench.run.loop import Session
    from clbench.run.planning import plan

    cfg, cdir = load_config(TINY_CONFIG, ["eval.limit=4", "eval.log_samples=false"])
    pl = plan(cfg, cdir)
    model, tok, _ = models.resolve("tiny", pl.cache)
    lm_tasks = taskcat.build_lm_eval_tasks([pl.task_defs[n] for n in pl.eval_names], pl.cache)
    s = Session(pl=pl, out=None, rec=None, console=None, progress=None, tracker=None, device=torch.device("cpu"),
                autocast=None, base_model=model, tok=tok, lm_tasks=lm_tasks, pairs={}, base_scores={}, base_eval_s=0.0,
                tok_cache={})

    def draws():
        return torch.rand(2), random.random(), np.random.rand()

    def seeded():
        torch.manual_seed(7), random.seed(7), np.random.seed(7)

    seeded()
    expected = draws()
    primary = {n: pl.task_defs[n].primary_metric for n in pl.eval_names}
    seeded()
    evaluate(model, tok, lm_tasks, primary, cpu_rt(tok), batch_size=4, limit=4,
             log_samples=False)
    moved = draws()  # lm-eval's own call does move them: what the loop must undo
    assert not torch.equal(moved[0], expected[0]) and moved[1:] != expected[1:]
    seeded()
    scores, _, _ = s.evaluate(model, seed=0)
    got = draws()
    assert set(scores) == set(pl.eval_names)
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_reference_reuses_the_untouched_base_tensors():
    import copy

    import torch

    from clbench import checkpoint
    from clbench.run import models

    tok = models.build_tiny_tokenizer()
    base = models.build_tiny_model(0, len(tok))
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # e.g. a method's setup changed it
    ref = checkpoint.snapshot(model, share=base.state_dict())
    b = base.state_dict()
    def shared(k):
        return ref[k].data_ptr() == b[k].data_ptr()

    assert not shared("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(ref["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)
    assert shared("model.layers.1.self_attn.q_proj.weight") and shared("model.embed_tokens.weight")
    with torch.no_grad():  # training the model must not move the reference
        model.model.layers[1].self_attn.q_proj.weight.mul_(2.0)
    assert torch.equal(ref["model.layers.1.self_attn.q_proj.weight"], base.model.layers[1].self_attn.q_proj.weight)
    diff = checkpoint.model_diff(model, ref)
    assert set(diff) == {"model.layers.1.self_attn.q_proj.weight"}


def test_background_save_writes_what_a_direct_save_writes(tmp_path):
    import torch

    from clbench import checkpoint
    from clbench.run import models

    tok = models.build_tiny_tokenizer()
    m = models.build_tiny_model(0, len(tok))
    ref = checkpoint.snapshot(m)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, :3] += 1.0
        m.model.layers[1].self_attn.q_proj.weight.mul_(1.5)
    mask = torch.ones(3, dtype=torch.bool)
    pending = checkpoint.save_in_background(tmp_path / "bg.pt", m, ref, {"mask": mask}, {"stage": 2})
    mb = pending.wait()
    ck = checkpoint.load(tmp_path / "bg.pt")
    assert mb == pytest.approx((tmp_path / "bg.pt").stat().st_size / 2**20) and ck["stage"] == 2
    assert torch.equal(ck["method"]["mask"], mask)
    direct = checkpoint.model_diff(m, ref)
    assert ck["diff"].keys() == direct.keys()
    for k, entry in direct.items():
        assert entry[0] == ck["diff"][k][0] and all(torch.equal(a, b) for a, b in zip(entry[1:], ck["diff"][k][1:])), k


def test_checkpoint_interval_skips_cheap_stages_and_resume_redoes_them(reference_run, tmp_path, run_cli):
    """A checkpoint_interval no tiny stage reaches (the default 60 s can be, on a loaded machine):
    the stages are cheaper to redo than to write, so none gets a checkpoint; a run that died
    after stage 2 then redoes stages 1-2, and one whose latest checkpoint is older than its last
    recorded stage resumes from it. Either way the matrix is the uninterrupted run's."""
    out = tmp_path / "out"
    cheap = ("--set", "checkpoint_interval=3600")
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *cheap)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert all(s["checkpoint_mb"] is None for m in res["methods"].values() for s in m["seeds"]["0"]["stages"])
    assert (out / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()

    def cut_after(stage):  # as if the process had died after stage `stage` of full_ft
        res = json.loads((out / "results.json").read_text())
        s = res["methods"]["full_ft"]["seeds"]["0"]
        s["stages"], s["complete"] = s["stages"][:stage], False
        (out / "results.json").write_text(json.dumps(res))

    cut_after(2)
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *cheap)
    assert code == 0, err
    assert "no stage checkpoint to resume from; stages 1-2 are redone" in err
    assert (out / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()

    # every stage's checkpoint kept; then stage 2's is lost: resume from stage 1's
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, "--fresh", "--set", "keep_checkpoints=all", *cheap)
    assert code == 0, err
    (out / "checkpoints" / "full_ft" / "seed0" / "stage2.pt").unlink()
    cut_after(2)
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, "--set", "keep_checkpoints=all", *cheap)
    assert code == 0, err
    assert "resumed after stage 1" in err and "stage 2 is redone (no later checkpoint)" in err
    assert (out / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()


def test_unreadable_checkpoint_on_resume_is_said_and_its_stages_redone(reference_run, tmp_path, run_cli):
    """A truncated stage checkpoint (e.g. a disk that filled up outside clbench) is not a dead end:
    the resume says which file cannot be read, deletes it, and starts from an earlier checkpoint,
    or from the start, to the uninterrupted run's matrix."""
    out = tmp_path / "out"
    keep_all = ("--set", "keep_checkpoints=all", *EVERY_STAGE)
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *keep_all)
    assert code == 0, err
    ck = out / "checkpoints" / "full_ft" / "seed0"

    def cut_after(stage):  # as if the process had died after stage `stage` of full_ft
        res = json.loads((out / "results.json").read_text())
        s = res["methods"]["full_ft"]["seeds"]["0"]
        s["stages"], s["complete"] = s["stages"][:stage], False
        (out / "results.json").write_text(json.dumps(res))

    def truncate(f):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])

    cut_after(2)
    truncate(ck / "stage2.pt")
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *keep_all)
    assert code == 0, err
    assert f"stage checkpoint {ck / 'stage2.pt'} cannot be read" in err.replace("\n", "") and "resumed after stage 1" in err
    assert (out / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()

    cut_after(2)
    truncate(ck / "stage2.pt")
    (ck / "stage1.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *keep_all)
    assert code == 0, err
    flat = err.replace("\n", "")
    assert f"{ck / 'stage2.pt'} cannot be read" in flat and f"{ck / 'stage1.pt'} cannot be read" in flat
    assert "has no stage checkpoint to resume from; stages 1-2 are redone" in err
    assert (out / "matrix.csv").read_text() == (reference_run / "matrix.csv").read_text()


def test_a_ctrl_c_that_a_library_swallows_is_raised_again_at_the_next_check():
    """A library's broad except around its own work must not lose the user's Ctrl-C: the training
    loop's per-step check raises it again; a new block (a new command) starts clean, and the
    handler that was there before is put back."""
    from clbench import interrupt

    previous = signal.getsignal(signal.SIGINT)
    with interrupt.watching():
        assert signal.getsignal(signal.SIGINT) is not previous
        interrupt.check()  # nothing requested: no error
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs in the main thread between bytecodes
        except KeyboardInterrupt:
            pass  # what a careless library does
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    assert signal.getsignal(signal.SIGINT) is previous
    with interrupt.watching():
        interrupt.check()
