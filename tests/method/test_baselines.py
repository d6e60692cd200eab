"""Continual-learning baselines (O-LoRA, EWC, experience replay) and model merging
(task arithmetic, TIES, DARE through peft; LoTA additive): each test checks a defining property, on the tiny
model through the loop's real train_stage, or on hand-made tensors with hand-computed
results; one 2-stage CLI run of every method, resumed after stage 1 with identical losses."""


import pytest
import torch
import yaml

from clbench.method import RunContext, call_hook, count_trainable, load_method_file, make_method
from clbench.config import MergeSpec, TrainConfig
from clbench.method import merging
from clbench.run import models
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import CPU, bits, compare, fresh, one_stage, parity, stage_view

for _f in ("olora", "ewc", "replay", "lota", "lora"):
    load_method_file(REPO / "methods" / f"{_f}.py")
from clbench_builtin.methods import olora as olora_mod  # noqa: E402  (after the loads above)
from clbench_builtin.methods import lota as lota_mod  # noqa: E402  (after the loads above)

PARITY, COMPARE = parity(20), compare(20)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; `tok` comes from there too


@pytest.fixture(scope="module")
def data(tok):
    return T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64)


# --- merging on hand-made tensors -------------------------------------------------------


def test_task_vectors_and_task_arithmetic_by_hand():
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "step": torch.tensor(7)}
    ft1 = {"w": torch.tensor([2.0, 2.0, 1.0]), "step": torch.tensor(9)}
    ft2 = {"w": torch.tensor([1.0, 5.0, 4.0]), "step": torch.tensor(9)}
    tv = merging.task_vectors(base, [ft1, ft2])
    assert set(tv[0]) == {"w"}  # integer buffers are not task-vector entries
    torch.testing.assert_close(tv[0]["w"], torch.tensor([1.0, 0.0, -2.0]))
    torch.testing.assert_close(tv[1]["w"], torch.tensor([0.0, 3.0, 1.0]))
    out = merging.task_arithmetic(base, tv, lam=0.5)
    # 1 + 0.5*(1+0), 2 + 0.5*(0+3), 3 + 0.5*(-2+1)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 3.5, 2.5]))
    assert out["w"].dtype == torch.float32 and int(out["step"]) == 7
    back = merging.task_arithmetic(base, tv[:1], lam=1.0)
    torch.testing.assert_close(back["w"], ft1["w"])
    assert torch.equal(base["w"], torch.tensor([1.0, 2.0, 3.0]))  # inputs untouched


def test_ties_by_hand():
    base = {"w": torch.tensor([[10.0, 10.0, 10.0], [10.0, 10.0, 10.0]]), "b": torch.zeros(2)}
    t1 = {"w": torch.tensor([[3.0, -0.1, 2.0], [-4.0, 0.2, 1.0]]), "b": torch.tensor([1.0, -2.0])}
    t2 = {"w": torch.tensor([[-1.0, 5.0, 0.1], [-2.0, 3.0, 0.05]]), "b": torch.tensor([-3.0, 0.5])}
    t3 = {"w": torch.tensor([[2.0, -4.0, 0.3], [1.0, -0.1, -6.0]]), "b": torch.tensor([0.5, 4.0])}
    out = merging.ties(base, [t1, t2, t3], density=0.5, lam=2.0)
    # trim (k = int(0.5 * n): 3 of 6 entries of w, 1 of 2 of b, per tensor per task vector):
    #   t1.w -> [[3, 0, 2], [-4, 0, 0]]      t1.b -> [0, -2]
    #   t2.w -> [[0, 5, 0], [-2, 3, 0]]      t2.b -> [-3, 0]
    #   t3.w -> [[2, -4, 0], [0, 0, -6]]     t3.b -> [0, 4]
    # elected sign = sign of the entrywise sums:
    #   w: [[5, 1, 2], [-6, 3, -6]] -> [[+, +, +], [-, +, -]];  b: [-3, 2] -> [-, +]
    # disjoint mean of the agreeing values, each times lam = 2 (w[0,1]: 5 agrees, -4 does not;
    # b[1]: 4 agrees, -2 does not):
    #   w[0] = [(6+4)/2, 10/1, 4/1]; w[1] = [(-8-4)/2, 6/1, -12/1];  b = [-6/1, 8/1]
    expected_w = torch.tensor([[10 + 5.0, 10 + 10.0, 10 + 4.0],
                               [10 - 6.0, 10 + 6.0, 10 - 12.0]])
    torch.testing.assert_close(out["w"], expected_w)
    torch.testing.assert_close(out["b"], torch.tensor([-6.0, 8.0]))


def test_ties_keeps_int_density_n_entries_and_elects_plus_on_a_zero_sum():
    # peft's trim keeps k = int(density * n): 0.3 * 5 = 1.5 -> 1 entry of w; 0.3 * 2 = 0.6 -> none of b
    base = {"w": torch.ones(5), "b": torch.ones(2)}
    out = merging.ties(base, [{"w": torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 2.0])}], density=0.3)
    torch.testing.assert_close(out["w"], torch.tensor([6.0, 1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(out["b"], torch.tensor([1.0, 1.0]))
    # density 1: nothing trimmed. a[0] sums to 1 - 1 = 0: peft elects + (the paper's code would take
    # the tensor's majority sign, here - from a[1]), so a[0] is the mean of the positive values, 1;
    # a[1]: -0.5 - 0.25 < 0 -> the mean of both, -0.375. c: one nonzero value per entry.
    base = {"a": torch.zeros(2), "c": torch.zeros(2)}
    t1 = {"a": torch.tensor([1.0, -0.5]), "c": torch.tensor([0.1, 0.0])}
    t2 = {"a": torch.tensor([-1.0, -0.25]), "c": torch.tensor([0.0, 0.2])}
    out = merging.ties(base, [t1, t2], density=1.0)
    torch.testing.assert_close(out["a"], torch.tensor([1.0, -0.375]))
    torch.testing.assert_close(out["c"], torch.tensor([0.1, 0.2]))
    # global scope, density 0.5: each task vector keeps its int(0.5 * 4) = 2 largest of 4 entries
    # over both tensors: t1 -> a = [1, -0.5], c = [0, 0];  t2 -> a = [-1, -0.25], c = [0, 0] (0.2 < 0.25)
    out = merging.ties(base, [t1, t2], density=0.5, scope="global")
    torch.testing.assert_close(out["a"], torch.tensor([1.0, -0.375]))
    torch.testing.assert_close(out["c"], torch.tensor([0.0, 0.0]))
    # dare_ties at density 1 drops nothing and rescales by 1: TIES without a trim
    torch.testing.assert_close(merging.dare_ties(base, [t1, t2], density=1.0)["a"], torch.tensor([1.0, -0.375]))


def test_dare_drops_at_random_rescales_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(200, 50), "v": torch.zeros(7)}
    tau = {"w": torch.randn(200, 50, generator=g) + 3.0, "v": torch.full((7,), 2.0)}  # no entry is 0
    out = merging.dare_linear(base, [tau], density=0.25, lam=2.0, seed=3)
    kept = out["w"] != 0
    # every entry is dropped or lam * tau / density = 8 tau; about a quarter is kept (10,000 draws:
    # binomial sd 43, the bounds are 6 sd)
    torch.testing.assert_close(out["w"][kept], 8.0 * tau["w"][kept])
    assert 2500 - 260 < int(kept.sum()) < 2500 + 260
    same = merging.dare_linear({"v": base["v"], "w": base["w"]}, [{"v": tau["v"], "w": tau["w"]}], 0.25, 2.0, seed=3)
    assert torch.equal(same["w"], out["w"]) and torch.equal(same["v"], out["v"])  # seed and key name, not key order
    assert not torch.equal(merging.dare_linear(base, [tau], 0.25, 2.0, seed=4)["w"], out["w"])
    # two task vectors: the sum of each one's dropped-and-rescaled entries; density 1 is task arithmetic
    both = merging.dare_linear(base, [tau, {"v": -tau["v"]}], density=1.0, lam=0.5)
    torch.testing.assert_close(both["v"], torch.zeros(7))
    torch.testing.assert_close(both["w"], 0.5 * tau["w"])
    with pytest.raises(ValueError, match="scope 'global' is for ties only"):
        merging.merged_model(torch.nn.Linear(2, 2), [], MergeSpec(how="ties", scope="global").model_copy(
            update={"how": "dare_ties"}), cumulative=True)


def test_merges_equal_peft_composites_on_column_blocks(monkeypatch):
    """clbench prunes each stage as it reads it and runs peft's entrywise steps on column blocks;
    peft's own ties / dare_* / task_arithmetic on the whole stack give the same numbers."""
    from peft.utils import merge_utils

    monkeypatch.setattr(merging, "BLOCK", 7)  # several blocks even on these small tensors
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 5, generator=g), "v": torch.randn(9, generator=g)}
    taus = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    del taus[1]["v"]  # a stage that left v alone: a zero delta
    for how, ours, peft_fn in [
        ("task_arithmetic", lambda: merging.task_arithmetic(base, taus, 0.7), lambda ts, w: merge_utils.task_arithmetic(ts, w)),
        ("ties", lambda: merging.ties(base, taus, 0.3, 0.7), lambda ts, w: merge_utils.ties(ts, w, 0.3)),
        ("dare_linear", lambda: merging.dare_linear(base, taus, 0.6, 0.7, seed=2),
         lambda ts, w: merge_utils.dare_linear(ts, w, 0.6)),
        ("dare_ties", lambda: merging.dare_ties(base, taus, 0.6, 0.7, seed=2), lambda ts, w: merge_utils.dare_ties(ts, w, 0.6)),
    ]:
        got = ours()
        for k in base:
            torch.manual_seed(merging._key_seed(2, k))  # DARE: the generator state clbench draws from for k
            ts = [tv.get(k, torch.zeros_like(base[k])) for tv in taus]
            want = base[k] + peft_fn(ts, torch.full((3,), 0.7))
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=f"{how} {k}")


def test_lota_additive_of_disjoint_masks_equals_applying_each_delta_in_turn():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "v": torch.randn(7, generator=g)}
    perm_w, perm_v = torch.randperm(30, generator=g), torch.randperm(7, generator=g)
    deltas = []
    for t in range(3):  # disjoint masks: stage t owns a slice of a permutation
        mw = torch.zeros(30, dtype=torch.bool)
        mw[perm_w[t * 10:(t + 1) * 10]] = True
        mv = torch.zeros(7, dtype=torch.bool)
        mv[perm_v[t * 2:(t + 1) * 2]] = True
        mw = mw.view(6, 5)
        deltas.append({"w": (mw, torch.randn(int(mw.sum()), generator=g)), "v": (mv, torch.randn(int(mv.sum()), generator=g))})
    merged = merging.lota_additive(base, deltas)
    seq = {k: v.clone() for k, v in base.items()}
    for d in deltas:  # apply one delta after the other
        for k, (m, vals) in d.items():
            seq[k][m] += vals
    for k in base:
        torch.testing.assert_close(merged[k], seq[k], rtol=0, atol=0)
        torch.testing.assert_close(merged[k], lota_mod.lota_additive_merge(base, deltas)[k], rtol=0, atol=0)
    dense = merging.lota_additive(base, [{"v": torch.ones(7)}])
    torch.testing.assert_close(dense["v"], base["v"] + 1)


# --- O-LoRA -------------------------------------------------------------------------------


def _set_A(model, adapter, fn):
    with torch.no_grad():
        for layer in olora_mod.lora_layers(model):
            w = layer.lora_A[adapter].weight
            w.copy_(fn(w.shape))


def test_olora_penalty_zero_for_orthogonal_adapters_positive_otherwise(tok):
    meth, model, run = fresh(tok, "olora", {"r": 4, "alpha": 8, "dropout": 0.0})
    one = stage_view(run, 1, TrainConfig())
    meth.stage_end(meth.stage_start(model, one), one)  # stage 1 done: its adapter is an earlier one at stage 2
    stage = stage_view(run, 2, TrainConfig())
    meth.stage_start(model, stage)
    assert len(olora_mod.lora_layers(model)) == 4  # q_proj and v_proj of 2 layers

    def rows(offset):  # r orthonormal rows e_offset .. e_offset+r-1
        return lambda shape: torch.eye(shape[1])[offset:offset + shape[0]]

    _set_A(model, "stage1", rows(0))
    _set_A(model, "stage2", rows(4))
    pen = meth.extra_loss(model, None, stage, None)
    assert float(pen.detach()) == 0.0 and pen.requires_grad
    # A_1[0,0] = 1, A_2[0,0] = 2, zero elsewhere: |A_1 A_2^T| sums to 2 per module, 4 modules
    _set_A(model, "stage1", lambda s: torch.zeros(s).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(1.0)))
    _set_A(model, "stage2", lambda s: torch.zeros(s).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(-2.0)))
    assert float(meth.extra_loss(model, None, stage, None).detach()) == pytest.approx(0.5 * 4 * 2.0)
    assert meth.extra_loss(model, None, stage_view(run, 1, TrainConfig()), None) is None  # no earlier adapter


def test_olora_earlier_adapters_frozen_but_active_and_overlap_shrinks(tok, data):
    parity, compare = data
    meth, model, run = fresh(tok, "olora", {"r": 4, "alpha": 8, "lambda1": 5.0}, tasks=("t1", "t2", "t3"))
    cfg = TrainConfig(lr=2e-2, steps=4, batch_size=4, weight_decay=0.1)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    after1 = {n: bits(p) for n, p in model.named_parameters()}
    overlap = {}

    def record(m, st):
        overlap["start"] = float(olora_mod.orthogonality_penalty(m, "stage2", ["stage1"]).detach())

    model, stage, _ = one_stage(meth, model, run, tok, compare, cfg, 2, between=record)
    assert model.base_model.active_adapters == ["stage1", "stage2"]  # stage 1's adapter stays in the forward
    moved = {n for n, p in model.named_parameters() if not torch.equal(bits(p), after1[n])}
    assert moved and all(".stage2." in n for n in moved)  # only the new adapter trained
    assert any("lora_B.stage2" in n for n in moved) and any("lora_A.stage2" in n for n in moved)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".stage2." not in n)
    assert float(olora_mod.orthogonality_penalty(model, "stage2", ["stage1"]).detach()) < overlap["start"]
    # the adapter of stage 1 contributes to the output: switching it off changes the logits
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.stage1" in n:
                p.add_(1.0)
        both = model(input_ids=x).logits
        model.base_model.set_adapter(["stage2"])
        only2 = model(input_ids=x).logits
    assert (both - only2).abs().max() > 1e-3


# --- EWC ----------------------------------------------------------------------------------


def test_ewc_fisher_is_the_mean_squared_per_example_gradient(tok, data):
    parity, _ = data
    meth, model, _ = fresh(tok, "ewc")
    batch = T.collate(parity[:3], tok.pad_token_id)
    fisher, n = meth.compute_fisher(model, [batch])
    assert n == 3
    named = dict(model.named_parameters())
    ref = {k: torch.zeros_like(p) for k, p in named.items()}
    for ex in parity[:3]:  # by hand: one example at a time, squared gradient, mean
        model.zero_grad()
        T.lm_loss(model, T.collate([ex], tok.pad_token_id)).backward()
        for k, p in named.items():
            ref[k] += p.grad ** 2 / 3
    model.zero_grad()
    for k in named:
        torch.testing.assert_close(fisher[k], ref[k], rtol=1e-4, atol=1e-12)
        assert (fisher[k] >= 0).all()
    # nonzero where gradients flowed (in this model every tensor gets a gradient)
    assert all(float(f.sum()) > 0 for f in fisher.values())
    norm = make_method("ewc", {"normalize": "max"})  # fisher_source sample: the stage's 3 examples, all drawn
    norm.pad_id = tok.pad_token_id
    norm.stage_end(model, stage_view(None, 1, TrainConfig(batch_size=3), examples=parity[:3]))
    assert norm.stats[0]["samples"] == 3
    assert max(float(f.max()) for f in norm.fisher.values()) == 1.0
    torch.testing.assert_close(norm.fisher[name := "model.norm.weight"], fisher[name] / norm.stats[0]["max"])
    fb, nb = make_method("ewc", {"fisher_mode": "batch"}).compute_fisher(model, [batch, batch])
    assert nb == 2
    model.zero_grad()
    T.lm_loss(model, batch).backward()
    torch.testing.assert_close(fb["model.layers.0.self_attn.q_proj.weight"],
                               named["model.layers.0.self_attn.q_proj.weight"].grad ** 2, rtol=1e-4, atol=1e-12)


def test_ewc_penalty_zero_at_anchor_and_online_fisher_and_resume(tok, data):
    parity, compare = data
    meth, model, run = fresh(tok, "ewc", {"ewc_lambda": 50.0, "gamma": 0.5, "fisher_batches": 2})
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    assert meth.stats[0]["samples"] == 8  # 2 micro-batches of 4 examples drawn from the stage's training set
    f1 = {k: v.clone() for k, v in meth.fisher.items()}
    assert set(f1) == {n for n, _ in model.named_parameters()}
    assert all((f >= 0).all() and float(f.sum()) > 0 for f in f1.values())

    stage = stage_view(run, 2, cfg)
    meth.stage_start(model, stage)
    pen = meth.extra_loss(model, T.collate(compare[:4], tok.pad_token_id), stage, None)
    assert float(pen.detach()) == 0.0  # theta = theta*
    named = dict(model.named_parameters())
    name = "model.layers.1.mlp.up_proj.weight"
    saved = {n: p.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        named[name].add_(0.01)
    pen = meth.penalty(model)
    by_hand = 0.5 * 50.0 * float((f1[name] * 0.01 ** 2).sum())
    assert float(pen.detach()) == pytest.approx(by_hand, rel=1e-3)
    pen.backward()  # gradient lambda * F * (theta - theta*) on the moved tensor, 0 elsewhere
    torch.testing.assert_close(named[name].grad, 50.0 * f1[name] * 0.01, rtol=1e-3, atol=1e-12)
    assert float(named["model.layers.0.mlp.up_proj.weight"].grad.abs().sum()) == 0.0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        named[name].copy_(saved[name])

    # resume: a fresh EWC from state_dict, on the restored weights, gives the same penalty
    state = meth.state_dict()
    again = make_method("ewc", {"ewc_lambda": 50.0, "gamma": 0.5, "fisher_batches": 2})
    again.load_state_dict(state)
    again.stage_start(model, stage_view(run, 2, cfg))
    with torch.no_grad():
        named["model.norm.weight"].add_(0.1)
    assert float(again.penalty(model).detach()) == pytest.approx(float(meth.penalty(model).detach()), rel=1e-6) and float(meth.penalty(model).detach()) > 0
    with torch.no_grad():
        named["model.norm.weight"].copy_(saved["model.norm.weight"])

    # online accumulation: F <- gamma * F_1 + F_2 (F_2 on stage 2's drawn batches at theta_2)
    captured = {}

    def keep_batches(m, st):
        real = meth.stage_end

        def spy(m2, st2):
            captured["f2"], _ = meth.compute_fisher(m2, [T.collate(b, tok.pad_token_id) for b in meth.fisher_examples(st2)])
            return real(m2, st2)
        meth.stage_end = spy

    model, _, _ = one_stage(meth, model, run, tok, compare, cfg, 2, between=keep_batches)
    for k in f1:
        torch.testing.assert_close(meth.fisher[k], 0.5 * f1[k] + captured["f2"][k], rtol=1e-5, atol=1e-12)


# --- replay -------------------------------------------------------------------------------


def test_replay_buffer_share_and_only_past_tasks(tok, data, monkeypatch):
    parity, compare = data
    meth, model, run = fresh(tok, "replay", {"m": 6, "ratio": 0.25})
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=6)
    calls = []
    real = meth.batch

    def spy(examples, stage):
        out = real(examples, stage)
        calls.append((stage.stage, len(examples), list(meth.last_replay), list(meth.last_task_of_replay)))
        assert out == list(examples) + meth.last_replay  # the loop trains on the new ones, then the replayed
        meth.last_replay, meth.last_task_of_replay = [], []
        return out

    monkeypatch.setattr(meth, "batch", spy)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    assert all(not rep for s, _, rep, _ in calls if s == 1)  # nothing to replay in stage 1
    buf = meth.buffers["t1"]
    assert len(buf) == 6 and all(ex in parity for ex in buf)  # m examples, all of task 1's training data
    assert len({tuple(e.input_ids) for e in buf}) == 6
    model, _, _ = one_stage(meth, model, run, tok, compare, cfg, 2)
    stage2 = [c for c in calls if c[0] == 2]
    assert len(stage2) == 3
    for _, B, rep, tasks in stage2:
        assert len(rep) == round(0.25 * B / 0.75) == 2  # 2 of 8 = the configured share 0.25
        assert all(ex in buf for ex in rep) and tasks == ["t1", "t1"]  # past examples only
    assert set(meth.buffers) == {"t1", "t2"} and all(ex in compare for ex in meth.buffers["t2"])
    # seeded: the same run draws the same replay examples
    meth2, model2, run2 = fresh(tok, "replay", {"m": 6, "ratio": 0.25})
    model2, _, _ = one_stage(meth2, model2, run2, tok, parity, cfg, 1)
    assert meth2.buffers["t1"] == buf


def test_replay_first_selection_keeps_the_first_m_seen(tok, data):
    parity, _ = data
    meth, model, run = fresh(tok, "replay", {"m": 5, "selection": "first"})
    stage = stage_view(run, 1, TrainConfig())
    meth.stage_start(model, stage)
    for i in (0, 4, 8):
        meth.batch(parity[i:i + 4], stage)
    meth.stage_end(model, stage)
    assert meth.buffers["t1"] == parity[:5]


@pytest.mark.parametrize("weighting", ["mixed_mean", "scaled"])
def test_replay_loss_equals_the_mean_over_the_mixed_batch(tok, data, weighting):
    parity, compare = data
    meth, model, run = fresh(tok, "replay", {"m": 8, "ratio": 0.4, "weighting": weighting})
    cfg = TrainConfig(lr=1e-2, steps=2, batch_size=4)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    stage = stage_view(run, 2, cfg)
    meth.stage_start(model, stage)
    new = compare[:6]
    trained = meth.batch(new, stage)  # what the loop does: the batch hook, collate, lm_loss, extra_loss
    batch = T.collate(trained, tok.pad_token_id)
    out = T.lm_loss(model, batch, return_forward=True)
    extra = meth.extra_loss(model, batch, stage, out)
    total = out.loss if extra is None else out.loss + extra
    rep = meth.last_replay
    assert trained == (new + rep if weighting == "mixed_mean" else new)
    assert len(rep) == 4  # round(0.4 * 6 / 0.6)
    mixed = T.collate(new + rep, tok.pad_token_id)
    ref = T.lm_loss(model, mixed)
    n_new = int((T.collate(new, tok.pad_token_id)["labels"][:, 1:] != T.IGNORE).sum())
    n_rep = int((mixed["labels"][:, 1:] != T.IGNORE).sum()) - n_new
    scale = 1.0 if weighting == "mixed_mean" else (n_new + n_rep) / n_new
    torch.testing.assert_close(total, ref * scale, rtol=1e-5, atol=1e-6)
    named = dict(model.named_parameters())
    name = "model.layers.0.self_attn.v_proj.weight"
    g_total = torch.autograd.grad(total, named[name])[0]
    g_ref = torch.autograd.grad(ref * scale, named[name])[0]
    torch.testing.assert_close(g_total, g_ref, rtol=1e-4, atol=1e-7)
    meth.stage_end(model, stage)


def test_replay_wraps_a_base_method(tok, data):
    parity, compare = data
    meth, model, run = fresh(tok, "replay", {"m": 4, "base": "lora", "base_options": {"r": 2, "alpha": 4, "dropout": 0.0}})
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    cfg = TrainConfig(lr=1e-2, steps=2, batch_size=4)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    model, _, _ = one_stage(meth, model, run, tok, compare, cfg, 2)
    # what the results record: the base method's count, here LoRA's adapter entries
    lora_entries = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    recorded = call_hook(meth, "trainable_params", model)
    assert (count_trainable(model) if recorded is None else recorded) == lora_entries > 0
    assert count_trainable(model) < 0.2 * sum(p.numel() for p in model.parameters())
    with pytest.raises(Exception, match="unknown method"):
        make_method("replay", {"base": "no_such_method"})
    with pytest.raises(Exception, match=r"replay base \(lora options\)"):
        make_method("replay", {"base": "lora", "base_options": {"r": -1}})


def test_replay_of_general_data_from_stage_one(tok, data, monkeypatch):
    parity, compare = data
    torch.manual_seed(0)
    meth = make_method("replay", {"m": 6, "ratio": 0.25, "general_task": "gen", "general_m": 5})
    assert meth.needs_tasks() == ["gen"]  # the loop checks it exists before the run
    asked = []

    def examples(task):
        asked.append(task)
        return compare

    run = RunContext(method="replay", seed=0, tasks=["t1", "t2"], device=CPU, tokenizer=tok, examples=examples)
    model = meth.setup(models.build_tiny_model(0, len(tok)), run)
    assert asked == ["gen"] and len(meth.general) == 5 and all(ex in compare for ex in meth.general)
    cfg = TrainConfig(lr=1e-2, steps=2, batch_size=6)
    draws = []
    real = meth.batch

    def spy(examples, stage):
        out = real(examples, stage)
        draws.append((stage.stage, len(examples), list(meth.last_task_of_replay)))
        return out

    monkeypatch.setattr(meth, "batch", spy)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    for stage, B, tasks in draws:  # stage 1 already replays: general data only
        assert len(tasks) == round(0.25 * B / 0.75) and set(tasks) == {"general:gen"}
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 2)
    pooled = {t for s, _, tasks in draws if s == 2 for t in tasks}
    assert pooled <= {"general:gen", "t1"} and pooled  # stage 2 draws from task 1's buffer and the general data
    # seeded: a second setup keeps the same general examples
    again = make_method("replay", {"m": 6, "general_task": "gen", "general_m": 5})
    again.setup(models.build_tiny_model(0, len(tok)), run)
    assert again.general == meth.general


# --- end to end: a 2-stage run of every method, then a resume after stage 1 -----------------


def test_two_stage_run_and_resume(tmp_path):
    methods = [
        {"name": "olora", "options": {"r": 4, "alpha": 8}, "train": {"lr": 1e-2}},
        {"name": "ewc", "options": {"ewc_lambda": 100.0, "fisher_batches": 2}},
        {"name": "replay", "options": {"m": 8}},
        {"name": "replay", "label": "replay-lora", "options": {"m": 8, "base": "lora", "base_options": {"r": 4, "alpha": 8}},
         "train": {"lr": 1e-2}},
        {"name": "replay", "label": "replay-general", "options": {"m": 8, "general_task": "tiny_copy", "general_m": 6}},
    ]
    res = two_stage_run_and_resume(tmp_path, methods)
    seeds = {m: res["methods"][m]["seeds"]["0"] for m in res["methods"]}
    assert seeds["olora"]["trainable_params"] < seeds["ewc"]["trainable_params"]
    # replaying general data from stage 1 changes stage 1's training
    assert seeds["replay-general"]["stages"][0]["first_loss"] != seeds["replay"]["stages"][0]["first_loss"]


def test_replay_general_task_must_exist_before_anything_runs(tmp_path, run_cli):
    cfg = {"name": "g", "model": "tiny", "tasks": ["tiny_parity"], "task_dirs": [str(REPO / "configs" / "tiny_tasks")],
           "methods": [{"name": "replay", "options": {"general_task": "no_such_task"}}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("run", tmp_path / "g.yaml", "--output-dir", tmp_path / "out")
    assert code == 2 and "needs task 'no_such_task'" in err and "tiny_copy" in err
    assert not (tmp_path / "out").exists()
