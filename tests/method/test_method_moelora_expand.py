"""MoELoRA with expert expansion: at stage t the layer is the gated sum over the experts of the
trained stages and stage t, one softmax over all of them (an independent float64 computation);
through the loop's train_stage only stage t's experts and router rows move: the earlier stages'
experts and router rows, the later stages' and the base weights stay bit-identical; in mode
single a stage sees only its own experts; a 2-stage CLI run resumed after stage 1 repeats exactly."""

import pytest
import torch

from clbench.method import call_hook, load_method_file
from clbench.config import TrainConfig
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import compare, fresh, one_stage, stage_view
from test_method_moelora import PARITY, hand, layers, randomize

load_method_file(REPO / "methods" / "moelora_expand.py")

COMPARE = compare(16)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stage_t_gates_over_the_trained_stages_and_its_own_experts(tok):
    meth, model, run = fresh(tok, "moelora_expand", {"dropout": 0.0}, tasks=("t1", "t2", "t3"))
    ls = layers(model)
    assert all(len(m.groups) == 3 for m in ls.values())  # one group of experts per stage, all made at setup
    meth.stage_start(model, stage_view(run, 1))
    meth.stage_end(model, stage_view(run, 1))
    meth.stage_start(model, stage_view(run, 2))
    randomize(model, 5)
    for name, layer in ls.items():
        x = torch.randn(2, 4, layer.in_features, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            want, gate = hand(layer, x, [0, 1])  # stage 3's experts are not in the forward
            got, g = layer(x), layer.gates(x)
        assert g.shape[-1] == 8
        torch.testing.assert_close(g.sum(-1), torch.ones(2, 4), msg=name)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)
        assert all(p.requires_grad == (i == 1) for i, grp in enumerate(layer.groups) for p in grp.parameters())
    # mode single: a fresh run of stage 3 sees only its own experts
    meth1, model1, run1 = fresh(tok, "moelora_expand", {"dropout": 0.0}, tasks=("t1", "t2", "t3"))
    meth1.stage_start(model1, stage_view(run1, 3))
    assert {tuple(m.active) for m in layers(model1).values()} == {(2,)}
    assert call_hook(meth, "state_dict") == {"stage": 2, "trained": [1]}


def test_earlier_experts_router_rows_and_base_bit_identical(tok):
    parity, compare = T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64)
    cfg = TrainConfig(lr=2e-2, steps=3, batch_size=4, weight_decay=0.1)
    meth, model, run = fresh(tok, "moelora_expand", tasks=("t1", "t2", "t3"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    moved1 = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved1 and all(".groups.0." in n for n in moved1)
    after1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, stage, _ = one_stage(meth, model, run, tok, compare, cfg, 2)
    moved2 = {n for n, p in model.named_parameters() if not torch.equal(p, after1[n])}
    assert moved2 and all(".groups.1." in n for n in moved2)  # stage 1's experts and router rows: untouched
    for kind in ("lora_A", "lora_B", "lora_router"):
        assert any(n.endswith(kind) for n in moved2), kind
    assert {tuple(m.active) for m in layers(model).values()} == {(0, 1)}
    stats = call_hook(meth, "stage_stats", stage)
    assert 0 < stats["new_expert_share"] < 1 and stats["max_expert_share"] <= 1


def test_two_stage_run_and_resume(tmp_path):
    res = two_stage_run_and_resume(tmp_path, [{"name": "moelora_expand", "train": {"lr": 1e-2}}])
    seed = res["methods"]["moelora_expand"]["seeds"]["0"]
    per = lambda d_in, d_out: 4 * 2 * d_in + 4 * d_out * 2 + 4 * d_in  # noqa: E731  (one stage's group)
    assert seed["trainable_params"] == 2 * (2 * per(64, 64) + 2 * per(64, 32) + 2 * per(64, 128) + per(128, 64))
    assert seed["stages"][0]["method_stats"]["new_expert_share"] == pytest.approx(1.0)
    assert 0 < seed["stages"][1]["method_stats"]["new_expert_share"] < 1
