"""L2P (methods/l2p.py) on the tiny model: each row's prompts are the top-N by cosine similarity
of the keys to a query computed by hand (an untouched copy of the model, run on the row's
context alone, mean of its last hidden states), in every path clbench scores through: training's
target logits, the prefix-shared log-likelihoods (including contexts cut to max_length), greedy
generation; lm-eval's own log-likelihood path refuses; the surrogate loss and what trains; and a
2-stage run with resume."""

import copy

import pytest
import torch
import torch.nn.functional as F

from clbench.method import RunContext, call_hook, count_trainable, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.method import prompting
from clbench.method.lm import lm_loss, target_logits
from clbench.run import models
from clbench.training.stage import run_stage
from clbench.training.train import collate, tokenize
from conftest import REPO, left_padded_generate, two_stage_run_and_resume
from harness import cpu_rt

load_method_file(REPO / "methods" / "l2p.py")

CPU = torch.device("cpu")
PAIRS = [("Number: 12\nEven or odd?\nAnswer:", " even"), ("Review: dull and slow\nSentiment:", " negative"),
         ("Number: 305\nEven or odd?\nAnswer:", " odd"), ("Which is larger, 8 or 2?\nAnswer:", " first"),
         ("Copy: abc\nAnswer:", " abc"), ("Review: great fun\nSentiment:", " positive")]
OPTS = {"pool_size": 6, "length": 2, "top_k": 2}


def setup(tok, options=OPTS, seed=0):
    """(method, prompted model, untouched twin); the pool's prompts and keys drawn wide enough
    that different contexts pick different prompts"""
    meth = make_method("l2p", options)
    base = models.build_tiny_model()
    plain = copy.deepcopy(base).eval()
    run = RunContext(method="l2p", seed=seed, tasks=["a", "b"], device=CPU, tokenizer=tok)
    model = call_hook(meth, "setup", base, run)
    inj = prompting.injector_of(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        inj.keys.copy_(torch.randn(inj.keys.shape, generator=g))
        inj.prompts.copy_(torch.randn(inj.prompts.shape, generator=g))
    return meth, model.eval(), plain


def hand_prefix(plain, inj, ctx_ids):
    """The prompts of one context, computed by hand: query = mean last hidden state of the frozen
    model over the context; the top_k keys by cosine similarity, most similar first."""
    with torch.no_grad():
        q = plain.model(input_ids=torch.tensor([ctx_ids])).last_hidden_state[0].mean(0)
    sims = [float(torch.dot(q, k) / (q.norm() * k.norm())) for k in inj.keys.detach()]
    order = sorted(range(len(sims)), key=lambda i: -sims[i])[:inj.top_k]
    return order, torch.cat([inj.prompts.detach()[i] for i in order])


def hand_logits(plain, prefix, ids):
    with torch.no_grad():
        x = torch.cat([prefix[None], plain.get_input_embeddings()(torch.tensor([ids]))], 1)
        return plain(inputs_embeds=x).logits[0, prefix.shape[0]:]


def test_selection_is_by_key_query_similarity_of_the_context_and_in_the_training_forward(tok):
    meth, model, plain = setup(tok)
    inj = prompting.injector_of(model)
    exs = tokenize(PAIRS, tok, 64)
    batch = collate(exs, tok.pad_token_id)
    with torch.no_grad():
        for head_only in (True, False):
            got, _ = target_logits(model, batch, head_only)
            want, picks = [], []
            for e in exs:
                order, prefix = hand_prefix(plain, inj, e.input_ids[:e.n_prompt])
                picks.append(order)
                want.append(hand_logits(plain, prefix, e.input_ids)[e.n_prompt - 1:len(e.input_ids) - 1])
            assert inj.last[1].tolist() == picks
            torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
    assert len({tuple(p) for p in picks}) > 1  # the rows do not all pick the same prompts
    # the target never enters the query: other targets, the same selection
    other = collate(tokenize([(c, " zzz qq") for c, _ in PAIRS], tok, 64), tok.pad_token_id)
    with torch.no_grad():
        target_logits(model, other)
    assert inj.last[1].tolist() == picks


def test_surrogate_loss_by_hand_and_what_trains(tok, one_thread):
    meth, model, plain = setup(tok)
    inj = prompting.injector_of(model)
    exs = tokenize(PAIRS[:4], tok, 64)
    batch = collate(exs, tok.pad_token_id)
    model.train()
    call_hook(meth, "batch", exs, None)
    out = lm_loss(model, batch, return_forward=True)
    term = call_hook(meth, "extra_loss", model, batch, None, out)
    want = 0.0
    for e in exs:
        with torch.no_grad():
            q = plain.model(input_ids=torch.tensor([e.input_ids[:e.n_prompt]])).last_hidden_state[0].mean(0)
        order, _ = hand_prefix(plain, inj, e.input_ids[:e.n_prompt])
        want += sum(1 - float(F.cosine_similarity(q, inj.keys.detach()[i], dim=0)) for i in order)
    assert float(term.detach()) == pytest.approx(0.1 * want / len(exs), rel=1e-5)
    term.backward()
    assert inj.keys.grad is not None and inj.keys.grad.abs().sum() > 0
    assert inj.prompts.grad is None  # the surrogate moves keys only


def _train(tok, options, stages=2):
    meth = make_method("l2p", options)
    run = RunContext(method="l2p", seed=0, tasks=["a", "b"], device=CPU, tokenizer=tok)
    model = call_hook(meth, "setup", models.build_tiny_model(), run)
    cfg = TrainConfig(lr=0.03, steps=2, batch_size=3, max_length=64)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    stats = []
    for t in range(1, stages + 1):
        model, st, _ = run_stage(model, meth, tokenize(PAIRS[3 * (t - 1):3 * t], tok, 64), cfg, run, t, "ab"[t - 1], cpu_rt(tok))
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
        stats.append(st)
    return model, snaps, stats


def test_base_frozen_pool_and_keys_train_and_lambda_zero_leaves_the_keys(tok, one_thread):
    model, (s0, s1, s2), stats = _train(tok, OPTS)
    keys = [k for k in s0 if not k.startswith("clbench_prompt.")]
    assert all(torch.equal(s0[k], s2[k]) for k in keys)  # the base model bit-identical
    for s, t in ((s0, s1), (s1, s2)):
        assert not torch.equal(s["clbench_prompt.keys"], t["clbench_prompt.keys"])
        assert not torch.equal(s["clbench_prompt.prompts"], t["clbench_prompt.prompts"])
    d = model.config.hidden_size
    assert count_trainable(model) == 6 * 2 * d + 6 * d
    assert 0 < stats[0]["method_stats"]["surrogate_ratio"] and -1 <= stats[0]["method_stats"]["key_query_cos"] <= 1
    _, (z0, _, z2), _ = _train(tok, {**OPTS, "lam": 0.0})
    assert torch.equal(z0["clbench_prompt.keys"], z2["clbench_prompt.keys"])  # keys learn through the surrogate only


def _requests(tok, lm_tasks):
    from clbench.data.tasks import encode_pair

    out = []
    for name, t in lm_tasks.items():
        for doc in list(t.eval_docs)[:4]:
            for choice in t.doc_to_choice(doc):
                out.append(encode_pair(tok, t.doc_to_text(doc), t.config.target_delimiter + choice))
    return out


def _eval_tasks(tmp_path):
    from clbench.data import tasks as taskcat

    defs = taskcat.load_tasks([REPO / "configs" / "tiny_tasks"])
    names = ["tiny_parity", "tiny_compare"]
    return taskcat.build_lm_eval_tasks([defs[n] for n in names], tmp_path / "cache"), \
        {n: defs[n].primary_metric for n in names}


@pytest.mark.parametrize("max_length", [None, 14])
def test_evaluation_scores_each_context_with_its_own_selection(tok, tmp_path, monkeypatch, max_length):
    """The prefix-shared path against the hand computation (max_length 14: contexts cut from the
    left as lm-eval cuts them, the query over what is left); the scores move with the prompts;
    lm-eval's own path refuses instead of scoring without the contexts' selection."""
    from clbench.run import evaluate as E

    meth, model, plain = setup(tok)
    inj = prompting.injector_of(model)
    lm_tasks, primary = _eval_tasks(tmp_path)
    reqs = _requests(tok, lm_tasks)
    lm = E.lm_class()(pretrained=model, tokenizer=tok, batch_size=8, device="cpu", max_length=max_length)
    got = lm._loglikelihood_tokens([(None, c, x) for c, x in reqs])
    ml = lm.max_length
    if max_length:
        assert any(len(c) + len(x) > ml + 1 for c, x in reqs)
    for (c, x), (ll, _) in zip(reqs, got):
        whole = (c + x)[-(ml + 1):]
        ctx = whole[:-len(x)]
        _, prefix = hand_prefix(plain, inj, ctx)
        lg = hand_logits(plain, prefix, whole[:-1])[len(ctx) - 1:]
        ref = float(torch.log_softmax(lg.float(), -1).gather(1, torch.tensor(x)[:, None]).sum())
        assert ll == pytest.approx(ref, abs=1e-4)
    with torch.no_grad():
        inj.prompts.add_(torch.randn(inj.prompts.shape, generator=torch.Generator().manual_seed(2)))
    moved = lm._loglikelihood_tokens([(None, c, x) for c, x in reqs])
    assert max(abs(a[0] - b[0]) for a, b in zip(got, moved)) > 1e-3
    monkeypatch.setenv("CLBENCH_EVAL_PREFIX_SHARING", "0")
    with pytest.raises(prompting.PromptError, match="where the contexts end"):
        E.evaluate(model, tok, lm_tasks, primary, cpu_rt(tok), batch_size=8, limit=2)


def test_generation_queries_the_whole_prompt(tok):
    from clbench.method import generation as G

    meth, model, plain = setup(tok)
    inj = prompting.injector_of(model)
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in PAIRS[:4]]
    n_new, want = 4, []
    for r in rows:
        _, prefix = hand_prefix(plain, inj, r)
        ids = list(r)
        for _ in range(n_new):
            ids.append(int(hand_logits(plain, prefix, ids)[-1].argmax()))
        want.append(ids[len(r):])
    texts = G.greedy_until(model, tok, rows, [[0, 1], [2, 3]], max_new_tokens=n_new, eos_ids=[], pad=tok.pad_token_id)
    assert texts == [tok.decode(w, skip_special_tokens=True) for w in want]
    # transformers' generate (lm-eval's own path): the query skips the left padding
    assert left_padded_generate(model, tok, rows, n_new) == want


def test_refuses_raw_text_streams():
    meth = make_method("l2p", {})
    assert call_hook(meth, "stream_refusal", {"a": "multiple_choice"}) is None
    assert "raw-text" in call_hook(meth, "stream_refusal", {"a": "multiple_choice", "b": "loglikelihood_rolling"})
    with pytest.raises(Exception, match="top_k"):
        make_method("l2p", {"top_k": 11})


def test_two_stage_run_and_resume(tmp_path, one_thread):
    res = two_stage_run_and_resume(tmp_path, [{"name": "l2p", "options": {"pool_size": 4, "length": 2, "top_k": 2}}],
                                   train={"lr": 0.03})
    stages = res["methods"]["l2p"]["seeds"]["0"]["stages"]
    assert all("surrogate_ratio" in s["method_stats"] for s in stages)
