"""Two CPU processes (gloo) train like one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO

METHODS = [{"name": "full_ft"}, {"name": "lota", "options": {"calibration_steps": 2}},
           {"name": "sift", "options": {"rate": 0.05}}, {"name": "hft"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from clbench.cli import main

    d = tmp_path_factory.mktemp("ddp")
    cfg = {"name": "ddp", "model": "tiny", "stream": "tiny3", "order": "1",
           "task_dirs": [str(REPO / "configs" / "tiny_tasks")], "methods": METHODS, "seeds": [0],
           "train": {"lr": 3.0e-3, "steps": 4, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 10, "batch_size": 16}, "precision": "fp32", "keep_checkpoints": "all", "threads": 1}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "clbench", "run",
                          str(d / "cfg.yaml"), "--output-dir", str(d / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["run", str(d / "cfg.yaml"), "--output-dir", str(d / "one")]) == 0
    return d / "one", d / "two"


def _res(path):
    return json.loads((path / "results.json").read_text())


def test_two_processes_give_the_same_matrix_losses_and_weights(runs):
    """Tolerance: matrices identical; losses 1e-5 absolute (float sums in another order: each rank
    sums its share of the tokens, then the ranks' sums are added); weights: at most 0.1% of the
    entries differ by more than 1e-5, and none by more than one learning-rate step (3e-3): Adam
    divides by sqrt(v), so where a gradient is ~0 its rounding difference can move an entry by a
    visible fraction of a step."""
    from clbench import checkpoint

    one, two = runs
    r1, r2 = _res(one), _res(two)
    assert r2["meta"]["hardware"]["processes"] == 2 and r1["meta"]["hardware"]["processes"] == 1
    for m in ("full_ft", "lota", "sift", "hft"):
        s1, s2 = r1["methods"][m]["seeds"]["0"], r2["methods"][m]["seeds"]["0"]
        assert s1["matrix"] == s2["matrix"], m
        for a, b in zip(s1["stages"], s2["stages"]):
            assert b["first_loss"] == pytest.approx(a["first_loss"], abs=1e-5)
            assert b["last_loss"] == pytest.approx(a["last_loss"], abs=1e-5)
        c1 = checkpoint.load(one / "checkpoints" / m / "seed0" / "stage3.pt")["diff"]
        c2 = checkpoint.load(two / "checkpoints" / m / "seed0" / "stage3.pt")["diff"]
        assert set(c1) == set(c2), m  # the same tensors (the same sparse entries) changed
        for k, e in c1.items():
            if e[0] == "dense":
                _close(c2[k][1], e[1], (m, k))
            elif e[0] == "sparse":
                assert torch.equal(c2[k][1], e[1]), (m, k)  # same entries: masks and selections agree
                _close(c2[k][2], e[2], (m, k))


def _close(a, b, what):
    d = (a.float() - b.float()).abs()
    assert d.max().item() <= 3e-3, what
    assert (d > 1e-5).float().mean().item() <= 1e-3, what


def test_every_rank_held_the_same_weights_masks_and_draws_after_every_stage(runs):
    _, two = runs
    for m in ("full_ft", "lota", "sift", "hft"):
        for st in _res(two)["methods"][m]["seeds"]["0"]["stages"]:
            assert len(st["rank_digests"]) == 2 and st["rank_digests"][0] == st["rank_digests"][1], (m, st)


def test_only_rank_zero_writes(runs):
    _, two = runs
    assert not (two / ".lock").exists()
    assert sorted(p.name for p in two.iterdir() if p.is_file()) == ["config.yaml", "matrix.csv", "results.json",
                                                                     "summary.csv"]


def test_digest_sees_a_single_changed_mask_entry():
    from clbench.distributed import state_digest

    model = torch.nn.Linear(4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    a = state_digest(model, {"masks": [mask.clone()], "seconds": 1.0})
    mask[1, 2] = True
    assert state_digest(model, {"masks": [mask], "seconds": 1.0}) != a
    assert state_digest(model, {"masks": [torch.zeros(4, 4, dtype=torch.bool)], "seconds": 2.0}) == a  # timings ignored
