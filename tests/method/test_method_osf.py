"""OSF (methods/osf.py) on the tiny Llama through the loop's real stage driver and train_stage.

The tiny Llama's targets cover every shape case of peft's projectors: q/o 64x64 (square), k/v
32x64 (V_high stored), gate/up 128x64 (U_high stored), down 64x128 (V_high stored). The frozen
subspaces are taken from the test's own float64 SVD of the stage's starting weights, not from
peft's buffers."""


import pytest
import torch

from clbench.method import call_hook, count_trainable, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.training.stage import start_stage
from clbench.training.train import tokenize, train_stage
from conftest import REPO, two_stage_run_and_resume
from harness import MIXED, cpu_rt, fresh

load_method_file(REPO / "methods" / "osf.py")
from clbench_builtin.methods import osf as osf_mod  # noqa: E402  (after the loads above)

# AdamW with weight decay, clipping and accumulation, as the loop trains
CFG = TrainConfig(lr=1e-2, steps=3, batch_size=4, grad_accum=2, weight_decay=0.1, max_grad_norm=0.5, max_length=64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def examples(tok):
    return tokenize(MIXED, tok, 64)


def start(meth, model, run, t, examples, tok):
    return start_stage(model, meth, examples, CFG.model_copy(), run, t, f"t{t}", cpu_rt(tok))


def train(meth, model, stage, tok):
    return train_stage(model, meth, list(stage.examples), stage.train_config, stage, cpu_rt(tok))


def target_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS}


def leaks(w0: dict, w1: dict, k: dict):
    """Per target: |U_high^T dW|/|dW|, |dW V_high^T|/|dW| and |U_high^T W1 V_high^T - diag(S_high)|/|S_high|,
    with U_high, S_high, V_high the top-k SVD of the stage's starting weight (float64)."""
    out = {}
    for n, a in w0.items():
        U, S, Vh = torch.linalg.svd(a.double(), full_matrices=False)
        uh, sh, vh = U[:, :k[n]], S[:k[n]], Vh[:k[n]]
        dw = w1[n].double() - a.double()
        assert dw.norm() > 0, f"{n}: nothing trained"
        core = uh.T @ w1[n].double() @ vh.T
        out[n] = ((uh.T @ dw).norm() / dw.norm(), (dw @ vh.T).norm() / dw.norm(),
                  (core - torch.diag(sh)).norm() / sh.norm())
    return out


def run_one_stage(tok, examples, options):
    meth, model, run = fresh(tok, "osf", options, tasks=("a", "b"))
    w0 = target_weights(model)
    model, stage = start(meth, model, run, 1, examples, tok)
    k = {n.removeprefix("base_model.model."): layer.effective_rank["default"] for n, layer in osf_mod.osf_layers(model)}
    train(meth, model, stage, tok)
    model = call_hook(meth, "stage_end", model, stage)
    return leaks(w0, target_weights(model), k), k


def test_reprojection_keeps_the_frozen_subspaces_under_adamw(tok, examples, one_thread):
    """With reproject on, Delta W is orthogonal to U_high on the left and V_high on the right to
    rounding, so the frozen singular directions and values survive the stage (U_high^T W V_high^T
    = diag(S_high)); with peft's gradient projection alone AdamW leaks (the option matters)."""
    on, k = run_one_stage(tok, examples, {"ranks": [0.5, 0.5], "reproject": True})
    assert len(on) == 2 * len(TARGETS)  # every target of both layers
    assert k["model.layers.0.self_attn.k_proj"] == 16 and k["model.layers.0.mlp.down_proj"] == 32  # half of min(out, in)
    for n, (left, right, core) in on.items():
        assert left < 1e-4 and right < 1e-4 and core < 1e-5, (n, left, right, core)
    off, _ = run_one_stage(tok, examples, {"ranks": [0.5, 0.5], "reproject": False})
    worst_on = max(max(v[0], v[1]) for v in on.values())
    worst_off = max(max(v[0], v[1]) for v in off.values())
    assert worst_off > 100 * worst_on and worst_off > 1e-3, (worst_off, worst_on)


def test_merged_weights_equal_w_plus_delta_and_the_model_is_plain(tok, examples, one_thread):
    """stage_end's weights are W + (U_low S_low V_low - U_low0 S_low0 V_low0) for every target,
    every other tensor is unchanged, and the model is the plain transformers model again
    (unload() would have discarded the task)."""
    meth, model, run = fresh(tok, "osf", {"reproject": True}, tasks=("a", "b"))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model, stage = start(meth, model, run, 1, examples, tok)
    train(meth, model, stage, tok)
    delta = {}
    for n, layer in osf_mod.osf_layers(model):
        p = layer.osf_svd_params["default"]
        u0, s0, v0 = (layer._osf_U_low_init["default"], layer._osf_S_low_init["default"], layer._osf_V_low_init["default"])
        delta[n.removeprefix("base_model.model.") + ".weight"] = \
            (p["U_low"] * p["S_low"]) @ p["V_low"] - (u0 * s0) @ v0
    plain = call_hook(meth, "stage_end", model, stage)
    assert type(plain).__name__ == "LlamaForCausalLM" and not osf_mod.osf_layers(plain)
    after = plain.state_dict()
    assert set(after) == set(before)
    for n, b in before.items():
        if n in delta:
            assert delta[n].abs().max() > 1e-4, n
            assert torch.allclose(after[n], b + delta[n].detach(), rtol=0, atol=1e-6), n
        else:
            assert torch.equal(after[n], b), f"{n} changed"


def test_default_schedule_and_trainable_count(tok, examples, one_thread):
    """Default ranks over 3 stages: stage t freezes (t-1)/3 of min(out, in) (stage 1: one
    direction); trainable entries are (out + in + 1)(min - k) per target, as the wrapped model's
    requires_grad count says."""
    meth, model, run = fresh(tok, "osf", {}, tasks=("a", "b", "c"))
    want = {1: {"q_proj": 1, "k_proj": 1}, 2: {"q_proj": 21, "k_proj": 10}, 3: {"q_proj": 42, "k_proj": 21}}
    for t in (1, 2, 3):
        model, stage = start(meth, model, run, t, examples, tok)
        ranks = {n.rsplit(".", 1)[-1]: layer.effective_rank["default"] for n, layer in osf_mod.osf_layers(model)}
        assert {m: ranks[m] for m in want[t]} == want[t]
        q, kk = want[t]["q_proj"], want[t]["k_proj"]
        per_layer = (2 * (64 + 64 + 1) * (64 - q) + 2 * (32 + 64 + 1) * (32 - kk)  # q, o; k, v
                     + 3 * (128 + 64 + 1) * (64 - q))  # gate, up, down: min(out, in) 64, as q
        assert count_trainable(model) == meth.trainable_params(model) == 2 * per_layer
        model = call_hook(meth, "stage_end", model, stage)
        assert meth.trainable_params(model) == 2 * per_layer


def test_ranks_option_is_checked(tok):
    with pytest.raises(Exception, match="ranks has 1 entries"):
        fresh(tok, "osf", {"ranks": [4]}, tasks=("a", "b"))
    with pytest.raises(Exception):
        make_method("osf", {"ranks": [1.5, 2]})


def test_two_stage_run_and_resume(tmp_path, one_thread):
    two_stage_run_and_resume(tmp_path, [{"name": "osf", "train": {"lr": 1e-3}},
                                        {"name": "osf", "label": "osf_reproject", "options": {"reproject": True},
                                         "train": {"lr": 1e-3}}])
