"""Continual pre-training: raw-text packing, the loss over every token, 2^-bits-per-byte against
a hand computation, replay by token fraction, the re-warming and WSD schedules, and a mixed
text -> instruction stream that resumes to the same matrix."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from clbench import paths
from clbench.config import TrainConfig
from clbench.data import packing
from clbench.schedule import lr_factor
from harness import cpu_rt

WORDS = "the river stone light music under over quick brown fox jumps lazy dog house tree green blue sky".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 30))) + "." for _ in range(n)]


TEXT_TASK = """task: tiny_text
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata: {version: 1.0}
clbench:
  kind: text
  score: per_byte_likelihood
  data: {train: tiny_text.train.jsonl, test: tiny_text.test.jsonl}
"""


@pytest.fixture
def text_task_dir(tmp_path):
    """A folder with one raw-text task (`clbench.kind: text`) on synthetic word soup."""
    import json

    d = tmp_path / "text_tasks"
    d.mkdir()
    (d / "tiny_text.yaml").write_text(TEXT_TASK)
    for split, n, seed in (("train", 60, 0), ("test", 6, 1)):
        (d / f"tiny_text.{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(n, seed)))
    return d


# --- packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", [2, 7, 16, 64])
def test_packing_keeps_every_token_once_and_separates_documents(tok, block):
    from clbench.training.train import IGNORE, collate

    docs = _docs(9)
    eos = tok.eos_token_id
    examples = packing.pack_documents(docs, tok, block)
    assert all(len(e.input_ids) <= block and e.n_prompt == 0 for e in examples)
    assert all(len(e.input_ids) == block for e in examples[:-1])
    # consecutive blocks share exactly one token: the last of one is the (context-only) first of the next
    assert all(a.input_ids[-1] == b.input_ids[0] for a, b in zip(examples, examples[1:]))
    # the targets (each block minus its first token) are the stream minus its leading EOS, each token once
    targets = [t for e in examples for t in e.input_ids[1:]]
    expected = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert targets == expected
    # documents are separated by EOS: the stream starts with one, and splitting at EOS gives the documents back
    stream = [examples[0].input_ids[0]] + targets
    assert stream[0] == eos
    pieces, cur = [], []
    for t in stream[1:]:
        if t == eos:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert pieces == docs and not cur
    # the loss covers every position after each block's first token (padding of the last block excluded)
    batch = collate(examples, tok.pad_token_id)
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == len(expected)


def test_packing_refuses_a_tokenizer_without_eos(tok):
    from clbench.errors import DataError

    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="EOS"):
        packing.pack_documents(["a b"], NoEos(), 8)


def test_text_loss_covers_every_token(tok, one_thread):
    """lm_loss on packed blocks (LM head only at target positions) equals the mean NLL of every next
    token computed from the model's full logits."""
    from clbench.run import models
    from clbench.training.train import collate

    from clbench.method.lm import lm_loss
    model = models.build_tiny_model(0, len(tok)).eval()
    examples = packing.pack_documents(_docs(12), tok, 24)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        loss = lm_loss(model, batch, head_only_targets=True)
        nll, n = 0.0, 0
        for e in examples:  # by hand, one block at a time, no padding
            ids = torch.tensor([e.input_ids])
            logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            nll -= sum(float(logp[i, ids[0, i + 1]]) for i in range(len(e.input_ids) - 1))
            n += len(e.input_ids) - 1
    assert n == sum(len(e.input_ids) - 1 for e in examples)
    assert float(loss) == pytest.approx(nll / n, rel=1e-5)


# --- bits per byte ---------------------------------------------------------------------


def test_per_byte_likelihood_is_lm_eval_bits_per_byte_by_hand(tok, text_task_dir, tmp_path, one_thread):
    """R's value for a text task is 2^-(bits per byte) where bits per byte is lm-eval's rolling
    log-likelihood over the UTF-8 bytes; here recomputed from the model's own token log-probs."""
    from clbench.run import models
    from clbench.data import tasks as taskcat
    from clbench.run.evaluate import evaluate
    from clbench.data.tasks import read_jsonl

    defs = taskcat.load_tasks([text_task_dir])
    d = defs["tiny_text"]
    assert d.text and d.metric_name == "per_byte_likelihood"
    lm_tasks = taskcat.build_lm_eval_tasks([d], tmp_path)
    model = models.build_tiny_model(0, len(tok))
    scores, _, _ = evaluate(model, tok, lm_tasks, {"tiny_text": d.primary_metric}, cpu_rt(tok), batch_size=4, log_samples=False)
    bpb_lm_eval = scores["tiny_text"]
    # by hand: lm-eval predicts each document's first token from its prefix token (BOS, else EOS)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total_ll, total_bytes = 0.0, 0
    model.eval()
    with torch.no_grad():
        for doc in read_jsonl(text_task_dir / "tiny_text.test.jsonl"):
            ids = [prefix] + tok(doc["text"], add_special_tokens=False)["input_ids"]
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            total_ll += sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
            total_bytes += len(doc["text"].encode("utf-8"))
    bpb = -total_ll / total_bytes / math.log(2)
    assert bpb_lm_eval == pytest.approx(bpb, rel=1e-4)
    assert d.score(bpb_lm_eval) == pytest.approx(2.0 ** -bpb, rel=1e-4)


# --- replay by token fraction ----------------------------------------------------------


class _Task:
    def __init__(self, output_type):
        self.OUTPUT_TYPE = output_type


def _stage(t, task, run, cfg):
    from clbench.method import Stage

    return Stage(stage=t, task=task, seed=0, run=run, train_config=cfg, generator=torch.Generator().manual_seed(t))


def test_replay_token_fraction_is_honoured_in_token_counts(tok):
    from clbench.method import RunContext, load_builtin_methods, make_method
    from clbench.training.train import Example

    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    kinds = {"old_text": "loglikelihood_rolling", "new_text": "loglikelihood_rolling", "instr": "multiple_choice"}
    run = RunContext(method="replay", seed=0, tasks=list(kinds), device=torch.device("cpu"), tokenizer=tok,
                       task=lambda name: _Task(kinds[name]))
    meth = make_method("replay", {"token_fraction": 0.25, "ratio": 0.5, "m": 40})
    cfg = TrainConfig(steps=2, batch_size=4, max_length=32)
    old = packing.pack_documents(_docs(40, 3), tok, 32)
    s1 = _stage(1, "old_text", run, cfg)
    meth.stage_start(None, s1)
    for i in range(0, len(old), 4):
        meth.batch(old[i:i + 4], s1)
    meth.stage_end(None, s1)
    s2 = _stage(2, "new_text", run, cfg)
    meth.stage_start(None, s2)
    new = packing.pack_documents(_docs(20, 4), tok, 32)
    for i in range(0, len(new) - 3, 4):
        micro = new[i:i + 4]
        mixed = meth.batch(micro, s2)
        assert mixed[:4] == micro
        n_new = sum(len(e.input_ids) - 1 for e in micro)
        n_rep = sum(len(e.input_ids) - 1 for e in mixed[4:])
        assert n_rep == round(0.25 * n_new / 0.75)  # replayed targets are 25% of the mixed batch's, to a token
        assert set(meth.last_task_of_replay) == {"old_text"}
        olds = {tuple(e.input_ids) for e in old}
        assert all(tuple(e.input_ids) in olds or any(o[:len(e.input_ids)] == tuple(e.input_ids) for o in olds)
                   for e in mixed[4:])
    meth.stage_end(None, s2)
    # an instruction stage keeps the example ratio: k = round(0.5 * 4 / 0.5) = 4 replayed examples
    s3 = _stage(3, "instr", run, cfg)
    meth.stage_start(None, s3)
    micro = [Example([1, 2, 3, 4], 3) for _ in range(4)]
    assert len(meth.batch(micro, s3)) == 8


# --- schedules -------------------------------------------------------------------------


def test_rewarming_cosine_matches_hand_values_and_rewarms_every_stage(tok, one_thread):
    """Ibrahim et al. 2024: each stage warms up (10% of 10 steps = 1 here) to the peak and decays by
    cosine to 0.1 of it; the loop's optimizer takes exactly these learning rates, again at stage 2."""
    from clbench.method import RunContext, load_builtin_methods, make_method
    from clbench.run import models
    from clbench.training.stage import run_stage

    cfg = TrainConfig(lr=1e-3, steps=10, batch_size=4, max_length=24, lr_schedule="cosine", warmup_fraction=0.1,
                      min_lr_ratio=0.1)
    # warm = round(0.1 * 10) = 1: step 0 -> 1/1; step s >= 1: 0.1 + 0.45 * (1 + cos((s - 1) * 20 degrees)),
    # with cos 0, 20, ..., 160 degrees = 1, .9396926, .7660444, .5, .1736482, -.1736482, -.5, -.7660444, -.9396926
    hand = [1.0, 1.0, 0.9728617, 0.8947200, 0.775, 0.6281417, 0.4718583, 0.325, 0.2052800, 0.1271383]
    assert [lr_factor(cfg, 10, s) for s in range(10)] == pytest.approx(hand, abs=1e-6)
    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    meth = make_method("full_ft", {})
    run = RunContext(method="full_ft", seed=0, tasks=["a", "b"], device=torch.device("cpu"), tokenizer=tok)
    model = models.build_tiny_model(0, len(tok))
    examples = packing.pack_documents(_docs(30), tok, 24)
    for t in (1, 2):
        seen = []
        model, stats, _ = run_stage(model, meth, examples, cfg, run, t, "ab"[t - 1], cpu_rt(tok), on_step=lambda step, loss, lr: seen.append(lr))
        assert [x / 1e-3 for x in seen] == pytest.approx(hand, abs=1e-6)
        assert stats["schedule"]["warmup_steps"] == 1 and stats["schedule"]["lr_last"] == pytest.approx(1.271383e-4, rel=1e-5)


def test_wsd_matches_hand_values_and_transformers():
    # warmup 2, stable, then the last round(0.3 * 10) = 3 steps decay 1-sqrt to 0.1: p = 0, 1/3, 2/3
    cfg = TrainConfig(lr=1.0, steps=10, lr_schedule="wsd", warmup_steps=2, decay_fraction=0.3, min_lr_ratio=0.1,
                      decay_shape="1-sqrt")
    hand = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1 + 0.9 * (1 - math.sqrt(1 / 3)), 0.1 + 0.9 * (1 - math.sqrt(2 / 3))]
    assert [lr_factor(cfg, 10, s) for s in range(10)] == pytest.approx(hand)
    assert hand[-2:] == pytest.approx([0.480385, 0.265153], abs=1e-6)
    # without warmup the factors are transformers' get_wsd_schedule's, for every decay shape
    from transformers.optimization import get_wsd_schedule

    for shape in ("linear", "cosine", "1-sqrt"):
        c = TrainConfig(lr=1.0, steps=20, lr_schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.1, decay_shape=shape)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_wsd_schedule(opt, num_warmup_steps=0, num_decay_steps=5, num_training_steps=20, decay_type=shape,
                                 min_lr_ratio=0.1)
        theirs = []
        for _ in range(20):
            theirs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert [lr_factor(c, 20, s) for s in range(20)] == pytest.approx(theirs), shape


def test_schedule_settings_fail_clearly(tmp_path):
    import yaml

    from clbench.config import load_config
    from clbench.errors import ConfigError

    bad = {
        "train.decay_fraction": ({"lr_schedule": "cosine", "decay_fraction": 0.1}, "belong to lr_schedule wsd"),
        "train.min_lr_ratio": ({"min_lr_ratio": 0.1}, "needs a decaying lr_schedule"),
        "train.warmup_fraction": ({"warmup_steps": 2, "warmup_fraction": 0.1}, "not both"),
        "wsd phases": ({"lr_schedule": "wsd", "steps": 10, "warmup_steps": 9, "decay_fraction": 0.2}, "exceed the stage's 10 steps"),
    }
    for name, (train, msg) in bad.items():
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({"model": "tiny", "stream": "cls4", "methods": [{"name": "full_ft"}], "train": train}))
        with pytest.raises(ConfigError, match=msg):
            load_config(p)
    p.write_text(yaml.safe_dump({"model": "tiny", "stream": "cls4", "train": {"lr_schedule": "wsd", "steps": 10},
                                 "methods": [{"name": "full_ft", "train": {"warmup_steps": 10}}]}))
    with pytest.raises(ConfigError, match="methods.0.train"):
        load_config(p)


# --- a mixed stream: raw text, then an instruction task --------------------------------


def test_mixed_text_then_instruction_stream_resumes_to_the_same_matrix(tmp_path, text_task_dir, one_thread):
    from conftest import two_stage_run_and_resume

    res = two_stage_run_and_resume(
        tmp_path, [{"name": "full_ft"}, {"name": "replay", "options": {"token_fraction": 0.25, "m": 8}}],
        tasks=("tiny_text", "tiny_parity"), task_dirs=[text_task_dir],
        train={"max_length": 32, "lr_schedule": "wsd", "decay_fraction": 0.34, "min_lr_ratio": 0.1})
    seed = res["methods"]["replay"]["seeds"]["0"]
    assert all(0 < row[0] <= 1 for row in seed["matrix"])  # the text column: 2^-bpb
    assert [s["schedule"]["decay_steps"] for s in seed["stages"]] == [1, 1]
    assert res["run"]["tasks"] == ["tiny_text", "tiny_parity"]
