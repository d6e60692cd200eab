"""Sparse / masked fine-tuning methods (LoTA, HFT, SPAFIT, KS-Lottery) and their shared
machinery (clbench/method/masking.py), on tiny Llamas through the loop's real train_stage.

The hard invariant: entries a method freezes stay BIT-IDENTICAL through a stage under AdamW
(fused, as the loop builds it) with weight decay 0.1, gradient clipping, bf16 autocast and
gradient accumulation 2."""


import pytest
import torch
import yaml

from clbench.method import RunContext, Stage, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.method import protocol
from clbench.method.lm import lm_loss
from clbench.method.masking import MaskedUpdate
from clbench.run import models
from clbench.training import stage as stage_mod
from clbench.training.stage import start_stage
from clbench.training.train import collate, make_optimizer, tokenize, train_stage
from conftest import REPO
from harness import MIXED, cpu_rt

MINE = ("lota", "hft", "spafit", "ks_lottery")
for _f in MINE:
    load_method_file(REPO / "methods" / f"{_f}.py")
from clbench_builtin.methods import lota as lota_mod  # noqa: E402  (after the loads above)
from clbench_builtin.methods import hft as hft_mod  # noqa: E402  (after the loads above)
from clbench_builtin.methods import ks_lottery as ks_mod  # noqa: E402  (after the loads above)

CPU = torch.device("cpu")
BF16 = torch.bfloat16
# weight decay, clipping (max_grad_norm small enough to clip), accumulation 2
CFG = TrainConfig(lr=1e-2, steps=2, batch_size=4, grad_accum=2, weight_decay=0.1, max_grad_norm=0.5, max_length=64)
OPTIONS = {"lota": {"calibration_steps": 1}, "hft": {}, "spafit": {"r": 2, "alpha": 4, "dropout": 0.0},
           "ks_lottery": {"calibration_steps": 2}}


@pytest.fixture(scope="module")
def examples(tok):
    return tokenize(MIXED, tok, 64)


def build(tok, n_layers=2, seed=0):
    """The tiny Llama (tied embeddings, GQA 4/2 heads), optionally deeper."""
    model = models.build_tiny_model(seed, len(tok))
    if n_layers != model.config.num_hidden_layers:
        from transformers import LlamaForCausalLM

        cfg = model.config
        cfg.num_hidden_layers = n_layers
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def make(name, tok, model, options=None, seed=0):
    meth = make_method(name, OPTIONS[name] if options is None else options)
    run = RunContext(method=name, seed=seed, tasks=["a", "b", "c"], device=CPU, tokenizer=tok)
    return meth, meth.setup(model, run), run


def start(meth, model, run, t, examples, tok, cfg=CFG, autocast=BF16):
    """clbench.training.stage.start_stage: stage t's view (its calibrate() runs the loop's train_stage
    densely) and the method's stage_start. Returns (model, stage).
    (bf16 autocast where the invariant is tested; fp32 elsewhere: bf16 matmuls of this tiny
    size are ~50x slower than fp32 on a busy 2-core CPU.)"""
    return start_stage(model, meth, examples, cfg.model_copy(), run, t, f"t{t}", cpu_rt(tok, autocast))


def train(meth, model, stage, tok, autocast=BF16):
    return train_stage(model, meth, list(stage.examples), stage.train_config, stage, cpu_rt(tok, autocast))


def spy_calibration(monkeypatch, seen: dict, check=None):
    """Record the weights each calibration pass (a dense train_stage) leaves, before the method resets them."""
    real = stage_mod.train_stage

    def spy(m, meth, ex, cfg, st, rt, **kw):
        if kw.get("dense") and check is not None:
            check(m, cfg)
        out = real(m, meth, ex, cfg, st, rt, **kw)
        if kw.get("dense"):
            seen.update(params(m))
        return out

    monkeypatch.setattr(stage_mod, "train_stage", spy)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_only_trainable_changed(update: MaskedUpdate, before, after):
    """Frozen entries bit-identical; trainable entries moved (so the check is not vacuous)."""
    moved = 0
    for n, b in before.items():
        a = after[n]
        if n in update.partial:
            m = update.partial[n].expand(b.shape)
            assert torch.equal(a[~m], b[~m]), f"{n}: frozen entries changed"
            moved += int((a[m] != b[m]).any())
        elif n in update.full:
            moved += int(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{n}: frozen tensor changed"
    assert moved > 0, "nothing trained"


# --- shared machinery ----------------------------------------------------------------


def test_fused_adamw_leaves_zero_grad_entries_bit_identical():
    """Zero gradients from the first step on => zero moments => zero Adam update, with the
    fused AdamW the loop builds; the masked decay equals AdamW's own decay on trainable
    entries (reference: a plain AdamW with weight decay on the same gradients, same schedule)."""
    from clbench.training.train import make_scheduler

    cfg = CFG.model_copy(update={"lr_schedule": "linear", "warmup_steps": 2})
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    mask = torch.rand(64, 32) < 0.3
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0.clone())
    upd = MaskedUpdate({"w": mask})
    upd.apply(holder)
    opt = make_optimizer(upd.param_groups(holder, cfg.weight_decay), cfg)
    assert opt.defaults.get("fused") is True and opt.param_groups[0]["weight_decay"] == 0.0
    ref_opt = make_optimizer([{"params": [ref], "weight_decay": cfg.weight_decay}], cfg)
    scheds = [make_scheduler(opt, cfg, 6), make_scheduler(ref_opt, cfg, 6)]
    clock = protocol._Clock()
    stage = Stage(stage=1, task="t", seed=0, run=None, train_config=cfg, generator=None, total_steps=6, clock=clock)
    w = holder.w
    lrs = []
    for step in range(6):
        # both ways the view gives the step's lr: the loop's optimizer value, the schedule
        clock.step, clock.lr = step, (None if step % 2 else opt.param_groups[0]["lr"])
        lrs.append(stage.lr)
        g = torch.randn_like(w) * 10
        w.grad = g.clone()
        w.grad[~mask] = float("inf")  # an inf on a frozen entry must not become NaN
        upd.after_backward(holder, stage)
        ref.grad = torch.where(mask, g, 0.0)
        assert torch.equal(w.grad, ref.grad)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)
        for sc in scheds:
            sc.step()
    assert torch.equal(w.detach()[~mask], w0[~mask])  # frozen: bit-identical
    assert not torch.equal(ref.detach()[~mask], w0[~mask])  # (plain AdamW would decay them)
    assert torch.allclose(w.detach()[mask], ref.detach()[mask], rtol=0, atol=1e-6)  # trainable: AdamW's update
    assert (w.detach()[mask] != w0[mask]).all()
    assert upd.trainable_params(holder) == int(mask.sum())
    assert lrs == pytest.approx([cfg.lr * f for f in (0.5, 1.0, 1.0, 0.75, 0.5, 0.25)])


def test_row_mask_broadcasts_and_counts():
    emb = torch.nn.Embedding(10, 4)
    rows = torch.zeros(10, 1, dtype=torch.bool)
    rows[[2, 5]] = True
    upd = MaskedUpdate({"weight": rows})
    upd.apply(emb)
    assert upd.trainable_params(emb) == 8
    assert MaskedUpdate({"weight": torch.zeros(10, 1, dtype=torch.bool)}).trainable_names == set()


# --- every method: bit-identical frozen entries, gradients only where it trains ------


@pytest.mark.parametrize("name", MINE)
def test_frozen_entries_bit_identical_through_two_stages(name, tok, examples):
    model = build(tok, n_layers=3 if name == "spafit" else 2)
    meth, model, run = make(name, tok, model)
    for t in (1, 2):
        model, stage = start(meth, model, run, t, examples, tok)
        before = params(model)
        train(meth, model, stage, tok)
        model = meth.stage_end(model, stage)
        check_only_trainable_changed(meth.update, before, params(model))


@pytest.mark.parametrize("name", MINE)
def test_gradients_only_where_the_method_trains(name, tok, examples):
    model = build(tok, n_layers=3 if name == "spafit" else 2)
    meth, model, run = make(name, tok, model)
    model, stage = start(meth, model, run, 1, examples, tok, autocast=None)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16):
        lm_loss(model, collate(examples, tok.pad_token_id)).backward()
    meth.after_backward(model, stage)
    upd = meth.update
    for n, p in model.named_parameters():
        if n in upd.full:  # (LoRA A starts with a zero gradient: B = 0)
            assert p.grad is not None and (p.grad.abs().sum() > 0 or "lora_A" in n), n
        elif n in upd.partial:
            m = upd.partial[n].expand(p.shape)
            assert p.grad is not None and (p.grad[~m] == 0).all() and p.grad[m].abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n
    groups = meth.param_groups(model, stage)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in upd.trainable_names}
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p is q for p in g["params"] for n, q in model.named_parameters() if n in upd.partial))
    assert meth.trainable_params(model) == upd.trainable_params(model) > 0


# --- LoTA ----------------------------------------------------------------------------


def test_lota_mask_count_reset_and_lotto_disjoint(tok, examples):
    model = build(tok)
    meth, model, run = make("lota", tok, model, {"sparsity": 0.9, "calibration_steps": 2, "lotto": True})
    cands = meth.candidates
    assert len(cands) == 7 * 2 and not any("embed" in n or "norm" in n for n in cands)
    N = sum(dict(model.named_parameters())[n].numel() for n in cands)
    for t in (1, 2, 3):
        before = params(model)
        model, stage = start(meth, model, run, t, examples, tok, autocast=None)
        after = params(model)
        assert all(torch.equal(before[n], after[n]) for n in before), "weights not reset to theta_0 after calibration"
        assert meth.calibration_stats[-1]["steps"] == 2
        masks = meth.masks[-1]
        assert set(masks) == set(cands)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * N) == meth.trainable_params(model)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(cands)
        train(meth, model, stage, tok, autocast=None)
        meth.stage_end(model, stage)
    for i in range(3):
        for j in range(i + 1, 3):
            for n in cands:
                assert not (meth.masks[i][n] & meth.masks[j][n]).any(), f"stages {i + 1},{j + 1} overlap in {n}"


def test_lota_mask_is_global_topk_of_calibration_delta(tok, examples, monkeypatch):
    model = build(tok)
    meth, model, run = make("lota", tok, model, {"sparsity": 0.8, "calibration_steps": 2})
    theta0 = params(model)
    seen = {}
    spy_calibration(monkeypatch, seen)
    start(meth, model, run, 1, examples, tok, autocast=None)
    delta = torch.cat([(seen[n] - theta0[n]).abs().flatten() for n in meth.candidates])
    sel = torch.cat([meth.masks[-1][n].flatten() for n in meth.candidates])
    assert delta[sel].min() >= delta[~sel].max() > 0  # one global threshold


def test_lota_additive_merge_equals_sequential_training(tok, examples):
    model = build(tok)
    meth, model, run = make("lota", tok, model, {"sparsity": 0.9, "calibration_steps": 2})
    theta0 = params(model)
    for t in (1, 2, 3):
        model, stage = start(meth, model, run, t, examples, tok, autocast=None)
        train(meth, model, stage, tok, autocast=None)
        meth.stage_end(model, stage)
    final = params(model)
    tvs = meth.task_vectors
    merged = lota_mod.lota_additive_merge(theta0, tvs)
    # applying the deltas one after the other gives the same tensors (disjoint masks)
    step = theta0
    for d in tvs:
        step = lota_mod.lota_additive_merge(step, [d])
    reverse = lota_mod.lota_additive_merge(theta0, tvs[::-1])
    for n in theta0:
        assert torch.equal(merged[n], step[n]) and torch.equal(merged[n], reverse[n]), n
        # and theta_0 + sum of deltas is the sequentially trained model (up to float rounding
        # of start + (end - start)); untouched tensors are exactly theta_0
        assert torch.allclose(merged[n], final[n], rtol=0, atol=1e-6), n
        if n not in meth.candidates:
            assert torch.equal(final[n], theta0[n]), n
    assert any(d[n][1].abs().sum() > 0 for d in tvs for n in d)
    # the method state (packed masks) survives a checkpoint round trip
    import io

    buf = io.BytesIO()
    torch.save(meth.state_dict(), buf)
    buf.seek(0)
    meth2 = make_method("lota", {"sparsity": 0.9})
    meth2.load_state_dict(torch.load(buf, weights_only=False))
    assert all(torch.equal(a[n], b[n]) for a, b in zip(meth.masks, meth2.masks) for n in a)
    assert set(meth2.used) == set(meth.used) and all(torch.equal(meth.used[n], meth2.used[n]) for n in meth.used)
    for n, v in lota_mod.lota_additive_merge(theta0, meth2.task_vectors).items():
        assert torch.equal(v, merged[n])


# --- HFT -----------------------------------------------------------------------------


def hft_frozen(model):
    frozen = {}
    for n, p in model.named_parameters():
        m = hft_mod._LAYER.search(n)
        if m and not p.requires_grad:
            frozen.setdefault(int(m.group(1)), set()).add(m.group(2))
    return frozen


def test_hft_count_rule_stage_redraws_and_seed(tok, examples):
    L = 4
    model = build(tok, n_layers=L)
    meth, model, run = make("hft", tok, model)
    draws = []
    for t in (1, 2, 3):
        model, _ = start(meth, model, run, t, examples, tok, autocast=None)
        fr = hft_frozen(model)
        assert sorted(fr) == list(range(L))
        n_mlp2 = 0
        for i, cats in fr.items():
            assert len(cats & set(hft_mod.ATTN)) == 2, cats
            assert len(cats & set(hft_mod.NORMS)) == 1, cats
            k = len(cats & set(hft_mod.MLP))
            assert k in (1, 2)
            n_mlp2 += k == 2
        assert n_mlp2 == L // 2
        # the final norm trains; the tied embedding / lm_head is drawn (test_method_hft.py)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert "model.norm.weight" in trainable
        assert ("model.embed_tokens.weight" in trainable) == (not meth.frozen_embeddings[-1])
        draws.append(fr)
    assert draws[0] != draws[1] and draws[1] != draws[2]
    # the same seed gives the same draw
    meth2, model2, run2 = make("hft", tok, build(tok, n_layers=L))
    for t in (1, 2, 3):
        model2, _ = start(meth2, model2, run2, t, examples, tok, autocast=None)
        assert hft_frozen(model2) == draws[t - 1]
    # another seed a different one
    meth3, model3, run3 = make("hft", tok, build(tok, n_layers=L), seed=1)
    model3, _ = start(meth3, model3, run3, 1, examples, tok, autocast=None)
    assert hft_frozen(model3) != draws[0]


def test_hft_params_rule_freezes_half(tok, examples):
    model = build(tok, n_layers=4)
    meth, model, run = make("hft", tok, model, {"rule": "params"})
    for t in (1, 2):
        model, _ = start(meth, model, run, t, examples, tok, autocast=None)
        P = dict(model.named_parameters())
        total_frozen = total = 0
        for i, members in meth.layers.items():
            sizes = {c: P[n].numel() for c, (n, _) in members.items()}
            frozen = sum(P[n].numel() for c, (n, _) in members.items() if not P[n].requires_grad)
            smallest = min(v for c, v in sizes.items() if c.endswith("_proj"))
            assert abs(frozen - sum(sizes.values()) / 2) <= smallest, (i, frozen, sum(sizes.values()))
            cats = {c for c, (n, _) in members.items() if not P[n].requires_grad}
            assert 1 <= len(cats & set(hft_mod.ATTN)) <= 3 and len(cats & set(hft_mod.NORMS)) == 1
            total_frozen += frozen
            total += sum(sizes.values())
        assert abs(total_frozen - total / 2) <= smallest


# --- KS-Lottery ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", ["seen", "all"])
def test_ks_lottery_selects_rows_by_scipy_ks_test_and_trains_only_them(tok, examples, monkeypatch, rows):
    from scipy.stats import ks_2samp

    model = build(tok)
    meth, model, run = make("ks_lottery", tok, model, {"alpha": 0.05, "calibration_steps": 3, "rows": rows})
    E = model.get_input_embeddings().weight
    assert E is model.get_output_embeddings().weight  # tied
    E0 = E.detach().clone()
    seen, checked = {}, []

    def check(m, cfg):
        assert cfg.weight_decay == 0.0  # the embedding pass has no weight decay
        assert {n for n, p in m.named_parameters() if p.requires_grad} == {"model.embed_tokens.weight"}
        checked.append(cfg.steps)

    spy_calibration(monkeypatch, seen, check)
    model, stage = start(meth, model, run, 1, examples, tok, autocast=None)
    seen["E1"] = seen["model.embed_tokens.weight"]
    assert checked == [3]
    assert stage.train_config.weight_decay == CFG.weight_decay  # the stage's own setting is untouched
    assert torch.equal(E.detach(), E0)  # reset
    # the tied head moves every row; "seen" tests only the tokens of the stage's examples
    in_data = {t for ex in stage.examples for t in ex.input_ids}
    assert len(in_data) < E0.shape[0]
    moved = [j for j in range(E0.shape[0]) if ks_2samp(E0[j].numpy(), seen["E1"][j].numpy()).pvalue < 0.05]
    expect = [j for j in moved if rows == "all" or j in in_data]
    assert 0 < len(expect) < E0.shape[0]
    if rows == "all":
        assert set(moved) - in_data  # rows of tokens outside the data pass the test through the head
    assert meth.selected[-1] == expect
    assert meth.trainable_params(model) == len(expect) * E0.shape[1]
    monkeypatch.undo()
    before = params(model)
    train(meth, model, stage, tok, autocast=None)
    after = params(model)
    changed = (after["model.embed_tokens.weight"] != before["model.embed_tokens.weight"]).any(1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(expect)
    assert all(torch.equal(after[n], before[n]) for n in before if n != "model.embed_tokens.weight")


def test_ks_lottery_top_n_and_vectorised_statistic_matches_scipy():
    from scipy.stats import ks_2samp

    torch.manual_seed(0)
    a = torch.randn(40, 32)
    b = a.clone()
    b[:30] += torch.randn(30, 32) * torch.linspace(0.01, 1, 30)[:, None]
    b[3, :5] = a[3, :5]  # ties across the samples
    D, p, tested = ks_mod.ks_rows(a, b)
    assert tested == 30
    for j in range(40):
        r = ks_2samp(a[j].numpy(), b[j].numpy())
        assert D[j].item() == pytest.approx(r.statistic, abs=1e-12) and p[j].item() == pytest.approx(r.pvalue, rel=1e-9, abs=1e-15)
    sel = ks_mod.select_rows(D, p, 0.05, 5, 1, 32)
    assert int(sel.sum()) == 5 and D[sel].min() >= D[~sel].max()
    # candidates: the top n among them only, and never more than the candidates that changed
    cand = torch.zeros(40, dtype=torch.bool)
    cand[[0, 1, 2, 35, 36]] = True  # rows 35, 36 did not change (D = 0)
    sel = ks_mod.select_rows(D, p, 0.05, 2, 1, 32, candidates=cand)
    top2 = sorted(range(3), key=lambda j: -D[j].item())[:2]
    assert sel.nonzero().flatten().tolist() == sorted(top2)
    assert ks_mod.select_rows(D, p, 0.05, 10, 1, 32, candidates=cand).nonzero().flatten().tolist() == [0, 1, 2]
    assert not (ks_mod.select_rows(D, p, 1.0, None, 1, 32, candidates=cand) & ~cand).any()


# --- SPAFIT --------------------------------------------------------------------------


def test_spafit_groups(tok, examples):
    model = build(tok, n_layers=3)
    meth, model, run = make("spafit", tok, model)
    assert meth.groups == ([0], [1], [2])
    model, stage = start(meth, model, run, 1, examples, tok, autocast=None)
    with torch.autocast("cpu", dtype=BF16):
        lm_loss(model, collate(examples, tok.pad_token_id)).backward()
    meth.after_backward(model, stage)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert not any(".layers.0." in n for n in with_grad)  # lowest: frozen
    mid = {n for n in with_grad if ".layers.1." in n}
    assert mid == {n for n, _ in model.named_parameters() if ".layers.1." in n and n.endswith("norm.weight")}
    top = {n for n in with_grad if ".layers.2." in n}
    lora = {n for n, _ in model.named_parameters() if ".layers.2." in n and "lora_" in n}
    assert len(lora) == 2 * 7 and lora <= top  # LoRA A and B on every linear module
    assert top - lora == {n for n, _ in model.named_parameters() if ".layers.2." in n and n.endswith("norm.weight")}
    assert not any("lora_" in n for n in with_grad - top)
    assert not any("embed" in n or n.endswith("model.norm.weight") for n in with_grad)


# --- end to end through the CLI ------------------------------------------------------


def test_each_method_runs_two_stages_through_the_loop(tmp_path):
    import json

    from clbench.cli import main

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.pop("stream", None)
    cfg.update(name="masked", tasks=["tiny_parity", "tiny_compare"], task_dirs=[str(REPO / "configs" / "tiny_tasks")],
               methods=[{"name": "lota", "options": {"calibration_steps": 2}}, {"name": "hft"},
                        {"name": "spafit", "train": {"lr": 1.0e-2}}, {"name": "ks_lottery", "options": {"calibration_steps": 2}}],
               eval={"limit": 4, "batch_size": 16, "log_samples": False})
    cfg["train"].update(steps=2, weight_decay=0.1)
    path = tmp_path / "masked.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in MINE:
        seed = res["methods"][name]["seeds"]["0"]
        assert seed["complete"] and len(seed["matrix"]) == 3, name
        assert [s["steps"] for s in seed["stages"]] == [2, 2]
    n = {k: v["seeds"]["0"]["trainable_params"] for k, v in res["methods"].items()}
    model = models.build_tiny_model(0, len(models.build_tiny_tokenizer()))
    cand = sum(p.numel() for k, p in model.named_parameters() if k.endswith("proj.weight"))
    assert n["lota"] == round(0.1 * cand)
    assert 0 < n["ks_lottery"] < model.get_input_embeddings().weight.numel()
    assert 0 < n["hft"] < sum(p.numel() for p in model.parameters())
