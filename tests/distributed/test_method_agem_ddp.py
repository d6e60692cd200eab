"""A-GEM on two CPU processes (gloo): every rank must hold the same reference gradient, so it
takes the same projection decisions and the same steps as the other rank, and as one process
with the same global batch. A separate file: the two-process run costs ~30 s on 2 cores."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO


def test_two_processes_project_alike_and_like_one_process(tmp_path):
    from clbench.cli import main

    # lr 1e-2 over 6 steps: 5 of stage 2's steps conflict with the memory on this seed
    cfg = {"name": "agem-ddp", "model": "tiny", "tasks": ["tiny_parity", "tiny_compare"],
           "task_dirs": [str(REPO / "configs" / "tiny_tasks")], "methods": [{"name": "agem", "options": {"m": 8}}],
           "seeds": [0], "train": {"lr": 1e-2, "steps": 6, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 8, "batch_size": 16}, "precision": "fp32", "keep_checkpoints": "all", "threads": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clbench", "run",
                          str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]  # the loop stops on "ranks diverged"
    assert main(["run", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "one")]) == 0
    res = {d: json.loads((tmp_path / d / "results.json").read_text())["methods"]["agem"]["seeds"]["0"] for d in ("one", "two")}
    for st in res["two"]["stages"]:
        assert len(st["rank_digests"]) == 2 and len(set(st["rank_digests"])) == 1  # weights and memory equal
    assert res["one"]["matrix"] == res["two"]["matrix"]
    for a, b in zip(res["one"]["stages"], res["two"]["stages"]):
        assert b["first_loss"] == pytest.approx(a["first_loss"], abs=1e-4)
        assert b["last_loss"] == pytest.approx(a["last_loss"], abs=1e-2)  # 6 Adam steps of rounding differences
    stats = {d: torch.load(tmp_path / d / "checkpoints" / "agem" / "seed0" / "stage2.pt", weights_only=False)["method"]["stats"]
             for d in ("one", "two")}
    assert stats["one"] == stats["two"] and stats["one"][0]["projected"] > 0
