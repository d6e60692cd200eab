"""N-LoRA: the l1 penalty on the current stage's update equals an independent dense computation
and has the hand-derived gradient; the authors' r x r variant is refused for non-square modules;
through the loop's real train_stage the earlier adapters and the base weights stay bit-identical;
a 2-stage CLI run resumed after stage 1 repeats exactly."""

import re

import pytest
import torch

from clbench.method import MethodError, load_method_file
from clbench.config import TrainConfig
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import compare, fresh, one_stage, parity, stage_view

load_method_file(REPO / "methods" / "nlora.py")

PARITY = parity(20)
COMPARE = compare(20)

pytestmark = pytest.mark.usefixtures("one_thread")


def adapter_pairs(model, adapter):
    """{module name: (A, B)} of one adapter, found by parameter name (independent of the method's helpers)."""
    named = dict(model.named_parameters())
    out = {}
    for n, p in named.items():
        m = re.fullmatch(rf"(.*)\.lora_A\.{adapter}\.weight", n)
        if m:
            out[m.group(1)] = (p, named[f"{m.group(1)}.lora_B.{adapter}.weight"])
    return out


def randomize(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in adapter_pairs(model, adapter).values():
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(torch.randn(b.shape, generator=g))


def test_penalty_is_dense_l1_of_BA_and_its_gradient_is_sign_BA_A_T(tok):
    meth, model, run = fresh(tok, "nlora", {"r": 4, "alpha": 8, "dropout": 0.0, "lambda1": 0.7})
    stage = stage_view(run, 2)
    model = meth.stage_start(model, stage)
    randomize(model, "stage1", 1)
    randomize(model, "stage2", 2)
    pairs = adapter_pairs(model, "stage2")
    assert len(pairs) == 4  # q_proj and v_proj of 2 layers; v_proj is 64 -> 32 (grouped-query attention)
    # by hand, in float64: lambda1 * sum over modules of sum_ij |(B A)_ij|; the earlier adapter does not count
    expected = 0.7 * sum(float((b.double() @ a.double()).abs().sum().detach()) for a, b in pairs.values())
    pen = meth.extra_loss(model, None, stage, None)
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-5)
    pen.backward()
    for name, (a, b) in pairs.items():
        s = torch.sign(b.double() @ a.double())
        torch.testing.assert_close(b.grad.double(), 0.7 * s @ a.double().T, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a.grad.double(), 0.7 * b.double().T @ s, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in adapter_pairs(model, "stage1").values():
        assert a.grad is None and b.grad is None and not a.requires_grad and not b.requires_grad
    # stage 1 is penalised too (unlike O-LoRA's orthogonality term, which needs an earlier adapter)
    model = meth.stage_start(model, stage_view(run, 1))
    one = adapter_pairs(model, "stage1")
    with torch.no_grad():
        assert float(meth.extra_loss(model, None, stage_view(run, 1), None)) == pytest.approx(
            0.7 * sum(float((b.double() @ a.double()).abs().sum()) for a, b in one.values()), rel=1e-5)
        # at setup B = 0, so Delta W = 0: no penalty
        meth0, model0, run0 = fresh(tok, "nlora", {"r": 4, "alpha": 8})
        assert float(meth0.extra_loss(model0, None, stage_view(run0, 1), None)) == 0.0


def test_code_penalty_is_the_r_by_r_product_and_refused_for_non_square_modules(tok):
    with pytest.raises(MethodError, match=r"v_proj \(64 -> 32\).*penalty: delta_w"):
        fresh(tok, "nlora", {"penalty": "code"})
    meth, model, run = fresh(tok, "nlora", {"r": 4, "alpha": 8, "penalty": "code", "target_modules": ["q_proj"], "lambda1": 0.3})
    stage = stage_view(run, 2)
    model = meth.stage_start(model, stage)
    randomize(model, "stage2", 3)
    pairs = adapter_pairs(model, "stage2")
    assert len(pairs) == 2
    # A_w (r x in) @ B_w (out x r) is r x r; no alpha / r
    with torch.no_grad():
        expected = 0.3 * sum(float((a.double() @ b.double()).abs().sum()) for a, b in pairs.values())
        assert all((a @ b).shape == (4, 4) for a, b in pairs.values())
        assert float(meth.extra_loss(model, None, stage, None)) == pytest.approx(expected, rel=1e-5)


def test_earlier_adapters_and_base_bit_identical_and_penalty_sparsifies(tok):
    parity, compare = T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64)
    cfg = TrainConfig(lr=2e-2, steps=4, batch_size=4, weight_decay=0.1)
    l1 = {}
    for lam in (0.0, 2.0):
        meth, model, run = fresh(tok, "nlora", {"r": 4, "alpha": 8, "lambda1": lam}, tasks=("t1", "t2", "t3"))
        model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
        after1 = {n: p.detach().clone() for n, p in model.named_parameters()}
        model, _, _ = one_stage(meth, model, run, tok, compare, cfg, 2)
        assert model.base_model.active_adapters == ["stage1", "stage2"]
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, after1[n])}
        assert moved and all(".stage2." in n for n in moved)  # stage 1's adapter, stage 3's and the base: untouched
        assert any("lora_A.stage2" in n for n in moved) and any("lora_B.stage2" in n for n in moved)
        l1[lam] = sum(float((b @ a).abs().sum().detach()) for a, b in adapter_pairs(model, "stage2").values())
    assert 0 < l1[2.0] < l1[0.0]  # same seed and data: the penalty shrinks |Delta W_2|_1


def test_two_stage_run_and_resume(tmp_path):
    methods = [
        {"name": "nlora", "options": {"r": 4, "alpha": 8, "lambda1": 1.0}, "train": {"lr": 1e-2}},
        {"name": "nlora", "label": "nlora-code", "options": {"r": 4, "alpha": 8, "penalty": "code",
                                                             "target_modules": ["q_proj", "o_proj"]},
         "train": {"lr": 1e-2}},
    ]
    res = two_stage_run_and_resume(tmp_path, methods)
    seeds = {m: res["methods"][m]["seeds"]["0"] for m in res["methods"]}
    # one rank-4 adapter trains at a time: A (4 x 64) and B (64 x 4 for q, o; 32 x 4 for v) per module, 2 layers
    assert seeds["nlora"]["trainable_params"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert seeds["nlora-code"]["trainable_params"] == 4 * (4 * 64 + 64 * 4)
