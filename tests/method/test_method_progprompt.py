"""Progressive Prompts (methods/progressive_prompts.py) and the soft-prompt machinery it runs on
(clbench/method/prompting.py): the prompt is in every forward clbench makes, checked against an
independent computation (an untouched copy of the tiny model fed [prompt; token embeddings]
through inputs_embeds): training's target logits (LM head at the targets only, and the whole
head), evaluation's log-likelihoods (prefix-shared and lm-eval's own path), greedy generation
(clbench's KV-cache decode, lm-eval's transformers generate); then the method's invariants over
two stages and a 2-stage run with resume."""

import copy

import pytest
import torch

from clbench.method import RunContext, call_hook, count_trainable, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.method import prompting
from clbench.method.lm import target_logits
from clbench.run import models
from clbench.training.stage import run_stage
from clbench.training.train import collate, tokenize
from conftest import REPO, left_padded_generate, two_stage_run_and_resume
from harness import cpu_rt

load_method_file(REPO / "methods" / "progressive_prompts.py")
from clbench_builtin.methods import progressive_prompts as pp  # noqa: E402  (after the loads above)

CPU = torch.device("cpu")
PAIRS = [("Number: 12\nEven or odd?\nAnswer:", " even"), ("Number: 7\nEven or odd?\nAnswer:", " odd"),
         ("Number: 305\nEven or odd?\nAnswer:", " odd"), ("Which is larger, 8 or 2?\nAnswer:", " first")]
STAGE2 = [("Review: great fun\nSentiment:", " positive"), ("Review: dull and slow\nSentiment:", " negative"),
          ("Copy: abc\nAnswer:", " abc"), ("Copy: 4421\nAnswer:", " 4421")]


def prompted_model(n_active=2, length=3, seed=0):
    """(tiny model with `n_active` random prompts of `length` in front, the untouched twin, prefix)"""
    model = models.build_tiny_model()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    init = torch.randn((3, length, model.config.hidden_size), generator=g)
    inj = pp.ProgressivePrompt(3, length, init)
    inj.order = list(range(n_active))[::-1]
    prompting.attach(model, inj)
    return model.eval(), plain.eval(), inj.prefix().detach()


def independent_logits(plain, prefix, ids_rows):
    """logits of each token row fed after the prefix, one row at a time (no padding, no cache)"""
    out = []
    with torch.no_grad():
        for ids in ids_rows:
            emb = plain.get_input_embeddings()(torch.tensor([ids]))
            x = torch.cat([prefix[None], emb], 1)
            out.append(plain(inputs_embeds=x).logits[0, prefix.shape[0]:])
    return out


@pytest.mark.parametrize("head_only", [True, False])
def test_training_forward_sees_the_prompt(tok, head_only):
    model, plain, prefix = prompted_model()
    exs = tokenize(PAIRS, tok, 64)
    batch = collate(exs, tok.pad_token_id)
    with torch.no_grad():
        got, tgt = target_logits(model, batch, head_only)
        bare, _ = target_logits(plain, batch, head_only)
    ref = []
    for e, lg in zip(exs, independent_logits(plain, prefix, [e.input_ids for e in exs])):
        ref.append(lg[e.n_prompt - 1:len(e.input_ids) - 1])
    ref = torch.cat(ref)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - bare).abs().max() > 1e-3  # the prompt changes the numbers


def _loglikelihoods(model, tok, lm_tasks, primary, sharing, monkeypatch):
    from clbench.run import evaluate as E

    monkeypatch.setenv("CLBENCH_EVAL_PREFIX_SHARING", "1" if sharing else "0")
    scores, samples, _ = E.evaluate(model, tok, lm_tasks, primary, cpu_rt(tok), batch_size=8,
                                    limit=6, log_samples=True)
    return {t: {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in recs} for t, recs in samples.items()}, scores


def _eval_tasks(tmp_path, names=("tiny_parity", "tiny_compare")):
    from clbench.data import tasks as taskcat

    defs = taskcat.load_tasks([REPO / "configs" / "tiny_tasks"])
    return taskcat.build_lm_eval_tasks([defs[n] for n in names], tmp_path / "cache"), \
        {n: defs[n].primary_metric for n in names}


def test_evaluation_loglikelihoods_see_the_prompt_on_both_paths(tok, tmp_path, monkeypatch):
    """Prefix-shared scores == lm-eval's own path == the independent computation, and they move
    when the prompt does (the mechanism is in the evaluated forward)."""
    from clbench.data.tasks import encode_pair

    model, plain, prefix = prompted_model()
    lm_tasks, primary = _eval_tasks(tmp_path)
    shared, _ = _loglikelihoods(model, tok, lm_tasks, primary, True, monkeypatch)
    lmeval, _ = _loglikelihoods(model, tok, lm_tasks, primary, False, monkeypatch)
    for task, docs in shared.items():
        t = lm_tasks[task]
        for doc_id, lls in docs.items():
            doc = list(t.eval_docs)[doc_id]
            ctx = t.doc_to_text(doc)
            for ll, ll2, choice in zip(lls, lmeval[task][doc_id], t.doc_to_choice(doc)):
                c, x = encode_pair(tok, ctx, t.config.target_delimiter + choice)
                lg = independent_logits(plain, prefix, [c + x])[0][len(c) - 1:len(c) + len(x) - 1]
                ref = float(torch.log_softmax(lg.float(), -1).gather(1, torch.tensor(x)[:, None]).sum())
                assert ll == pytest.approx(ref, abs=1e-4) and ll2 == pytest.approx(ref, abs=1e-4), (task, doc_id)
    inj = prompting.injector_of(model)
    with torch.no_grad():
        inj.prompts[0].add_(0.5)
    moved, _ = _loglikelihoods(model, tok, lm_tasks, primary, True, monkeypatch)
    diff = max(abs(a - b) for t in shared for d in shared[t] for a, b in zip(shared[t][d], moved[t][d]))
    assert diff > 1e-3
    inj.order = []  # no prompt: the model's own scores
    bare, _ = _loglikelihoods(plain, tok, lm_tasks, primary, True, monkeypatch)
    none, _ = _loglikelihoods(model, tok, lm_tasks, primary, True, monkeypatch)
    assert none == bare


def test_generation_sees_the_prompt_with_a_kv_cache(tok):
    """clbench's greedy_until (KV cache, left-padded batches; the grouped prefill refused) and
    transformers' generate (lm-eval's path) give the tokens of a cache-free greedy loop over
    [prompt; tokens], row by row."""
    from clbench.method import generation as G

    model, plain, prefix = prompted_model()
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in PAIRS]
    n_new = 5
    assert not G._groupable(model, CPU, torch.bfloat16)
    want = []
    for r in rows:
        ids = list(r)
        for _ in range(n_new):
            ids.append(int(independent_logits(plain, prefix, [ids])[0][-1].argmax()))
        want.append(ids[len(r):])
    texts = G.greedy_until(model, tok, rows, [[0, 1], [2, 3]], max_new_tokens=n_new, eos_ids=[], pad=tok.pad_token_id)
    assert texts == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert left_padded_generate(model, tok, rows, n_new) == want


def _run(tok, stages, options=None):
    meth = make_method("progressive_prompts", options or {"length": 4})
    run = RunContext(method="progressive_prompts", seed=0, tasks=["a", "b"], device=CPU, tokenizer=tok)
    model = call_hook(meth, "setup", models.build_tiny_model(), run)
    cfg = TrainConfig(lr=0.3, steps=3, batch_size=4, weight_decay=1e-5, max_length=64)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    for t, pairs in enumerate(stages, 1):
        model, _, _ = run_stage(model, meth, tokenize(pairs, tok, 64), cfg, run, t, "ab"[t - 1], cpu_rt(tok))
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    return meth, model, snaps


def test_base_frozen_earlier_prompts_frozen_and_the_newest_prompt_first(tok, one_thread):
    meth, model, (s0, s1, s2) = _run(tok, [PAIRS, STAGE2])
    inj = prompting.injector_of(model)
    keys = [k for k in s0 if not k.startswith("clbench_prompt.")]
    assert keys and all(torch.equal(s0[k], s2[k]) for k in keys)  # the base model bit-identical
    p = [f"clbench_prompt.prompts.{i}" for i in range(2)]
    assert not torch.equal(s0[p[0]], s1[p[0]]) and torch.equal(s0[p[1]], s1[p[1]])  # stage 1 trains P1 only
    assert torch.equal(s1[p[0]], s2[p[0]]) and not torch.equal(s1[p[1]], s2[p[1]])  # P1 frozen in stage 2
    assert inj.order == [1, 0] and inj.length() == 8  # [P2; P1]
    torch.testing.assert_close(inj.prefix(), torch.cat([s2[p[1]], s2[p[0]]]))
    d = model.config.hidden_size
    assert call_hook(meth, "trainable_params", model) == 4 * d
    assert count_trainable(model) == 0  # after stage_end nothing trains
    # the prompts are initialised from vocabulary embeddings (init_new_prompt)
    emb = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, e) for e in emb) for row in s0[p[0]])


def test_trainable_count_during_a_stage(tok, one_thread):
    from clbench.training.stage import start_stage

    meth = make_method("progressive_prompts", {"length": 4})
    run = RunContext(method="progressive_prompts", seed=0, tasks=["a", "b", "c"], device=CPU, tokenizer=tok)
    model = call_hook(meth, "setup", models.build_tiny_model(), run)
    meth.trained = [1]
    model, _ = start_stage(model, meth, tokenize(PAIRS, tok, 64), TrainConfig(steps=1, batch_size=2), run, 2, "b", cpu_rt(tok))
    assert count_trainable(model) == 4 * model.config.hidden_size
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["clbench_prompt.prompts.1"]


def test_two_stage_run_and_resume(tmp_path, one_thread):
    res = two_stage_run_and_resume(tmp_path, [{"name": "progressive_prompts"}], train={"lr": 0.1})
    stages = res["methods"]["progressive_prompts"]["seeds"]["0"]["stages"]
    assert [s["first_loss"] != s["last_loss"] for s in stages] == [True, True]  # the prompts trained
