"""LwF (methods/lwf.py): the distillation term equals a hand computation of T^2 * KL on given
logits; at a stage's first step (student == teacher) the term and its gradient are 0; the
teacher never moves while the student trains; stage 1 is plain fine-tuning; a LoRA base
trains only its adapter; a 2-stage CLI run resumed after stage 1 repeats exactly."""

import math

import pytest
import torch
import torch.nn.functional as F

from clbench.method import call_hook, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.errors import ConfigError
from clbench.training.stage import start_stage
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import bits, compare, cpu_rt, fresh, parity

for _f in ("lwf", "lora"):
    load_method_file(REPO / "methods" / f"{_f}.py")
from clbench_builtin.methods import lwf as lwf_mod  # noqa: E402  (after the loads above)

PARITY = parity(16)
COMPARE = compare(16)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tok):
    return T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64)


def dense_target_rows(model, batch):
    """Logits at the positions predicting a target, from the model's full forward (no head-only path)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1][batch["labels"][:, 1:] != T.IGNORE]


CFG = TrainConfig(lr=1e-2, steps=4, batch_size=4, weight_decay=0.1)


def test_distillation_equals_a_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, -2.0]])
    temp = 2.0

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [x / sum(e) for x in e]

    fwd = rev = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_s, p_t = softmax(s_row), softmax(t_row)
        fwd += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
        rev += sum(ps * math.log(ps / pt) for pt, ps in zip(p_t, p_s))
    fwd, rev = fwd / 2, rev / 2  # mean over the 2 rows
    got = lwf_mod.distillation(student, teacher, temp, "forward")
    assert float(got) == pytest.approx(temp ** 2 * fwd, rel=1e-6)
    assert float(lwf_mod.distillation(student, teacher, temp, "reverse")) == pytest.approx(temp ** 2 * rev, rel=1e-6)
    assert float(lwf_mod.distillation(student, teacher, temp, "forward", t_squared=False)) == pytest.approx(fwd, rel=1e-6)
    assert fwd != pytest.approx(rev, rel=1e-3)  # the two directions are really different numbers here
    assert float(lwf_mod.distillation(teacher, teacher, temp)) == 0.0


def test_stage_one_is_plain_fine_tuning(tok, data):
    meth, model, run = fresh(tok, "lwf")
    model, stage = start_stage(model, meth, data[0], CFG, run, 1, "t1", cpu_rt(tok))
    assert meth.teacher is None
    batch = T.collate(list(stage.examples[:4]), tok.pad_token_id)
    out = T.lm_loss(model, batch, return_forward=True)
    assert meth.extra_loss(model, batch, stage, out) is None


def test_kd_zero_at_stage_start_then_positive_and_teacher_never_moves(tok, data):
    meth, model, run = fresh(tok, "lwf", {"temperature": 2.0, "kd_lambda": 0.7})
    model, stage = start_stage(model, meth, data[0], CFG, run, 1, "t1", cpu_rt(tok))
    T.train_stage(model, meth, list(stage.examples), CFG, stage, cpu_rt(tok))
    model = call_hook(meth, "stage_end", model, stage)
    after1 = {n: bits(p) for n, p in model.named_parameters()}

    model, stage = start_stage(model, meth, data[1], CFG, run, 2, "t2", cpu_rt(tok))
    teacher = meth.teacher
    assert teacher is not None and teacher is not model and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {n: bits(p) for n, p in teacher.named_parameters()}.keys() == after1.keys()
    assert all(torch.equal(bits(p), after1[n]) for n, p in teacher.named_parameters())

    batch = T.collate(list(stage.examples[:4]), tok.pad_token_id)
    model.train()
    out = T.lm_loss(model, batch, return_forward=True)
    kd = meth.extra_loss(model, batch, stage, out)
    assert float(kd.detach()) == 0.0 and kd.requires_grad  # student == teacher: KL is exactly 0
    params = [p for p in model.parameters() if p.requires_grad]
    g_kd = torch.autograd.grad(kd, params, retain_graph=True, allow_unused=True)
    g_ce = torch.autograd.grad(out.loss, params, allow_unused=True)
    kd_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g_kd if g is not None))
    ce_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g_ce if g is not None))
    assert ce_norm > 1e-3 and kd_norm <= 1e-6 * ce_norm  # rounding of softmax sums only

    T.train_stage(model, meth, list(stage.examples), CFG, stage, cpu_rt(tok))
    assert all(torch.equal(bits(p), after1[n]) for n, p in teacher.named_parameters())  # the teacher never moved
    assert any(not torch.equal(bits(p), after1[n]) for n, p in model.named_parameters())  # the student did
    # now the student differs: the term is the mean per-row KL(teacher || student) at T, times lambda (no
    # T^2 by default: the paper's L_old), here computed from both models' full forwards with torch's own kl_div
    out = T.lm_loss(model, batch, return_forward=True)
    kd = float(meth.extra_loss(model, batch, stage, out).detach())
    s_rows, t_rows = dense_target_rows(model, batch), dense_target_rows(teacher, batch)
    ref = F.kl_div(F.log_softmax(s_rows / 2.0, -1), F.softmax(t_rows / 2.0, -1), reduction="batchmean") * 0.7
    assert kd > 1e-6 and kd == pytest.approx(float(ref), rel=1e-4)
    model = call_hook(meth, "stage_end", model, stage)
    assert meth.teacher is None  # dropped: never kept past its stage, never checkpointed
    assert meth.state_dict() == {"base": None}


def test_reverse_kl_matches_torch_kl_div_the_other_way(tok, data):
    meth, model, run = fresh(tok, "lwf", {"kl": "reverse", "temperature": 1.5, "t_squared": True})
    for t, exs in ((1, data[0]), (2, data[1])):
        model, stage = start_stage(model, meth, exs, CFG, run, t, f"t{t}", cpu_rt(tok))
        T.train_stage(model, meth, list(stage.examples), CFG, stage, cpu_rt(tok))
    batch = T.collate(list(stage.examples[:4]), tok.pad_token_id)
    out = T.lm_loss(model, batch, return_forward=True)
    kd = float(meth.extra_loss(model, batch, stage, out).detach())
    s_rows, t_rows = dense_target_rows(model, batch), dense_target_rows(meth.teacher, batch)
    # KL(student || teacher) = kl_div(input = log p_teacher, target = p_student)
    ref = F.kl_div(F.log_softmax(t_rows / 1.5, -1), F.softmax(s_rows / 1.5, -1), reduction="batchmean") * 1.5 ** 2
    assert kd > 1e-6 and kd == pytest.approx(float(ref), rel=1e-4)


def test_lora_base_trains_only_the_adapter_with_a_frozen_teacher(tok, data):
    meth, model, run = fresh(tok, "lwf", {"base": "lora", "base_options": {"r": 4, "alpha": 8, "dropout": 0.0}})
    assert hasattr(model, "peft_config")
    for t, exs in ((1, data[0]), (2, data[1])):
        model, stage = start_stage(model, meth, exs, CFG, run, t, f"t{t}", cpu_rt(tok))
        if t == 2:
            before = {n: bits(p) for n, p in model.named_parameters()}
            batch = T.collate(list(stage.examples[:4]), tok.pad_token_id)
            out = T.lm_loss(model, batch, return_forward=True)
            assert float(meth.extra_loss(model, batch, stage, out).detach()) == 0.0
        T.train_stage(model, meth, list(stage.examples), CFG, stage, cpu_rt(tok))
    moved = {n for n, p in model.named_parameters() if not torch.equal(bits(p), before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert all(torch.equal(bits(p), before[n]) for n, p in meth.teacher.named_parameters())
    assert float(meth.extra_loss(model, batch, stage, T.lm_loss(model, batch, return_forward=True)).detach()) > 0


def test_options_are_checked():
    with pytest.raises(ConfigError):
        make_method("lwf", {"base": "lwf"})
    with pytest.raises(ConfigError):
        make_method("lwf", {"base_options": {"r": 4}})
    with pytest.raises(ConfigError):
        make_method("lwf", {"temperature": 0})


def test_two_stage_run_and_resume(tmp_path):
    res = two_stage_run_and_resume(tmp_path, [
        {"name": "lwf", "options": {"kd_lambda": 2.0}},
        {"name": "lwf", "label": "lwf-lora", "options": {"kl": "reverse", "base": "lora", "base_options": {"r": 4, "alpha": 8}},
         "train": {"lr": 1e-2}},
    ])
    seeds = {m: res["methods"][m]["seeds"]["0"] for m in res["methods"]}
    assert seeds["lwf-lora"]["trainable_params"] < seeds["lwf"]["trainable_params"]
