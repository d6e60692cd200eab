"""Each method's defaults are what its docstring says and what its source does: LwF without
T^2, I-LoRA's stable adapter an EMA that lags, O-LoRA's alpha and dropout from the authors' code,
SIFT discarding its selection step, HFT drawing the embedding / LM head like its other
categories, SDFT refused on a stream with nothing to rewrite, EWC's lambda and Fisher source."""

import re
import sys

import pytest
import torch
import yaml

from clbench.method import RunContext, Stage, call_hook, get, load_builtin_methods, make_method
from clbench.config import TrainConfig
from clbench.run import models
from clbench.training.stage import run_stage
from clbench.training.train import tokenize
from conftest import REPO
from harness import cpu_rt, parity

load_builtin_methods(REPO / "methods")
pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
PAIRS = parity(16)

# (method, option, the default, how the docstring's options list writes it)
DEFAULTS = [
    ("lwf", "t_squared", False, "false"),
    ("ilora", "stable_decay", 0.99, "0.99"),
    ("olora", "alpha", 32, "32"),
    ("olora", "dropout", 0.1, "0.1"),
    ("sift", "train_selection_step", False, "False"),
    ("hft", "embeddings", "draw", '"draw"'),
    ("ewc", "ewc_lambda", 1000.0, "1000.0"),
    ("ewc", "fisher_source", "sample", "sample"),
]


@pytest.mark.parametrize("name,option,value,written", DEFAULTS)
def test_the_default_is_the_documented_one(name, option, value, written):
    cls = get(name)
    assert cls.Options.model_fields[option].default == value
    doc = sys.modules[cls.__module__].__doc__
    assert re.search(rf"^\s+{option}\s+{re.escape(written)}(\s|$)", doc, re.M), f"{name}: docstring lacks '{option} {written}'"


@pytest.fixture(scope="module")
def examples(tok):
    return tokenize(PAIRS, tok, 64)


def setup(tok, name, options=None, model=None, tasks=("t1", "t2")):
    meth = make_method(name, options or {})
    run = RunContext(method=name, seed=0, tasks=list(tasks), device=CPU, tokenizer=tok)
    return meth, call_hook(meth, "setup", model if model is not None else models.build_tiny_model(0, len(tok)), run), run


def stage(meth, model, run, examples, tok, cfg, t=1):
    model, stats, _ = run_stage(model, meth, examples, cfg, run, t, f"t{t}", cpu_rt(tok))
    return model, stats


# --- SIFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("train_selection_step", [False, True])
def test_sift_selection_step_leaves_the_weights_unchanged(tok, examples, train_selection_step):
    meth, model, run = setup(tok, "sift", {"train_selection_step": train_selection_step})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, _ = stage(meth, model, run, examples, tok, TrainConfig(lr=1e-2, steps=1, batch_size=4))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert meth.idx  # the step selected
    if train_selection_step:  # the option that trains on it: the selected entries move
        assert moved and all(n in meth.targets for n in moved)
    else:
        assert moved == []


# --- HFT ----------------------------------------------------------------------------------


def untied(tok):
    from transformers import LlamaForCausalLM

    cfg = models.build_tiny_model(0, len(tok)).config
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_hft_can_freeze_the_embedding_and_head_and_keeps_them_bit_identical(tok, examples):
    meth, model, run = setup(tok, "hft", {"embeddings": "freeze"})
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    model, _ = stage(meth, model, run, examples, tok, TrainConfig(lr=1e-2, steps=2, batch_size=4))
    assert not emb.requires_grad and torch.equal(emb, before)
    meth, model, run = setup(tok, "hft", {"embeddings": "train"})
    model, _ = stage(meth, model, run, examples, tok, TrainConfig(lr=1e-2, steps=2, batch_size=4))
    assert model.get_input_embeddings().weight.requires_grad


def test_hft_draws_the_embedding_and_head_per_stage(tok, examples):
    from clbench.training.stage import start_stage

    cfg = TrainConfig(lr=1e-2, steps=1, batch_size=4)
    tied_frozen = []
    meth, model, run = setup(tok, "hft", tasks=[f"t{t}" for t in range(1, 9)])
    for t in range(1, 9):  # tied (one tensor): frozen in some stages, trained in others
        model, _ = start_stage(model, meth, examples, cfg, run, t, f"t{t}", cpu_rt(tok))
        tied_frozen.append(not model.get_input_embeddings().weight.requires_grad)
        assert tied_frozen[-1] == bool(meth.frozen_embeddings[-1])
    assert any(tied_frozen) and not all(tied_frozen)
    meth, model, run = setup(tok, "hft", model=untied(tok), tasks=["t1", "t2", "t3"])
    for t in (1, 2, 3):  # untied: one of the two frozen at every stage, as the norms
        model, _ = start_stage(model, meth, examples, cfg, run, t, f"t{t}", cpu_rt(tok))
        grads = [model.get_input_embeddings().weight.requires_grad, model.get_output_embeddings().weight.requires_grad]
        assert sorted(grads) == [False, True]


# --- SDFT ---------------------------------------------------------------------------------


def test_sdft_is_refused_on_a_log_likelihood_stream_at_planning(tmp_path, run_cli):
    cfg = {"name": "sdft-mc", "model": "tiny", "tasks": ["tiny_parity", "tiny_compare"],
           "task_dirs": [str(REPO / "configs" / "tiny_tasks")], "methods": [{"name": "sdft"}], "seeds": [0],
           "train": {"steps": 1}, "precision": "fp32"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("run", path, "--output-dir", tmp_path / "out")
    assert code == 2
    assert "methods.0 (sdft): sdft rewrites generated targets" in err and "tiny_parity: multiple_choice" in err
    assert not (tmp_path / "out" / "results.json").exists()
    sdft = make_method("sdft", {})
    assert sdft.stream_refusal({"tiny_parity": "multiple_choice", "tiny_copy": "generate_until"}) is None
    assert "raw-text" in sdft.stream_refusal({"wiki": "loglikelihood_rolling", "tiny_copy": "generate_until"})


# --- I-LoRA, O-LoRA, LwF ------------------------------------------------------------------


def test_ilora_stable_adapter_keeps_099_of_itself_once_the_ramp_is_over(tok, examples):
    meth, model, run = setup(tok, "ilora", {"r": 2, "alpha": 4})
    st = Stage(stage=1, task="t1", seed=0, run=run, train_config=TrainConfig(), generator=None, total_steps=1000)
    st._clock.step = 499  # the 500th step: the ramp 1 - 1/501 is above the ceiling
    meth.after_step(model, st)
    assert meth.last_decay == 0.99


def test_olora_adapters_use_the_authors_alpha_and_dropout(tok):
    meth, model, _ = setup(tok, "olora")
    cfg = model.peft_config["stage1"]
    assert (cfg.lora_alpha, cfg.lora_dropout, cfg.r) == (32, 0.1, 8)


def test_lwf_distils_without_t_squared_by_default(tok, examples):
    lwf_mod = sys.modules[get("lwf").__module__]
    student, teacher = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 2.0]])
    meth = make_method("lwf", {})
    o = meth.options
    plain = lwf_mod.distillation(student, teacher, o.temperature, o.kl, t_squared=False)
    assert float(lwf_mod.distillation(student, teacher, o.temperature, o.kl, o.t_squared)) == float(plain)
    assert o.temperature == 2.0 and float(plain) > 0


# --- EWC ----------------------------------------------------------------------------------


def test_ewc_fisher_is_a_seeded_draw_from_the_whole_stage_not_its_last_batches(examples):
    meth = make_method("ewc", {"fisher_batches": 2})
    st = Stage(stage=1, task="t1", seed=0, run=None, train_config=TrainConfig(batch_size=4), generator=None,
                 examples=examples)
    meth.batch(list(examples[-4:]), st)  # what the loop trained on last: not kept
    assert not meth.batches
    got = meth.fisher_examples(st)
    assert [len(b) for b in got] == [4, 4]
    flat = [e for b in got for e in b]
    assert len({id(e) for e in flat}) == 8 and all(any(e is x for x in examples) for e in flat)
    assert got == make_method("ewc", {"fisher_batches": 2}).fisher_examples(st)  # seeded: the same on every rank
    assert got != meth.fisher_examples(Stage(stage=2, task="t2", seed=0, run=None, train_config=TrainConfig(batch_size=4),
                                                generator=None, examples=examples))
    old = make_method("ewc", {"fisher_batches": 2, "fisher_source": "last_batches"})
    old.batch(list(examples[-4:]), st)
    assert old.fisher_examples(st) == [list(examples[-4:])]
