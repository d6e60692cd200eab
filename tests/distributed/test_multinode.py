"""Several nodes: two torchrun launches of one process each, joined by c10d rendezvous over localhost
(`--nnodes 2 --nproc_per_node 1`, as two hosts would run them), give the matrix of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import yaml

from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_give_the_matrix_of_one_process(tmp_path, one_thread):
    from clbench.cli import main

    cfg = {"name": "nodes", "model": "tiny", "tasks": ["tiny_parity", "tiny_compare"],
           "task_dirs": [str(REPO / "configs" / "tiny_tasks")],
           "methods": [{"name": "full_ft"}, {"name": "lota", "options": {"calibration_steps": 2}}], "seeds": [0],
           "train": {"lr": 3.0e-3, "steps": 3, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 8, "batch_size": 16}, "precision": "fp32", "threads": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "nodes",
                               "-m", "clbench", "run", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "two")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert main(["run", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["meta"]["hardware"]["processes"] == 2
    for m in ("full_ft", "lota"):
        a, b = one["methods"][m]["seeds"]["0"], two["methods"][m]["seeds"]["0"]
        assert a["matrix"] == b["matrix"], m
        # losses: 1e-5 absolute, float sums in another order (as tests/distributed/test_distributed.py)
        for sa, sb in zip(a["stages"], b["stages"], strict=True):
            assert abs(sa["last_loss"] - sb["last_loss"]) <= 1e-5, m
