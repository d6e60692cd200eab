"""GEM (methods/gem.py) on the tiny Llama: the dual QP against hand-solved cases; in stage 3 (two
finished tasks) the projected gradient g~ = g + M^T v satisfies g~ . g_k >= 0 for every finished
task k (checked with reference gradients computed here, independently), an agreeing gradient is left
bit-identical; with one finished task, margin 0 and eps 0 GEM takes A-GEM's step; a 2-stage CLI
run resumed after stage 1 repeats exactly."""

import math

import numpy as np
import pytest
import torch

from clbench.method import load_method_file, make_method
from clbench.config import TrainConfig
from clbench.training.stage import start_stage
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import compare, cpu_rt, fresh, one_stage, parity
from test_method_agem import dot, grad_of, grads, set_grads  # A-GEM's test helpers: the same gradients

for _f in ("agem", "gem"):
    load_method_file(REPO / "methods" / f"{_f}.py")
from clbench_methods.gem import solve_dual  # noqa: E402  (registered above)

PARITY = parity(16)
COMPARE = compare(16)
COPY = [(f"Repeat the word: w{i}\nAnswer:", f" w{i}") for i in range(16)]
CFG = TrainConfig(lr=1e-2, steps=4, batch_size=4, weight_decay=0.1)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("gram, gdot, margin, v", [
    ([[1.0]], [-1.0], 0.0, [1.0]),                        # g = (1, -1), g_1 = (0, 1): v = 1, g~ = (1, 0)
    ([[1.0, 0.0], [0.0, 1.0]], [-1.0, -1.0], 0.0, [1.0, 1.0]),  # g = (-1, -1) against (1, 0) and (0, 1): g~ = 0
    ([[1.0, 0.0], [0.0, 1.0]], [-1.0, 1.0], 0.0, [1.0, 0.0]),   # g = (-1, 1): only the first constraint binds
    ([[1.0]], [-0.2], 0.5, [0.5]),                        # g = (1, -0.2), g_1 = (0, 1): v* = 0.2 < margin 0.5
    ([[2.0, 1.0], [1.0, 2.0]], [-3.0, 0.0], 0.0, [1.5, 0.0]),  # min v^2 - 3 v (second held at 0): v = 1.5
])
def test_dual_against_hand_solved_cases(gram, gdot, margin, v):
    got = solve_dual(np.array(gram), np.array(gdot), margin, eps=0.0)
    np.testing.assert_allclose(got, v, atol=1e-12)


@pytest.fixture(scope="module")
def data(tok):
    return T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64), T.tokenize(COPY, tok, 64)


def test_every_step_of_stage_3_keeps_every_finished_tasks_loss_from_rising(tok, data):
    meth, model, run = fresh(tok, "gem", tasks=("t1", "t2", "t3"), options={"m": 6})
    model, _, _ = one_stage(meth, model, run, tok, data[0], CFG, 1)
    model, _, _ = one_stage(meth, model, run, tok, data[1], CFG, 2)
    assert list(meth.memory) == ["t1", "t2"]
    cfg = TrainConfig(lr=3e-2, steps=6, batch_size=4, max_grad_norm=1.0)
    seen = []
    original, drawn = meth.after_backward, meth.reference_sets

    def sets(stage):
        out = drawn(stage)
        seen.append({"sets": out})
        return out

    def checked(m, stage):
        g = grads(m)
        original(m, stage)
        got = grads(m)
        refs = [grad_of(m, exs, tok) for exs in seen[-1]["sets"]]  # the same examples, computed here
        d = [dot(g, r) for r in refs]
        seen[-1]["violated"] = any(x < 0 for x in d)
        if not seen[-1]["violated"]:
            assert all(torch.equal(a, b) for a, b in zip(got, g))  # left alone
            return
        v = meth.last["v"]
        for vk, r in zip(v, refs):  # KKT of the dual with v >= margin: g~ . g_k >= -eps v_k (eps 1e-3 on the
            n_got, n_r = math.sqrt(dot(got, got)), math.sqrt(dot(r, r))  # diagonal), float32 rounding aside
            assert dot(got, r) >= -1e-3 * vk - 1e-5 * n_got * n_r
        assert len(v) == 2 and min(v) >= 0.5 - 1e-12  # one dual variable per finished task, at least the margin
        want = [gi.double() + sum(vk * r[i] for vk, r in zip(v, refs)) for i, gi in enumerate(g)]
        for x, w in zip(got, want):  # g~ = g + M^T v from the independent gradients
            torch.testing.assert_close(x.double(), w, rtol=1e-4, atol=1e-6)

    meth.reference_sets, meth.after_backward = sets, checked
    one_stage(meth, model, run, tok, data[2], cfg, 3)
    assert len(seen) == 6 and any(s["violated"] for s in seen)
    assert meth.stats[-1] == {"stage": 3, "steps": 6, "projected": sum(s["violated"] for s in seen)}


def test_one_finished_task_margin_0_is_agems_step(tok, data):
    """The same memory, model and task gradient: GEM (margin 0, eps 0) and A-GEM project alike."""
    opts = {"m": 6, "ref_batch_size": 4}
    agem, model, run = fresh(tok, "agem", opts, tasks=("t1", "t2", "t3"))
    model, _, _ = one_stage(agem, model, run, tok, data[0], CFG, 1)
    gem = make_method("gem", {**opts, "margin": 0.0, "eps": 0.0})
    gem.load_state_dict(agem.state_dict())
    model, stage = start_stage(model, agem, data[1], CFG, run, 2, "t2", cpu_rt(tok))
    model.train()
    ref = grad_of(model, agem.memory["t1"], tok)
    g = [-r + 0.3 * n for r, n in zip(ref, grad_of(model, data[1][:4], tok))]
    assert dot(g, ref) < 0
    out = []
    for m in (agem, gem):
        m.stage_start(model, stage)  # the same seeded draw of the reference batch
        set_grads(model, g)
        m.after_backward(model, stage)
        assert m.last["projected"]
        out.append(grads(model))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_two_stage_run_and_resume(tmp_path):
    two_stage_run_and_resume(tmp_path, [{"name": "gem", "options": {"m": 8}}], train={"grad_accum": 2})
