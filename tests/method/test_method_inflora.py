"""InfLoRA (methods/inflora.py) on the tiny Llama through the loop's real stage driver and
train_stage (AdamW with weight decay, clipping, accumulation 2), and its GPM update on
hand-made second-moment matrices."""

import math
import sys

import pytest
import torch

from clbench.method import RunContext, call_hook, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.run import models
from clbench.training.stage import start_stage
from clbench.training.train import collate, tokenize, train_stage
from conftest import REPO, two_stage_run_and_resume
from harness import cpu_rt

load_method_file(REPO / "methods" / "inflora.py")
from clbench_builtin.methods import inflora as inf  # noqa: E402  (after the loads above)

STAGE1 = [
    ("Number: 12\nEven or odd?\nAnswer:", " even"),
    ("Number: 7\nEven or odd?\nAnswer:", " odd"),
    ("Number: 30\nEven or odd?\nAnswer:", " even"),
    ("Number: 41\nEven or odd?\nAnswer:", " odd"),
    ("Number: 5\nEven or odd?\nAnswer:", " odd"),
    ("Number: 88\nEven or odd?\nAnswer:", " even"),
]
STAGE2 = [
    ("Review: great fun\nSentiment:", " positive"),
    ("Review: dull and slow\nSentiment:", " negative"),
    ("Copy: abc\nAnswer:", " abc"),
    ("Copy: 4421\nAnswer:", " 4421"),
    ("Which is larger, 3 or 9?\nAnswer:", " second"),
    ("Which is larger, 8 or 2?\nAnswer:", " first"),
]
CPU = torch.device("cpu")
CFG = TrainConfig(lr=1e-2, steps=3, batch_size=4, grad_accum=2, weight_decay=0.1, max_grad_norm=0.5, max_length=64)
OPTS = {"r": 4, "alpha": 8, "eps": 0.9}


def rotation(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def test_gpm_update_counts_the_authors_way():
    """S(H)^2 = 16, 4, 1 (ratios .762, .952, 1): eps .9 keeps 1 direction, .96 keeps 2 (the count
    of cumulative ratios below eps). Then with M = q0 and H2 with S^2 9 (along q0), 4, 1: the
    captured energy starts at 9/14 = .643 < .9, one more direction (q3) makes it .929."""
    q = rotation(6)
    h = q @ torch.diag(torch.tensor([4.0, 2, 1, 0, 0, 0], dtype=torch.float64)) @ q.T
    m = inf.gpm_update(None, h, 0.9)
    assert m.shape == (6, 1) and abs(float(m[:, 0] @ q[:, 0])) == pytest.approx(1, abs=1e-12)
    assert inf.gpm_update(None, h, 0.96).shape == (6, 2)
    h2 = q @ torch.diag(torch.tensor([3.0, 0, 0, 2, 1, 0], dtype=torch.float64)) @ q.T
    m2 = inf.gpm_update(m, h2, 0.9)
    assert m2.shape == (6, 2) and torch.equal(m2[:, :1], m)
    assert abs(float(m2[:, 1] @ q[:, 3])) == pytest.approx(1, abs=1e-12)
    assert torch.allclose(m2.T @ m2, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert inf.gpm_update(m, h2, 0.6) is m  # 9/14 already >= .6: M unchanged
    assert inf.threshold(0.9, 1, 3) == 0.9 and inf.threshold(0.9, 3, 3) == pytest.approx(0.9 + 0.1 * 2 / 3)


@pytest.fixture(scope="module")
def data(tok):
    return tokenize(STAGE1, tok, 64), tokenize(STAGE2, tok, 64)


def start(meth, model, run, t, examples, tok):
    return start_stage(model, meth, examples, CFG.model_copy(), run, t, f"t{t}", cpu_rt(tok))


def train(meth, model, stage, tok):
    return train_stage(model, meth, list(stage.examples), stage.train_config, stage, cpu_rt(tok))


def lora_names(model):
    names = {mod: n for n, mod in model.named_modules()}
    return [(names[layer], layer) for layer in inf.lora_layers(model)]


def stage_inputs(model, examples, tok):
    """The non-padding inputs of every LoRA layer on `examples` (the test's own hooks), float64."""
    got, handles = {}, []
    batch = collate(list(examples), tok.pad_token_id)
    mask = batch["attention_mask"].bool()
    for n, layer in lora_names(model):
        handles.append(layer.register_forward_pre_hook(lambda mod, args, n=n: got.__setitem__(n, args[0][mask].double())))
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("init", ["random", "svd"])
def test_stage_two_adapter_avoids_stage_one_inputs(tok, data, init, one_thread):
    ex1, ex2 = data
    meth = make_method("inflora", {**OPTS, "init": init})
    run = RunContext(method="inflora", seed=0, tasks=["a", "b"], device=CPU, tokenizer=tok)
    model = meth.setup(models.build_tiny_model(0, len(tok)), run)
    model, stage = start(meth, model, run, 1, ex1, tok)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    train(meth, model, stage, tok)
    model = call_hook(meth, "stage_end", model, stage)
    layers = lora_names(model)
    assert len(layers) == 4  # q and v of 2 layers

    # M: orthonormal, a proper subspace, one per module input (q and v read the same tensor)
    for n, _ in layers:
        m = meth.M[n]
        assert 1 <= m.shape[1] < m.shape[0]
        assert torch.allclose(m.T @ m, torch.eye(m.shape[1]), atol=1e-5), n
    for i in range(2):
        q, v = (meth.M[f"base_model.model.model.layers.{i}.self_attn.{p}_proj"] for p in "qv")
        assert torch.equal(q, v)

    x1 = stage_inputs(model, ex1, tok)
    model, stage = start(meth, model, run, 2, ex2, tok)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if not (".stage2." in n and "lora_B" in n)}
    trained_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained_names and all(".stage2." in n and "lora_B" in n for n in trained_names)
    for n, layer in layers:
        a2, m = layer.lora_A["stage2"].weight.detach(), meth.M[n]
        assert (a2 @ m).norm() <= 1e-5 * a2.norm(), n
        assert torch.allclose(a2.norm(dim=1), torch.full((a2.shape[0],), 1 / math.sqrt(3)), atol=1e-6), n
    train(meth, model, stage, tok)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} moved"
        else:
            assert p.abs().max() > 0, f"{n} did not train"

    # stage 1's inputs, split into their part in span(M) and the rest: the new adapter's output
    # (peft's own stage2 modules) vanishes on the first and not on the second
    for n, layer in layers:
        x, m = x1[n].float(), meth.M[n]
        inside = x @ m @ m.T
        outside = x - inside

        def delta(z):
            return layer.lora_B["stage2"](layer.lora_A["stage2"](layer.lora_dropout["stage2"](z))) * layer.scaling["stage2"]

        with torch.no_grad():
            d_in, d_out = delta(inside).norm() / inside.norm(), delta(outside).norm() / outside.norm()
        assert d_out > 0 and d_in <= 1e-4 * d_out, (n, float(d_in), float(d_out))


def test_moments_use_non_padding_positions_only(tok, data, one_thread):
    """H from batches of 4 (padded) equals H from single examples (no padding)."""
    ex1, _ = data
    meth = make_method("inflora", OPTS)
    run = RunContext(method="inflora", seed=0, tasks=["a"], device=CPU, tokenizer=tok)
    model = meth.setup(models.build_tiny_model(0, len(tok)), run)
    import contextlib

    padded = inf.input_moments(model, ex1, 4, tok.pad_token_id, contextlib.nullcontext)
    single = inf.input_moments(model, ex1, 1, tok.pad_token_id, contextlib.nullcontext)
    assert len({len(e.input_ids) for e in ex1}) > 1  # the batches of 4 do pad
    assert set(padded) == set(single) and len(padded) == 4
    for n in padded:
        assert torch.allclose(padded[n][0], single[n][0], rtol=1e-5, atol=1e-7), n


def test_two_stage_run_and_resume(tmp_path, one_thread):
    two_stage_run_and_resume(tmp_path, [{"name": "inflora", "options": {"eps": 0.9}},
                                        {"name": "inflora", "label": "inflora_svd", "options": {"init": "svd", "max_batches": 1}}])


def test_max_batches_draws_one_seeded_subset_for_both_passes(tok, data, monkeypatch, one_thread):
    """max_batches=1 with batch size 4: each pass sees 4 of the stage's 6 examples, the same 4
    at stage start (init svd) and stage end."""
    ex1, _ = data
    meth = make_method("inflora", {**OPTS, "init": "svd", "max_batches": 1})
    mod = sys.modules[type(meth).__module__]  # the module of the registered class (a CLI run re-imports the file)
    seen, real = [], mod.input_moments
    monkeypatch.setattr(mod, "input_moments", lambda model, examples, *a: seen.append(list(examples)) or real(model, examples, *a))
    run = RunContext(method="inflora", seed=0, tasks=["a"], device=CPU, tokenizer=tok)
    model = meth.setup(models.build_tiny_model(0, len(tok)), run)
    model, stage = start(meth, model, run, 1, ex1, tok)
    train(meth, model, stage, tok)
    call_hook(meth, "stage_end", model, stage)
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == 4
    assert all(e in ex1 for e in seen[0]) and len({id(e) for e in seen[0]}) == 4
