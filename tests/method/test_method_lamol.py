"""LAMOL (methods/lamol.py) on the tiny Llama: samples are parsed as "context __ans__ answer"; every
example is also trained as marker + context + __ans__ + answer + EOS with weight lm_lambda (checked
against the loss computed here from the strings); after a stage that taught the model to write
task 1, stage 2's training set holds parsed pseudo-examples of task 1 (none without the LM loss);
a 2-stage CLI run resumed after stage 1 writes the same samples and repeats exactly."""

import math

import pytest
import torch

from clbench.method import load_method_file
from clbench.config import TrainConfig
from clbench.training.stage import start_stage
import clbench.training.train as T
from conftest import REPO, two_stage_run_and_resume
from harness import cpu_rt, fresh, one_stage, parity

load_method_file(REPO / "methods" / "lamol.py")
from clbench_methods.lamol import ANS, parse_sample  # noqa: E402  (registered above)

PARITY = parity(40)
COMPARE = [(f"Which is larger, {a} or {b}?\nAnswer:", " first" if a > b else " second")
           for a, b in zip(range(3, 123, 3), range(100, 20, -2))]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, want", [
    ("Number: 4\nEven or odd?\nAnswer:__ans__ even", ("Number: 4\nEven or odd?\nAnswer:", " even")),
    ("no separator at all", None),
    ("a __ans__ b __ans__ c", None),       # two separators: not one example
    ("   __ans__ even", None),             # no context
    ("Number: 4\nAnswer:__ans__  ", None),  # no answer
])
def test_parse_sample(text, want):
    assert parse_sample(text) == want


class _Task:
    def __init__(self, kind):
        self.OUTPUT_TYPE = kind


def fresh_lamol(tok, options=None):
    """LAMOL set up on the tiny model, with the task and tokenizer callbacks its pseudo-samples need."""
    return fresh(tok, "lamol", options, task=lambda name: _Task("multiple_choice"),
                 tokenize=lambda pairs: T.tokenize(pairs, tok, 64))


def test_lm_loss_is_lambda_times_the_marked_sequence_loss(tok):
    meth, model, run = fresh_lamol(tok, {"lm_lambda": 0.25})
    cfg = TrainConfig(lr=1e-3, steps=1, batch_size=2, max_length=64)
    exs = T.tokenize(PARITY[:2], tok, 64)
    model, stage = start_stage(model, meth, exs, cfg, run, 1, "t1", cpu_rt(tok))
    model.train()
    batch = T.collate(exs, tok.pad_token_id)
    out = T.lm_loss(model, batch, return_forward=True)
    meth.batch(exs, stage)
    got = meth.extra_loss(model, batch, stage, out)
    # the LM sequences from the strings: "__t1__" + context + "__ans__" + answer, EOS; loss after the marker
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    seqs = [T.Example(ids("__t1__") + ids(c) + ids(ANS) + ids(a) + [tok.eos_token_id], len(ids("__t1__"))) for c, a in PARITY[:2]]
    assert [e.input_ids for e in seqs] == [meth.lm_example(e, "t1").input_ids for e in exs]
    want = 0.25 * T.lm_loss(model, T.collate(seqs, tok.pad_token_id))
    torch.testing.assert_close(got, want)


def _after_stage_1(tok, options):
    meth, model, run = fresh_lamol(tok, options)
    cfg = TrainConfig(lr=3e-3, steps=60, batch_size=8, max_length=64)
    data1, data2 = T.tokenize(PARITY, tok, 64), T.tokenize(COMPARE, tok, 64)
    model, _, _ = one_stage(meth, model, run, tok, data1, cfg, 1)
    _, stage2 = start_stage(model, meth, data2, cfg, run, 2, "t2", cpu_rt(tok))
    return meth, stage2, data2


def test_stage_2_rehearses_pseudo_examples_of_task_1(tok):
    meth, stage2, data2 = _after_stage_1(tok, {})
    pseudo = list(stage2.examples)[len(data2):]
    assert list(stage2.examples)[:len(data2)] == data2
    asked = math.ceil(0.2 * len(data2))
    assert len(meth.last_samples) == asked and all(t == "t1" for t, _ in meth.last_samples)
    assert 0 < len(pseudo) <= asked
    # what the model wrote after learning task 1, parsed and tokenized: the tiny model's 60 steps make
    # noisy text, but task 1's template is in it
    texts = [tok.decode(e.input_ids[:e.n_prompt]) for e in pseudo]
    assert any("Even or odd?" in t for t in texts), texts
    stats = meth.stage_stats(stage2)
    assert stats["pseudo_requested"] == asked and stats["pseudo_kept"] == len(pseudo)


def test_without_the_lm_loss_the_model_writes_nothing_parseable(tok):
    meth, stage2, data2 = _after_stage_1(tok, {"lm_lambda": 0.0})
    assert len(meth.last_samples) == math.ceil(0.2 * len(data2))
    assert list(stage2.examples) == data2  # nothing parsed: the model never learnt to write "context __ans__ answer"


def test_two_stage_run_and_resume(tmp_path):
    res = two_stage_run_and_resume(tmp_path, [{"name": "lamol"}], train={"steps": 60})
    assert res["methods"]["lamol"]["seeds"]["0"]["stages"][1]["method_stats"]["pseudo_kept"] > 0
