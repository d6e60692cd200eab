"""A-GEM (methods/agem.py) on the tiny Llama: an empty memory (stage 1) is exactly full
fine-tuning; a conflicting gradient is projected to g~ = g - (g.r / r.r) r (checked against a
float64 computation from an independently computed reference gradient r), with
g~.r >= -1e-6 |g~||r| and |g~| <= |g|; an agreeing gradient is left bit-identical; the same holds
at every step of a stage run by the loop; the memory is a seeded sample of the stage's examples
and survives a state_dict round trip; a 2-stage CLI run resumed after stage 1 repeats exactly."""

import io
import math

import pytest
import torch

from clbench.method import load_method_file, make_method
from clbench.config import TrainConfig
from clbench.training.stage import start_stage
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import bits, compare, cpu_rt, fresh, one_stage, parity

for _f in ("agem", "full_ft"):
    load_method_file(REPO / "methods" / f"{_f}.py")

PARITY = parity(16)
COMPARE = compare(16)
CFG = TrainConfig(lr=1e-2, steps=4, batch_size=4, weight_decay=0.1)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tok):
    return T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64)


def grad_of(model, examples, tok):
    """The gradient of the loop's loss on `examples`, one float64 tensor per trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = T.lm_loss(model, T.collate(examples, tok.pad_token_id))
    return [g.double() for g in torch.autograd.grad(loss, params)]


def dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def set_grads(model, gs):
    for p, g in zip([p for p in model.parameters() if p.requires_grad], gs):
        p.grad = g.to(p.dtype).clone()


def test_empty_memory_is_exactly_full_fine_tuning(tok, data):
    a, ma, ra = fresh(tok, "agem")
    f, mf, rf = fresh(tok, "full_ft")
    _, _, sa = one_stage(a, ma, ra, tok, data[0], CFG, 1, end=False)
    _, _, sf = one_stage(f, mf, rf, tok, data[0], CFG, 1, end=False)
    assert sa["losses"] == sf["losses"]
    pf = dict(mf.named_parameters())
    assert all(torch.equal(bits(p), bits(pf[n])) for n, p in ma.named_parameters())
    assert a.last == {}  # the hook returned before computing anything


def test_memory_is_a_seeded_sample_of_the_stage_examples(tok, data):
    meth, model, run = fresh(tok, "agem", options={"m": 5})
    model, _, _ = one_stage(meth, model, run, tok, data[0], CFG, 1)
    mem = meth.memory["t1"]
    assert len(mem) == 5 and len({tuple(e.input_ids) for e in mem}) == 5
    assert all(e in data[0] for e in mem)
    again, m2, r2 = fresh(tok, "agem", options={"m": 5})
    one_stage(again, m2, r2, tok, data[0], CFG, 1)
    assert again.memory["t1"] == mem  # the same seed, stage and examples draw the same sample
    big, m3, r3 = fresh(tok, "agem", options={"m": 100})
    one_stage(big, m3, r3, tok, data[0], CFG, 1)
    assert sorted(map(tuple, (e.input_ids for e in big.memory["t1"]))) == sorted(tuple(e.input_ids) for e in data[0])


@pytest.fixture
def stage2(tok, data):
    """An A-GEM model after stage 1 (memory: 6 parity examples), at the start of stage 2."""
    meth, model, run = fresh(tok, "agem", options={"m": 6, "ref_batch_size": 64})
    model, _, _ = one_stage(meth, model, run, tok, data[0], CFG, 1)
    model, stage = start_stage(model, meth, data[1], CFG, run, 2, "t2", cpu_rt(tok))
    model.train()
    ref = grad_of(model, meth.memory["t1"], tok)  # the whole memory is the reference batch (6 < 64)
    new = grad_of(model, data[1][:4], tok)
    return meth, model, stage, ref, new


def test_conflicting_gradient_is_projected(stage2):
    meth, model, stage, ref, new = stage2
    g = [-r + 0.3 * n for r, n in zip(ref, new)]
    assert dot(g, ref) < 0
    set_grads(model, g)
    meth.after_backward(model, stage)
    assert meth.last["projected"]
    got = grads(model)
    coef = dot(g, ref) / dot(ref, ref)
    for x, gi, r in zip(got, g, ref):  # g~ = g - (g.r / r.r) r, in float64 from the independent r
        torch.testing.assert_close(x.double(), gi - coef * r, rtol=1e-4, atol=1e-7)
    norm = lambda v: math.sqrt(dot(v, v))  # noqa: E731
    assert dot(got, ref) >= -1e-6 * norm(got) * norm(ref)
    assert norm(got) <= norm(g)
    assert norm(got) > 1e-3 * norm(g)  # not trivially zeroed
    assert dot(got, ref) == pytest.approx(0.0, abs=1e-5 * norm(got) * norm(ref))


def test_agreeing_gradient_is_left_bit_identical(stage2):
    meth, model, stage, ref, new = stage2
    set_grads(model, [r + 0.1 * n for r, n in zip(ref, new)])
    assert dot(grads(model), ref) > 0
    before = [bits(g) for g in grads(model)]
    meth.after_backward(model, stage)
    assert not meth.last["projected"] and meth.last["dot"] > 0
    assert all(torch.equal(bits(g), b) for g, b in zip(grads(model), before))


def test_every_step_of_a_looped_stage_satisfies_the_invariants(tok, data):
    meth, model, run = fresh(tok, "agem", options={"m": 6, "ref_batch_size": 64})
    model, _, _ = one_stage(meth, model, run, tok, data[0], CFG, 1)
    cfg = TrainConfig(lr=3e-2, steps=6, batch_size=4, grad_accum=2, max_grad_norm=1.0)
    seen = []
    original = meth.after_backward

    def checked(m, stage):
        g = grads(m)
        ref = grad_of(m, meth.memory["t1"], tok)
        original(m, stage)
        got = grads(m)
        d = dot(g, ref)
        seen.append(d < 0)
        if d >= 0:
            assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, g))
        else:
            n_got, n_ref = math.sqrt(dot(got, got)), math.sqrt(dot(ref, ref))
            assert dot(got, ref) >= -1e-6 * n_got * n_ref
            assert dot(got, got) <= dot(g, g)
        assert meth.last["projected"] == (d < 0)

    meth.after_backward = checked
    model, stage, _ = one_stage(meth, model, run, tok, data[1], cfg, 2)
    assert len(seen) == 6
    assert any(seen) and not all(seen)  # both branches ran (2 of the 6 steps conflict with this seed)
    assert meth.stats == [{"stage": 2, "steps": 6, "projected": sum(seen)}]
    assert set(meth.memory) == {"t1", "t2"}


def test_reference_batches_are_seeded_draws_from_the_memory(tok, data):
    draws = []
    for _ in range(2):
        meth, model, run = fresh(tok, "agem", options={"m": 10, "ref_batch_size": 3})
        model, _, _ = one_stage(meth, model, run, tok, data[0], CFG, 1)
        _, stage = start_stage(model, meth, data[1], CFG, run, 2, "t2", cpu_rt(tok))
        draws.append([meth.reference_examples(stage) for _ in range(4)])
    assert draws[0] == draws[1]  # every process draws the same reference batches
    pool = meth.pool()
    assert all(len(d) == 3 and len(set(map(id, d))) == 3 and all(e in pool for e in d) for d in draws[0])
    assert len({tuple(tuple(e.input_ids) for e in d) for d in draws[0]}) > 1  # a new batch per step


def test_state_dict_round_trip_keeps_the_memory(stage2):
    meth, model, stage, ref, new = stage2
    buf = io.BytesIO()
    torch.save(meth.state_dict(), buf)
    buf.seek(0)
    other = make_method("agem", {"m": 6, "ref_batch_size": 64})
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert other.memory == meth.memory and other.memory["t1"]
    g = [-r + 0.3 * n for r, n in zip(ref, new)]
    out = []
    for m in (meth, other):
        m.stage_start(model, stage)
        set_grads(model, g)
        m.after_backward(model, stage)
        out.append(grads(model))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_two_stage_run_and_resume(tmp_path):
    res = two_stage_run_and_resume(tmp_path, [
        {"name": "agem", "options": {"m": 8}},
        {"name": "agem", "label": "agem-small-ref", "options": {"m": 8, "ref_batch_size": 3}},
    ], train={"grad_accum": 2})
    a, b = (res["methods"][m]["seeds"]["0"]["stages"][0] for m in ("agem", "agem-small-ref"))
    assert (a["first_loss"], a["last_loss"]) == (b["first_loss"], b["last_loss"])  # stage 1: no memory yet, no option matters
