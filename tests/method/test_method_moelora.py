"""MoELoRA: every adapted layer's output equals an independent float64 computation of
W x + (alpha / r) sum_e softmax(W_g x)_e B_e A_e x with gates summing to 1; the model starts as the
base; through the loop's train_stage the base weights stay bit-identical while the experts and
the router move, and the router diagnostics are reported; the cached generation equals the
uncached one and the split-head training forward equals the full one; a 2-stage CLI run resumed
after stage 1 repeats exactly."""

import math

import pytest
import torch

from clbench.method import MethodError, call_hook, load_method_file
from clbench.config import TrainConfig
from clbench.run import models
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import fresh, one_stage, parity

load_method_file(REPO / "methods" / "moelora.py")

PARITY = parity(16)

pytestmark = pytest.mark.usefixtures("one_thread")


def layers(model):
    """{name: module} of the adapted layers, found by their parameter names (not the method's helpers)."""
    names = {n.split(".groups.")[0] for n, _ in model.named_parameters() if ".groups." in n}
    return {n: model.get_submodule(n) for n in sorted(names)}


def randomize(model, seed, groups=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers(model).values():
            for i, grp in enumerate(m.groups):
                if groups is None or i in groups:
                    for p in (grp.lora_A, grp.lora_B, grp.lora_router):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def hand(layer, x, groups):
    """W x + b + (alpha / r) sum over the experts of `groups` of softmax(router)_e B_e A_e x, float64."""
    x = x.double()
    out = x @ layer.base.weight.double().T
    if layer.base.bias is not None:
        out = out + layer.base.bias.double()
    logits = torch.cat([x @ layer.groups[i].lora_router.double().T for i in groups], -1)
    gate = torch.exp(logits - logits.max(-1, keepdim=True).values)
    gate = gate / gate.sum(-1, keepdim=True)
    delta, j = torch.zeros_like(out), 0
    for i in groups:
        grp = layer.groups[i]
        for e in range(grp.lora_A.shape[0]):
            delta = delta + gate[..., j:j + 1] * (x @ grp.lora_A[e].double().T @ grp.lora_B[e].double().T)
            j += 1
    return out + layer.scaling * delta, gate


def test_output_is_the_gated_sum_of_expert_updates(tok):
    meth, model, run = fresh(tok, "moelora", {"experts": 4, "r": 8, "alpha": 16, "dropout": 0.0})
    ls = layers(model)
    assert len(ls) == 2 * 7  # q, k, v, o, gate, up, down of 2 layers; never the LM head
    assert not any("lm_head" in n for n in ls)
    ids = torch.randint(1, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    base = models.build_tiny_model(0, len(tok))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0 at setup: the model starts as the base
    randomize(model, 1)
    for name, layer in ls.items():
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
        assert layer.scaling == 16 / 8 and layer.groups[0].lora_A.shape[:2] == (4, 2)  # rank 8 split over 4 experts
        with torch.no_grad():
            want, gate = hand(layer, x, [0])
            got = layer(x)
            g = layer.gates(x)
        torch.testing.assert_close(g.sum(-1), torch.ones(3, 5), msg=name)
        torch.testing.assert_close(g.double(), gate, rtol=1e-5, atol=1e-6, msg=name)
        assert float(gate.std()) > 0.05  # the gates are far from uniform: the test sees the router
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(MethodError, match="multiple of experts"):
        fresh(tok, "moelora", {"experts": 3, "r": 8})


def test_training_moves_experts_and_router_only_and_reports_the_router(tok):
    parity = T.tokenize(PARITY, tok, 64)
    cfg = TrainConfig(lr=2e-2, steps=3, batch_size=4, weight_decay=0.1)
    meth, model, run = fresh(tok, "moelora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, stage, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".groups." in n for n in moved)  # base weights, embeddings, norms: bit-identical
    for kind in ("lora_A", "lora_B", "lora_router"):
        assert any(n.endswith(kind) for n in moved), kind
    stats = call_hook(meth, "stage_stats", stage)
    assert 0 < stats["router_entropy"] <= math.log(4) + 1e-6
    assert 0.25 - 1e-6 <= stats["max_expert_share"] <= 1


def test_cached_generation_and_split_head_match_the_full_forward(tok):
    meth, model, run = fresh(tok, "moelora", {"dropout": 0.0})
    randomize(model, 3)
    model.eval()
    ids = torch.randint(1, 200, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
        b = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(a, b)
        labels = ids.clone()
        labels[:, :4] = T.IGNORE
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        split, t1 = T.target_logits(model, batch, head_only_targets=True)
        full, t2 = T.target_logits(model, batch, head_only_targets=False)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(split, full)


def test_two_stage_run_and_resume(tmp_path):
    res = two_stage_run_and_resume(tmp_path, [{"name": "moelora", "train": {"lr": 1e-2}}])
    seed = res["methods"]["moelora"]["seeds"]["0"]
    # per adapted layer: A 4 x 2 x 64, B 4 x out x 2, router 4 x 64; out 64 (q, o), 32 (k, v: grouped-query
    # attention), 128 (gate, up), 64 (down, whose input is 128)
    per = lambda d_in, d_out: 4 * 2 * d_in + 4 * d_out * 2 + 4 * d_in  # noqa: E731
    assert seed["trainable_params"] == 2 * (2 * per(64, 64) + 2 * per(64, 32) + 2 * per(64, 128) + per(128, 64))
    assert "router_entropy" in seed["stages"][1]["method_stats"]
