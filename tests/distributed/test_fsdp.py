"""Sharded training (distributed.strategy fsdp: torch FSDP2, gloo on CPU) gives one process's results;
its checkpoints (torch.distributed.checkpoint) resume after SIGKILL and at another number of processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from conftest import REPO

# lora's merge: the sharded model's task vectors (adapters merged on rank 0) and the merged row
METHODS = [{"name": "full_ft"}, {"name": "lora", "merge": [{"how": "task_arithmetic", "lam": 0.5}]}, {"name": "olora"},
           {"name": "miss", "options": {"r": 16}}]
NAMES = [m["name"] for m in METHODS]
FSDP = ["--set", "distributed.strategy=fsdp"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(n: int, cfg, out, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "clbench", "run", str(cfg),
           "--output-dir", str(out), *FSDP]
    return cmd, dict(env=ENV, **kw)


def _res(path):
    return json.loads((path / "results.json").read_text())


def _stages_done(out, method):
    try:
        return len(_res(out)["methods"][method]["seeds"]["0"]["stages"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """one: 1 process (replicated); two: 2 sharded processes, SIGKILLed during full_ft's stage 2 and run
    again; two_to_one: `two` with the last stage of every method forgotten, resumed by 1 sharded process."""
    from clbench.cli import main

    d = tmp_path_factory.mktemp("fsdp")
    cfg = {"name": "fsdp", "model": "tiny", "stream": "tiny3", "order": "1",
           "task_dirs": [str(REPO / "configs" / "tiny_tasks")], "methods": METHODS, "seeds": [0],
           "train": {"lr": 3.0e-3, "steps": 4, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 10, "batch_size": 16}, "precision": "fp32", "keep_checkpoints": "all", "threads": 1}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    two = d / "two"
    cmd, kw = _launch(2, d / "cfg.yaml", two)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    deadline = time.time() + 300
    while _stages_done(two, "full_ft") < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # stage 2 of full_ft has started: kill the workers (torchrun starts each in a session of its own)
    # and the launcher (psutil comes with accelerate)
    for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = _stages_done(two, "full_ft")
    again = subprocess.run(*[_launch(2, d / "cfg.yaml", two)[0]], capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert main(["run", str(d / "cfg.yaml"), "--output-dir", str(d / "one")]) == 0
    down = d / "two_to_one"
    shutil.copytree(two, down)
    res = _res(down)
    for m in NAMES:
        seed = res["methods"][m]["seeds"]["0"]
        seed["stages"], seed["complete"] = seed["stages"][:2], False
        shutil.rmtree(down / "checkpoints" / m / "seed0" / "stage3.dcp")
    (down / "results.json").write_text(json.dumps(res))
    resumed = subprocess.run(_launch(1, d / "cfg.yaml", down)[0], capture_output=True, text=True, timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"one": d / "one", "two": two, "killed_after": killed_after, "again": again.stderr,
            "two_to_one": down, "resumed": resumed.stderr}


def _said(log: str, text: str) -> bool:
    """`text` in the console's log, whatever its line wrapping."""
    return "".join(text.split()) in "".join(log.split())


def _same_run(a, b):
    """Matrices identical; stage losses within 1e-5 (float sums in another order: each rank sums its
    share of the tokens, and FSDP reduces the gradients shard by shard), as tests/distributed/test_distributed.py."""
    ra, rb = _res(a), _res(b)
    for m in NAMES:
        sa, sb = ra["methods"][m]["seeds"]["0"], rb["methods"][m]["seeds"]["0"]
        assert sb["complete"] and sa["matrix"] == sb["matrix"] and sa.get("merged") == sb.get("merged"), m
        assert len(sa["stages"]) == len(sb["stages"]) == 3, m
        for x, y in zip(sa["stages"], sb["stages"]):
            assert y["first_loss"] == pytest.approx(x["first_loss"], abs=1e-5), (m, x["stage"])
            assert y["last_loss"] == pytest.approx(x["last_loss"], abs=1e-5), (m, x["stage"])


def test_two_sharded_processes_killed_and_rerun_give_one_process_results(runs):
    assert runs["killed_after"] == 1, "the kill did not come during full_ft's stage 2"
    assert _said(runs["again"], f"resumed after stage 1 from {runs['two']}/checkpoints/full_ft/seed0/stage1.dcp")
    assert _res(runs["two"])["meta"]["hardware"]["processes"] == 2
    _same_run(runs["one"], runs["two"])


def test_task_vectors_of_the_sharded_model_are_one_process_s(runs):
    """Tolerance as tests/distributed/test_distributed.py's weights: Adam amplifies the rounding differences."""
    from clbench import checkpoint

    assert _res(runs["two"])["methods"]["lora"]["seeds"]["0"]["merged"]["merged:task_arithmetic"]
    for t in (1, 3):
        a, b = (checkpoint.load_state_diff(r / "checkpoints" / "lora" / "seed0" / f"taskvec{t}.pt")
                for r in (runs["one"], runs["two"]))
        assert set(a) == set(b) and a
        for k, e in a.items():
            assert e[0] == b[k][0] == "dense", k
            assert (e[1] - b[k][1]).abs().max().item() <= 1e-4, (t, k)


def test_resume_at_another_number_of_processes(runs):
    for m in NAMES:
        where = f"{runs['two_to_one']}/checkpoints/{m}/seed0/stage2.dcp"
        assert _said(runs["resumed"], f"resumed after stage 2 from {where}"), m
    _same_run(runs["one"], runs["two_to_one"])
    last = _res(runs["two_to_one"])["methods"]["full_ft"]["seeds"]["0"]["stages"][-1]
    assert len(last["per_rank"]) == 1


def test_full_ft_state_per_rank_is_about_half(runs):
    one = _res(runs["one"])["methods"]["full_ft"]["seeds"]["0"]["stages"][-1]["per_rank"]
    two = _res(runs["two"])["methods"]["full_ft"]["seeds"]["0"]["stages"][-1]["per_rank"]
    total = lambda r: r["params"] + r["grads"] + r["optimizer"]  # noqa: E731
    assert len(one) == 1 and len(two) == 2
    for r in two:
        assert total(r) <= 0.55 * total(one[0]), (r, one[0])
        assert r["peak_mem_mb"] > 0


def test_only_rank_zero_writes_and_checkpoints_are_folders(runs):
    two = runs["two"]
    assert sorted(p.name for p in two.iterdir() if p.is_file()) == ["config.yaml", "matrix.csv", "results.json",
                                                                     "summary.csv"]
    ck = two / "checkpoints" / "full_ft" / "seed0" / "stage1.dcp"
    assert {p.name for p in ck.iterdir()} >= {".metadata", "rank0.pt", "rank1.pt", "meta.pt"}
    assert not list(ck.parent.glob(".*partial"))


def test_a_method_not_verified_sharded_is_refused_before_training(tmp_path, run_cli):
    (tmp_path / "plain.py").write_text(
        "from clbench.method import Method, register\n\n@register('plain_user_method')\nclass Plain(Method):\n    pass\n")
    cfg = {"name": "refuse", "model": "tiny", "tasks": ["tiny_parity"], "task_dirs": [str(REPO / "configs" / "tiny_tasks")],
           "method_files": ["plain.py"], "methods": [{"name": "full_ft"}, {"name": "plain_user_method"}],
           "train": {"steps": 1}, "precision": "fp32"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli("run", tmp_path / "cfg.yaml", "--output-dir", tmp_path / "out", *FSDP)
    assert code != 0
    assert "methods.1 (plain_user_method) cannot run with distributed.strategy fsdp: not verified" in " ".join((out + err).split())
    assert not (tmp_path / "out" / "results.json").exists() and "base model:" not in out + err


def test_accelerate_fsdp_launch_settings_select_fsdp(monkeypatch):
    from clbench.distributed import fsdp
    from clbench.config import RunConfig
    from clbench.errors import ConfigError

    cfg = RunConfig(tasks=["a"], methods=[{"name": "full_ft"}])
    assert not fsdp.requested(cfg)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp.requested(cfg)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP2 only"):
        fsdp.requested(cfg)
