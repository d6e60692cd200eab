"""Two CPU processes (gloo) train like one process with the same global batch: every method of
configs/all-methods.yaml and those it leaves out (EXTRA), in one launch per number of processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO

# every method of configs/all-methods.yaml, with budgets cut to the tiny model (every code path still runs)
TINY = {"lota": {"calibration_steps": 2}, "ks_lottery": {"calibration_steps": 2, "n": 20}, "inflora": {"max_batches": 2},
        "ssr": {"n_demos": 4, "samples_per_prompt": 1, "max_new_tokens": 24, "per_task": 4, "n_clusters": 2}}
# and the methods all-methods.yaml leaves out (it is the real-model check; these are checked here only)
EXTRA = [{"name": "gem", "options": {"m": 8}}, {"name": "moelora"}, {"name": "moelora_expand"},
         {"name": "progressive_prompts"}, {"name": "l2p"}]
METHODS = [{**m, "options": {**m.get("options", {}), **TINY.get(m["name"], {})}}
           for m in yaml.safe_load((REPO / "configs" / "all-methods.yaml").read_text())["methods"]] + EXTRA
WEIGHTS = ("full_ft", "lota", "sift", "hft")  # whose stage checkpoints are compared entry by entry


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from clbench.cli import main

    d = tmp_path_factory.mktemp("ddp")
    cfg = {"name": "ddp", "model": "tiny", "tasks": ["tiny_parity", "tiny_compare"],
           "task_dirs": [str(REPO / "configs" / "tiny_tasks")], "methods": METHODS, "seeds": [0],
           "train": {"lr": 3.0e-3, "steps": 3, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 8, "batch_size": 16, "log_samples": False}, "precision": "fp32", "keep_checkpoints": "all",
           "threads": 1}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clbench", "run",
                          str(d / "cfg.yaml"), "--output-dir", str(d / "two")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    (d / "two.stderr").write_text(two.stderr)
    assert main(["run", str(d / "cfg.yaml"), "--output-dir", str(d / "one")]) == 0
    return d / "one", d / "two"


def _res(path):
    return json.loads((path / "results.json").read_text())


def test_two_processes_give_the_same_matrix_losses_and_weights(runs):
    """Every method. Tolerance: matrices identical; losses 1e-5 absolute (float sums in another order: each rank
    sums its share of the tokens, then the ranks' sums are added); weights: at most 0.1% of the
    entries differ by more than 1e-5, and none by more than one learning-rate step (3e-3): Adam
    divides by sqrt(v), so where a gradient is ~0 its rounding difference can move an entry by a
    visible fraction of a step."""
    from clbench import checkpoint

    one, two = runs
    r1, r2 = _res(one), _res(two)
    assert r2["meta"]["hardware"]["processes"] == 2 and r1["meta"]["hardware"]["processes"] == 1
    diverged, dependent = {}, set()
    for spec in METHODS:
        m = spec["name"]
        s1, s2 = r1["methods"][m]["seeds"]["0"], r2["methods"][m]["seeds"]["0"]
        assert s1["complete"] and s2["complete"], m
        if s2.get("world_size_dependent"):  # a method that cannot be independent says why
            assert s1["world_size_dependent"] == s2["world_size_dependent"]
            dependent.add(m)
            continue
        losses = [(a[k], b[k]) for a, b in zip(s1["stages"], s2["stages"], strict=True) for k in ("first_loss", "last_loss")]
        if s1["matrix"] != s2["matrix"] or any(abs(a - b) > 1e-5 for a, b in losses):
            diverged[m] = losses
    assert not diverged, diverged
    # its extra loss is each rank's mean over its share of the batch (methods/ilora.py); LwF weighs
    # its rows over the global batch and is no longer among them
    assert dependent == {"ilora"}
    printed = (two.parent / "two.stderr").read_text()
    assert printed.count("ilora: its results depend on the number of processes") == 1
    assert "lwf: its results depend on the number of processes" not in printed
    for m in WEIGHTS:
        c1 = checkpoint.load(one / "checkpoints" / m / "seed0" / "stage2.pt")["diff"]
        c2 = checkpoint.load(two / "checkpoints" / m / "seed0" / "stage2.pt")["diff"]
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
    for spec in METHODS:
        for st in _res(two)["methods"][spec["name"]]["seeds"]["0"]["stages"]:
            assert len(st["rank_digests"]) == 2 and st["rank_digests"][0] == st["rank_digests"][1], (spec["name"], st)


def test_only_rank_zero_writes(runs):
    _, two = runs
    assert not (two / ".lock").exists()
    assert sorted(p.name for p in two.iterdir() if p.is_file()) == ["config.yaml", "matrix.csv", "results.json",
                                                                     "summary.csv"]


def test_digest_sees_a_single_changed_mask_entry():
    from clbench.distributed.collectives import state_digest

    model = torch.nn.Linear(4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    a = state_digest(model, {"masks": [mask.clone()], "seconds": 1.0})
    mask[1, 2] = True
    assert state_digest(model, {"masks": [mask], "seconds": 1.0}) != a
    assert state_digest(model, {"masks": [torch.zeros(4, 4, dtype=torch.bool)], "seconds": 2.0}) == a  # timings ignored
