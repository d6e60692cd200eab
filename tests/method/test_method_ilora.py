"""I-LoRA: through the loop's real train_stage, after every optimizer step the stable adapter is
lam * its old value + (1 - lam) * the plastic one on every adapter tensor (lam by hand, warm-up
included), it has moved from its setup value, it never gets a gradient, and the base weights stay
bit-identical; the loss with replay and the hidden-state consistency term equals an independent
computation; the reservoir buffer survives state_dict; a 2-stage CLI run resumed after stage 1
repeats exactly."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from clbench.method import Stage, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.training.stage import start_stage
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import compare, cpu_rt, fresh, one_stage, parity

load_method_file(REPO / "methods" / "ilora.py")

PARITY = parity(20)
COMPARE = compare(20)

SMALL = {"r": 4, "alpha": 8, "dropout": 0.0}  # a small adapter without dropout, for the by-hand checks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tok):
    return T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64)


def by_adapter(model, adapter):
    """{module.lora_X: parameter} of one adapter, found by parameter name."""
    out = {}
    for n, p in model.named_parameters():
        m = re.fullmatch(rf"(.*\.lora_[AB])\.{adapter}\.weight", n)
        if m:
            out[m.group(1)] = p
    return out


def base_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" not in n}


class Watch:
    """Around the method's own after_backward / after_step: checks each step's EMA by hand."""

    def __init__(self, meth, model, decay):
        self.meth, self.model, self.decay = meth, model, decay
        self.steps, self.moved_after_step1, self.in_stage = 0, None, {}
        self.setup_stable = {k: p.detach().clone() for k, p in by_adapter(model, "stable").items()}
        self._after_step = meth.after_step
        meth.after_backward = self.after_backward
        meth.after_step = self.after_step

    def after_backward(self, model, stage):
        stable, plastic = by_adapter(model, "stable"), by_adapter(model, "plastic")
        assert all(p.grad is None and not p.requires_grad for p in stable.values())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plastic.values())
        assert all(p.grad is None for p in base_params(model).values())

    def after_step(self, model, stage):
        stable, plastic = by_adapter(model, "stable"), by_adapter(model, "plastic")
        old = {k: p.detach().clone() for k, p in stable.items()}
        self._after_step(model, stage)
        self.in_stage[stage.stage] = k = self.in_stage.get(stage.stage, 0) + 1  # this stage's steps so far
        lam = min(1 - 1 / (k + 1), self.decay)
        assert self.meth.last_decay == pytest.approx(lam)
        for name, s in stable.items():
            torch.testing.assert_close(s.detach(), lam * old[name] + (1 - lam) * plastic[name].detach(),
                                       rtol=1e-6, atol=1e-7, msg=name)
        self.steps += 1
        if self.steps == 1:
            self.moved_after_step1 = {n for n, s in stable.items() if not torch.equal(s, self.setup_stable[n])}


@pytest.mark.parametrize("init", ["fresh", "copy"])
def test_ema_after_every_step_by_hand_stable_gets_no_gradient_base_bit_identical(tok, data, init):
    parity, compare = data
    # decay 0.6: the first step's lam is min(1 - 1/2, 0.6) = 0.5, later ones 0.6
    meth, model, run = fresh(tok, "ilora", {**SMALL, "stable_decay": 0.6, "buffer_size": 6, "stable_init": init, "gamma": 2.0})
    base0 = {n: p.detach().clone() for n, p in base_params(model).items()}
    stable, plastic = by_adapter(model, "stable"), by_adapter(model, "plastic")
    assert len(stable) == len(plastic) == 16  # lora_A and lora_B of q, k, v, o_proj in 2 layers
    if init == "copy":
        assert all(torch.equal(stable[k], plastic[k]) for k in stable)
    else:  # peft's own draw for the second adapter: another A, the same B = 0
        assert not any(torch.equal(stable[k], plastic[k]) for k in stable if k.endswith("lora_A"))
    cfg = TrainConfig(lr=2e-2, steps=3, batch_size=4)
    watch = Watch(meth, model, 0.6)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    assert meth.last == {}  # no replay in stage 1
    if init == "fresh":
        assert watch.moved_after_step1 == set(stable)  # every stable tensor left its setup value at step 1
    else:  # the plastic A gets no gradient while B = 0, so at step 1 only the B's move
        assert watch.moved_after_step1 == {k for k in stable if k.endswith("lora_B")}
    assert not any(torch.equal(stable[k], watch.setup_stable[k]) for k in stable)  # all moved by stage 1's end
    model, _, _ = one_stage(meth, model, run, tok, compare, cfg, 2)
    assert watch.steps == 6 and watch.in_stage == {1: 3, 2: 3}
    assert meth.last["consistency"] > 0 and meth.last["ce_buffer"] > 0  # stage 2 replays
    for n, p in base_params(model).items():
        assert torch.equal(p, base0[n]), n
    assert model.base_model.active_adapters == ["plastic"]


def test_replay_loss_and_consistency_equal_an_independent_computation(tok, data):
    parity, compare = data
    meth, model, run = fresh(tok, "ilora", {**SMALL, "gamma": 0.7, "buffer_batch": 4})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # make the two adapters different functions
        for adapter in ("plastic", "stable"):
            for p in by_adapter(model, adapter).values():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    stage = Stage(stage=2, task="t2", seed=0, run=run, train_config=TrainConfig(), generator=torch.Generator(),
                    examples=compare)
    meth.stage_start(model, stage)
    meth.buffer, meth.n_seen = list(parity[8:12]), 4  # buffer_batch 4 of 4: the draw is all of them, in some order
    x = T.collate(compare[:3], tok.pad_token_id)
    out = T.lm_loss(model, x, return_forward=True)
    total = meth.extra_loss(model, x, stage, out)
    assert all(p.requires_grad for p in by_adapter(model, "plastic").values())
    assert not any(p.requires_grad for p in by_adapter(model, "stable").values())

    # by hand: the full-vocabulary forward, every hidden state, padding masked out
    b = T.collate(parity[8:12], tok.pad_token_id)
    with torch.no_grad():
        model.base_model.set_adapter("stable")
        hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
        model.base_model.set_adapter("plastic")
        o = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    labels = b["labels"][:, 1:]
    ce_b = F.cross_entropy(o.logits[:, :-1].reshape(-1, o.logits.shape[-1]).double(), labels.reshape(-1), ignore_index=-100)
    real = b["attention_mask"].bool()
    assert len(hs) == 3  # embeddings, layer 1, final norm of layer 2
    sq = [(hp - torch.where(hp > hz, hp, hz)).double()[real] ** 2 for hp, hz in zip(o.hidden_states, hs)]
    cons = sum(float(s.sum()) for s in sq) / sum(s.numel() for s in sq)
    assert cons > 0
    assert meth.last["consistency"] == pytest.approx(cons, rel=1e-5)
    assert meth.last["ce_buffer"] == pytest.approx(float(ce_b), rel=1e-5)
    expected = 0.5 * (float(ce_b) - float(out.loss.detach())) + 0.7 * cons
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)

    (out.loss + total).backward()  # the loop's total: (CE_x + CE_b) / 2 + gamma * L_cons
    assert all(p.grad is None for p in by_adapter(model, "stable").values())
    assert all(p.grad is not None for p in by_adapter(model, "plastic").values())
    assert all(p.grad is None for p in base_params(model).values())

    # identical adapters: no consistency term; stage 1 draws nothing unless first_stage_replay
    with torch.no_grad():
        for k, s in by_adapter(model, "stable").items():
            s.copy_(by_adapter(model, "plastic")[k])
    meth.extra_loss(model, x, stage, out)
    assert meth.last["consistency"] == 0.0
    one = Stage(stage=1, task="t1", seed=0, run=run, train_config=TrainConfig(), generator=torch.Generator())
    meth.stage_start(model, one)
    assert meth.extra_loss(model, x, one, out) is None
    first = make_method("ilora", {"first_stage_replay": True})
    first.buffer, first.n_seen = list(parity[:4]), 4
    first.stage_start(model, one)
    assert first.extra_loss(model, x, one, out) is not None


def test_reservoir_buffer_and_state_dict(tok, data):
    parity, compare = data
    meth, model, run = fresh(tok, "ilora", {**SMALL, "buffer_size": 5})
    stage = Stage(stage=1, task="t1", seed=0, run=run, train_config=TrainConfig(), generator=torch.Generator())
    meth.stage_start(model, stage)
    assert meth.batch(parity[:3], stage) is None  # the micro-batch itself is unchanged
    assert meth.buffer == parity[:3]  # below the size every example met is kept, in order
    meth.batch(parity[3:8], stage)
    meth.batch(parity[:4], stage)  # met again: counted again, as the authors' buffer does
    assert len(meth.buffer) == 5 and meth.n_seen == 12
    assert meth.buffer != parity[:5] and all(ex in parity[:8] for ex in meth.buffer)
    state = copy.deepcopy(meth.state_dict())
    again = make_method("ilora", {"r": 4, "alpha": 8, "dropout": 0.0, "buffer_size": 5})
    again.load_state_dict(state)
    assert again.buffer == meth.buffer and again.n_seen == 12
    two = Stage(stage=2, task="t2", seed=0, run=run, train_config=TrainConfig(), generator=torch.Generator())
    for m in (meth, again):  # a resumed run continues the reservoir exactly as an uninterrupted one
        m.stage_start(model, two)
        m.batch(compare, two)
    assert again.buffer == meth.buffer and again.n_seen == meth.n_seen == 32
    assert any(ex in compare for ex in meth.buffer)
    assert again.draw(3) == meth.draw(3)


def test_evaluate_option_picks_the_adapter(tok, data):
    parity, _ = data
    meth, model, run = fresh(tok, "ilora", {**SMALL, "evaluate": "stable"})
    cfg = TrainConfig(lr=2e-2, steps=2, batch_size=4)
    model, _, _ = one_stage(meth, model, run, tok, parity, cfg, 1)
    assert model.base_model.active_adapters == ["stable"]
    assert meth.trainable_params(model) == sum(p.numel() for p in by_adapter(model, "plastic").values())
    model, _ = start_stage(model, meth, parity, cfg, run, 2, "t2", cpu_rt(tok))
    assert model.base_model.active_adapters == ["plastic"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".plastic." in n}


def test_two_stage_run_and_resume(tmp_path):
    methods = [
        {"name": "ilora", "options": {"r": 4, "alpha": 8, "buffer_size": 8}, "train": {"lr": 1e-2}},
        {"name": "ilora", "label": "ilora-stable", "options": {"r": 4, "alpha": 8, "buffer_size": 8, "stable_decay": 0.9,
                                                               "stable_init": "fresh", "evaluate": "stable"},
         "train": {"lr": 1e-2}},
    ]
    res = two_stage_run_and_resume(tmp_path, methods)
    seeds = {m: res["methods"][m]["seeds"]["0"] for m in res["methods"]}
    # the plastic adapter only: rank 4, q and o 64 -> 64, k and v 64 -> 32, 2 layers
    assert seeds["ilora"]["trainable_params"] == 2 * (2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4))
    # stage 1 is the same plain training in both (no replay yet); from stage 2 on the stable adapter,
    # which the options change, enters the loss through the consistency term
    assert seeds["ilora"]["stages"][0]["last_loss"] == seeds["ilora-stable"]["stages"][0]["last_loss"]
    assert seeds["ilora"]["stages"][1]["first_loss"] != seeds["ilora-stable"]["stages"][1]["first_loss"]
