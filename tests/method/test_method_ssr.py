"""SSR on the tiny model and the tiny tasks: the ICL prompts are the authors' Input/Output
format, parsing follows their parser, KMeans quotas and nearest-first picks on hand-made
points, each task's synthetic set holds <= per_task instances, its targets equal the stage-t
model's choice scoring (a plain forward's log-likelihoods) or transformers' greedy decoding,
it is fixed after stage t, later stages train on it, it survives a state_dict round trip;
plus a two-stage CLI run resumed after stage 1."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clbench.method import MethodError, RunContext, call_hook, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.data import tasks as taskcat
from clbench.data.tasks import encode_pair
from clbench.run import models
from clbench.runtime import Runtime
from clbench.training.stage import start_stage
from clbench.training.train import tokenize, train_stage
from conftest import REPO, two_stage_run_and_resume

load_method_file(REPO / "methods" / "ssr.py")
from clbench_builtin.methods import ssr  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SMALL = {"n_demos": 4, "samples_per_prompt": 2, "max_new_tokens": 24, "keep_unfinished": True, "per_task": 5,
         "n_clusters": 3, "batch_size": 12}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    defs = taskcat.load_tasks([REPO / "configs" / "tiny_tasks"])
    return taskcat.build_lm_eval_tasks([defs[n] for n in ("tiny_parity", "tiny_copy", "tiny_compare")],
                                       tmp_path_factory.mktemp("c"))


def make_run(tok, lm, tasks):
    pairs = {n: taskcat.training_examples(t, tok.eos_token if t.OUTPUT_TYPE == "generate_until" else None)
             for n, t in lm.items()}
    return RunContext(method="ssr", seed=0, tasks=list(tasks), device=CPU, tokenizer=tok,
                        examples=lambda t: tokenize(pairs[t], tok, 64)[:16], pairs=lambda t: list(pairs[t]),
                        tokenize=lambda p: tokenize(p, tok, 64), task=lambda t: lm[t])


def stage(meth, model, run, t, task):
    cfg = TrainConfig(steps=3, lr=3e-3, batch_size=8, max_length=64)
    model, st = start_stage(model, meth, run.examples(task), cfg, run, t, task, Runtime(CPU, None, 0))
    train_stage(model, meth, list(st.examples), cfg, st, Runtime(CPU, None, 0))
    return call_hook(meth, "stage_end", model, st), st


def test_prompt_and_parser_follow_the_authors_format():
    assert ssr.icl_prompt([("Q: 1\nAnswer:", "odd"), ("Q: 2\nAnswer:", "even")]) == \
        "Input: Q: 1\nAnswer:\nOutput: odd\n\nInput: Q: 2\nAnswer:\nOutput: even\n\nInput:"
    text = " Q: 3\nAnswer:\nOutput: odd\n\nInput: Q: 4 Output: a Output: b\n\nInput:   \nOutput: x\n\nInput: Q: 5 cut"
    assert ssr.parse(text, keep_unfinished=False) == ["Q: 3\nAnswer:"]
    assert ssr.parse(text, keep_unfinished=True) == ["Q: 3\nAnswer:", "Q: 5 cut"]


def test_quotas_and_kmeans_selection():
    assert ssr.quotas([6, 2], 4) == [3, 1]
    assert ssr.quotas([5, 3, 2], 5) == [3, 1, 1]  # 2.5, 1.5, 1.0: floors 2, 1, 1, one unit to the first
    assert ssr.quotas([2, 1], 10) == [2, 1]
    rng = np.random.default_rng(0)
    a = np.array([0.0, 1.0]) + rng.normal(0, 0.05, (6, 2))  # a tight cluster near (0, 1)
    b = np.array([1.0, 0.0]) + rng.normal(0, 0.05, (2, 2))  # and one near (1, 0)
    emb = np.concatenate([a, b])
    picked = ssr.kmeans_select(emb, 4, 2, seed=0)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ca, cb = unit[:6].mean(0), unit[6:].mean(0)
    near_a = sorted(range(6), key=lambda i: np.linalg.norm(unit[i] - ca))[:3]
    near_b = min((6, 7), key=lambda i: np.linalg.norm(unit[i] - cb))
    assert sorted(picked) == sorted(near_a + [near_b])
    assert ssr.kmeans_select(emb, 8, 2, seed=0) == list(range(8))


def test_synthesis_is_a_function_of_the_base_model_and_seed(tok, lm):
    tasks = ("tiny_parity", "tiny_copy", "tiny_compare")
    a, b = make_method("ssr", SMALL), make_method("ssr", SMALL)
    a.setup(models.build_tiny_model(0, len(tok)), make_run(tok, lm, tasks))
    b.setup(models.build_tiny_model(0, len(tok)), make_run(tok, lm, tasks))
    assert a.candidates == b.candidates and set(a.candidates) == {"tiny_parity", "tiny_copy"}  # not the last task
    assert len(a.last_prompts["tiny_parity"]) == 4 * 3  # ordered pairs of 4 demonstrations
    for task, cands in a.candidates.items():
        st = a.stats[task]
        assert len(cands) == SMALL["per_task"] < st["distinct"] <= st["parsed"]


def test_sets_are_relabelled_by_the_stage_model_fixed_and_rehearsed(tok, lm):
    tasks = ("tiny_parity", "tiny_copy", "tiny_compare")
    run = make_run(tok, lm, tasks)
    meth = make_method("ssr", SMALL)
    model = meth.setup(models.build_tiny_model(0, len(tok)), run)
    for t, task in enumerate(tasks, 1):
        model, st = stage(meth, model, run, t, task)
        own = run.examples(task)
        earlier = [ex for prev in tasks[:t - 1] for ex in meth.examples[prev]]
        assert list(st.examples) == own + earlier  # stage t trains on its task, then the earlier sets
        if task == "tiny_parity":  # choice scoring by the stage-1 model (a plain forward per choice)
            parity = [(x, y) for x, y in meth.synthetic[task]]
            for x, y in parity:
                ll = {}
                for c in ("even", "odd"):
                    ci, ti = encode_pair(tok, x, f" {c}")
                    with torch.no_grad():
                        lp = F.log_softmax(model(torch.tensor([ci + ti])).logits[0].float(), -1)
                    ll[c] = sum(lp[len(ci) - 1 + j, ti[j]].item() for j in range(len(ti)))
                assert y == f" {max(ll, key=ll.get)}"
            saved_parity = list(meth.synthetic[task])
        if task == "tiny_copy":  # greedy decoding by the stage-2 model (transformers' generate), cut at "\n"
            for x, y in meth.synthetic[task]:
                ids = torch.tensor([tok(x, add_special_tokens=False)["input_ids"]])
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                         do_sample=False, pad_token_id=0, eos_token_id=0)[0, ids.shape[1]:].tolist()
                out = out[:out.index(0)] if 0 in out else out
                assert y == tok.decode(out).split("\n")[0] + tok.eos_token
        for prev, pairs in meth.synthetic.items():
            assert len(pairs) <= SMALL["per_task"]
            assert [p[0] for p in pairs] == meth.candidates[prev]  # the selected inputs, contexts as written
            assert meth.examples[prev] == run.tokenize(pairs)
    assert meth.synthetic["tiny_parity"] == saved_parity  # fixed after stage 1: never relabelled
    assert "tiny_compare" not in meth.synthetic  # the last task's set would never be trained on

    other = make_method("ssr", SMALL)
    other.load_state_dict(meth.state_dict())
    assert other.synthetic == meth.synthetic and other.examples == meth.examples


def test_per_document_choices_are_refused(tok, lm):
    class PerDoc:  # an lm-eval task view whose documents carry their own choices
        OUTPUT_TYPE = "multiple_choice"
        config = lm["tiny_parity"].config

        def training_docs(self):
            return [{"c": ["a", "b"]}, {"c": ["c", "d"]}]

        def doc_to_choice(self, doc):
            return doc["c"]

    run = make_run(tok, lm, ("tiny_parity", "tiny_copy"))
    run.task = lambda t: PerDoc()
    with pytest.raises(MethodError, match="choices that differ"):
        make_method("ssr", SMALL).setup(models.build_tiny_model(0, len(tok)), run)


def test_two_stage_run_and_resume(tmp_path):
    small = {k: v for k, v in SMALL.items() if k != "batch_size"}
    two_stage_run_and_resume(tmp_path, [{"name": "ssr", "options": small},
                                        {"name": "ssr", "label": "ssr_lora", "options": {**small, "base": "lora",
                                                                                         "base_options": {"r": 4}}}],
                             tasks=("tiny_copy", "tiny_parity"), train={"max_train_examples": 16})
