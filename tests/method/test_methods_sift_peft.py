"""SIFT, AdaLoRA and MiSS/Bone on the tiny model: the invariants each method promises, checked
through the real training loop (clbench.training.train.train_stage) and one 2-stage run of the CLI."""

import copy
import csv
from pathlib import Path

import pytest
import torch
import yaml

from clbench.method import MethodError, call_hook, default_param_groups, load_method_file
from clbench.config import TrainConfig, TrainOverrides
from clbench.run import models
from clbench.training.stage import start_stage
import clbench.training.train as T
from harness import bits, cpu_rt, fresh

REPO = Path(__file__).resolve().parents[2]
for _f in ("sift", "adalora", "miss"):
    load_method_file(REPO / "methods" / f"{_f}.py")

from clbench_methods.sift import budget  # noqa: E402  (registered by load_method_file above)

PAIRS = [(f"Number: {i}\nEven or odd?\nAnswer:", " even" if i % 2 == 0 else " odd") for i in range(24)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; `tok` comes from there too


@pytest.fixture(scope="module")
def examples(tok):
    return T.tokenize(PAIRS, tok, 64)


def run_stage(meth, model, run, examples, tok, cfg, t=1, autocast=None, monkeypatch=None):
    """clbench.training.stage.run_stage; returns (model, optimizer the loop built)."""
    from clbench.training.stage import run_stage as stage_run

    built = []
    if monkeypatch is not None:
        real = T.make_optimizer
        monkeypatch.setattr(T, "make_optimizer", lambda groups, c, *a: built.append(real(groups, c, *a)) or built[-1])
    model, _, _ = stage_run(model, meth, examples, cfg, run, t, f"t{t}", cpu_rt(tok, autocast))
    return model, (built[-1] if built else None)


def one_backward(meth, model, run, examples, tok, cfg):
    model, stage = start_stage(model, meth, examples[:20], cfg.merged(TrainOverrides(steps=5)), run, 1, "t1", cpu_rt(tok))
    groups = call_hook(meth, "param_groups", model, stage) or default_param_groups(model, cfg.weight_decay)
    batch = T.collate(examples[:4], tok.pad_token_id)
    out = T.lm_loss(model, batch, return_forward=True)
    extra = call_hook(meth, "extra_loss", model, batch, stage, out)
    (out.loss if extra is None else out.loss + extra).backward()
    call_hook(meth, "after_backward", model, stage)
    return model, groups


# --- every method: after one backward, gradients only where the method trains -------------


# sift: its selection step trains only with train_selection_step (by default it is discarded, as
# the authors' code does: test_method_defaults.py)
@pytest.mark.parametrize("name,options", [("sift", {"train_selection_step": True}), ("adalora", {}), ("miss", {"r": 8}),
                                          ("bone", {"r": 8})])
def test_gradients_only_where_the_method_trains(tok, examples, name, options):
    meth, model, run = fresh(tok, name, options)
    model, groups = one_backward(meth, model, run, examples, tok, TrainConfig(lr=1e-3, steps=5))
    opt_ids = {id(p) for g in groups for p in g["params"]}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    if name == "sift":
        assert with_grad == set()  # the dense gradients of W were gathered and freed
        assert opt_ids == {id(d) for d in meth.deltas.values()}
        for n, d in meth.deltas.items():
            assert d.grad is not None and d.grad.shape == (budget(meth.targets[n].numel(), 0.05),)
            assert d.grad.abs().sum() > 0
    else:
        key = "miss_block" if name in ("miss", "bone") else "lora_"
        assert with_grad and all(key in n for n in with_grad)
        named = dict(model.named_parameters())
        assert {id(named[n]) for n in with_grad} <= opt_ids
        assert all(key in n for n, p in model.named_parameters() if id(p) in opt_ids)


# --- SIFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decay_selected", [False, True])
def test_sift_sparse_optimizer_state_and_frozen_entries(tok, examples, monkeypatch, decay_selected):
    """bf16 autocast, AdamW with weight decay, a clip that binds, gradient accumulation 2."""
    meth, model, run = fresh(tok, "sift", {"decay_selected": decay_selected})
    before = {n: bits(p) for n, p in model.named_parameters()}
    dense_grads_seen = []
    real_after_step = meth.after_step

    def spy_after_step(m, stage):  # just after the optimizer step: no parameter keeps a dense gradient
        dense_grads_seen.extend(n for n, p in m.named_parameters() if p.grad is not None)
        real_after_step(m, stage)

    monkeypatch.setattr(meth, "after_step", spy_after_step)
    cfg = TrainConfig(lr=1e-2, steps=4, batch_size=4, grad_accum=2, weight_decay=0.1, max_grad_norm=0.05)
    model, opt = run_stage(meth, model, run, examples, tok, cfg, autocast=torch.bfloat16, monkeypatch=monkeypatch)

    assert dense_grads_seen == []
    # the optimizer holds the deltas only, with exactly k entries of state per target matrix
    deltas = {id(d): n for n, d in meth.deltas.items()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == set(deltas)
    assert len(opt.state) == len(meth.targets) == 14
    for p, st in opt.state.items():
        k = budget(meth.targets[deltas[id(p)]].numel(), 0.05)
        # 4 steps, the first the discarded selection step (train_selection_step false)
        assert st["exp_avg"].numel() == k and st["exp_avg_sq"].numel() == k and int(st["step"]) == 3
    state_floats = sum(v.numel() for st in opt.state.values() for v in st.values() if v.ndim > 0)
    assert state_floats == 2 * meth.trainable_params(model) < 0.11 * sum(p.numel() for p in meth.targets.values())
    print(f"\nSIFT optimizer state: {state_floats} floats for {sum(p.numel() for p in meth.targets.values())} target entries")
    # only selected entries of the targets moved; everything else is bit-identical
    n_changed = 0
    for n, p in model.named_parameters():
        changed = (bits(p) != before[n]).view(-1).nonzero().view(-1)
        if n in meth.targets:
            assert set(changed.tolist()) <= set(meth.idx[n].tolist()), n
            n_changed += changed.numel()
        else:
            assert changed.numel() == 0, n
    assert n_changed > 0.5 * meth.trainable_params(model)
    assert all(float(d.detach().abs().sum()) == 0 for d in meth.deltas.values())  # flushed


def test_sift_hook_gathers_the_dense_gradient(tok, examples):
    """delta.grad equals the dense gradient at idx, summed over gradient-accumulation micro-batches."""
    meth, model, run = fresh(tok, "sift")
    ref = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-3, steps=5)
    model, _ = one_backward(meth, model, run, examples, tok, cfg)  # selects the indices
    for d in meth.deltas.values():
        d.grad = None
    b1, b2 = (T.collate(examples[i:i + 4], tok.pad_token_id) for i in (4, 8))
    for b in (b1, b2):
        (T.lm_loss(model, b) / 2).backward()
        (T.lm_loss(ref, b) / 2).backward()
        assert all(p.grad is None for p in model.parameters())
    refp = dict(ref.named_parameters())
    for n, d in meth.deltas.items():
        torch.testing.assert_close(d.grad, refp[n].grad.view(-1)[meth.idx[n]], rtol=1e-5, atol=1e-7)
        # the indices are the top-k of the selection batch's |grad|: a later batch's |grad| at idx is typical, not required
        assert meth.idx[n].numel() == budget(refp[n].numel(), 0.05)


@pytest.mark.parametrize("train_selection_step,expected_steps", [(True, 3), (False, 2)])
def test_sift_selection_batches(tok, examples, monkeypatch, train_selection_step, expected_steps):
    """selection_batches=2 over 4 steps: steps 1-2 select; step 2 trains only with train_selection_step."""
    meth, model, run = fresh(tok, "sift", {"selection_batches": 2, "train_selection_step": train_selection_step})
    cfg = TrainConfig(lr=1e-2, steps=4, batch_size=4)
    model, opt = run_stage(meth, model, run, examples, tok, cfg, monkeypatch=monkeypatch)
    assert {int(st["step"]) for st in opt.state.values()} == {expected_steps}


def test_sift_reselects_every_stage(tok, examples):
    meth, model, run = fresh(tok, "sift")
    before = {n: bits(p) for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-2, steps=2, batch_size=4)
    model, _ = run_stage(meth, model, run, examples, tok, cfg, t=1)
    first = {n: i.clone() for n, i in meth.idx.items()}
    model, _ = run_stage(meth, model, run, examples[8:], tok, cfg, t=2)
    assert any(not torch.equal(first[n], meth.idx[n]) for n in first)
    # over both stages only entries selected in one of them moved; the rest is bit-identical
    for n, p in model.named_parameters():
        changed = set((bits(p) != before[n]).view(-1).nonzero().view(-1).tolist())
        allowed = set(first[n].tolist()) | set(meth.idx[n].tolist()) if n in meth.targets else set()
        assert changed <= allowed, n


# --- AdaLoRA ------------------------------------------------------------------------------


def test_adalora_rank_budget_shrinks_over_a_stage(tok, examples, monkeypatch):
    meth, model, run = fresh(tok, "adalora", {"tinit": 2, "tfinal": 3, "init_r": 12, "target_r": 8})
    tuner = model.base_model
    calls = []
    real = tuner.update_and_allocate
    monkeypatch.setattr(tuner, "update_and_allocate", lambda step: calls.append(step) or real(step))
    E = {n: p for n, p in model.named_parameters() if "lora_E" in n}
    n_mat = len(E)
    assert n_mat == 14 and meth.rank_pattern(model) is None  # before: every matrix at init_r, nothing masked
    assert sum(p.numel() for p in E.values()) == 12 * n_mat
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    cfg = TrainConfig(lr=1e-2, steps=12, batch_size=4)
    model, _ = run_stage(meth, model, run, examples, tok, cfg)
    assert calls == list(range(12))  # every optimizer step, with the stage's step number
    conf = tuner.peft_config["default"]
    assert (conf.total_step, conf.tinit, conf.tfinal) == (12, 2, 3)
    pattern = meth.rank_pattern(model)
    kept = sum(sum(v) for v in pattern.values())
    assert kept == 8 * n_mat < 12 * n_mat  # the budget shrank from init_r to target_r per matrix on average
    nonzero = sum(int((p != 0).sum()) for p in E.values())
    assert 0 < nonzero <= 8 * n_mat
    ranks = [sum(v) for v in pattern.values()]
    print(f"\nAdaLoRA ranks after the stage: {ranks}")
    # base weights did not move
    after = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert after.keys() == base_before.keys() and all(torch.equal(after[n], base_before[n]) for n in after)


def test_adalora_orth_reg_equals_peft_forward_term(tok, examples):
    meth, model, run = fresh(tok, "adalora", {"dropout": 0.0})
    with torch.no_grad():  # make P, Q clearly non-orthogonal
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.normal_(0, 0.3)
    model.eval()
    batch = T.collate(examples[:4], tok.pad_token_id)
    with_reg = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    plain = T.lm_loss(model, batch)
    extra = meth.extra_loss(model, batch, None, None)
    assert float(extra.detach()) > 0.1
    torch.testing.assert_close(plain + extra, with_reg, rtol=1e-5, atol=1e-5)


def test_adalora_too_short_stage_fails_clearly(tok, examples):
    meth, model, run = fresh(tok, "adalora", {"tinit": 3, "tfinal": 3})
    with pytest.raises(MethodError, match="no budgeting phase"):
        run_stage(meth, model, run, examples, tok, TrainConfig(lr=1e-3, steps=5, batch_size=4))


# --- MiSS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["miss", "bone"])
def test_miss_trains_only_the_adapter(tok, examples, monkeypatch, name):
    meth, model, run = fresh(tok, name, {"r": 8})
    before = {n: bits(p) for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4, weight_decay=0.1)
    model, opt = run_stage(meth, model, run, examples, tok, cfg, autocast=torch.bfloat16, monkeypatch=monkeypatch)
    named = dict(model.named_parameters())
    in_opt = {n for n, p in named.items() if any(p is q for g in opt.param_groups for q in g["params"])}
    assert in_opt and all("miss_block" in n for n in in_opt)
    for n, p in named.items():
        same = torch.equal(bits(p), before[n])
        assert same != ("miss_block" in n), n  # adapters moved, every base weight is bit-identical


# --- end to end ---------------------------------------------------------------------------


def test_two_stage_run_of_the_loop(tmp_path):
    from clbench.cli import main

    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    tiny.pop("stream", None)
    tiny.pop("order", None)
    tasks = ["tiny_parity", "tiny_copy"]
    tiny.update(
        name="sift-peft",
        tasks=tasks,
        task_dirs=[str(REPO / "configs" / "tiny_tasks")],
        methods=[
            {"name": "sift", "options": {"rate": 0.05}},
            {"name": "adalora", "options": {"init_r": 4, "target_r": 2}, "train": {"lr": 1e-2}},
            {"name": "miss", "options": {"r": 8}, "train": {"lr": 1e-2}},
            {"name": "bone", "options": {"r": 8, "variant": "inc"}, "train": {"lr": 1e-2}},
        ],
    )
    tiny["train"].update(steps=4)
    tiny["eval"].update(limit=4, log_samples=False)
    tiny["threads"] = 1
    cfg = tmp_path / "sift_peft.yaml"
    cfg.write_text(yaml.safe_dump(tiny))
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--output-dir", str(out)]) == 0
    with open(out / "matrix.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    T_ = len(tasks)
    for m in ("sift", "adalora", "miss", "bone"):
        mine = [r for r in rows if r["method"] == m]
        assert len(mine) == (T_ + 1) * T_, m
        assert {(int(r["stage"]), r["eval_task"]) for r in mine} == {(s, t) for s in range(T_ + 1) for t in tasks}
    with open(out / "summary.csv", newline="") as f:
        summ = {r["method"]: r for r in csv.DictReader(f)}
    n_ft = sum(p.numel() for p in models.build_tiny_model(0, 512).parameters())
    assert 0 < int(summ["sift"]["trainable_params"]) < 0.06 * n_ft
