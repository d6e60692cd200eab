"""clbench.method.generation on the tiny model: greedy decoding equals transformers' own model.generate
on the same left-padded batch, stop strings and EOS end a row where transformers' output says,
seeded sampling repeats, top_k=1 sampling is greedy, log-likelihoods equal a plain forward's
sum of target log-probs, and TaskView reads tiny_copy's settings and scores as its YAML says."""

import pytest
import torch
import torch.nn.functional as F

from clbench.data.tasks import encode_pair
from clbench.method import generation as G
from clbench.run import models
from conftest import REPO
from harness import hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Repeat the word: apple\nAnswer:", "Number: 7\nEven or odd?\nAnswer:", "Which is larger, 3 or 50?",
           "ocean", "Repeat the word: stone stone stone\nAnswer: stone\n\nRepeat the word: river\nAnswer:"]


@pytest.fixture(scope="module")
def model(tok):
    return models.build_tiny_model(0, len(tok))


def test_greedy_equals_transformers_generate(model, tok):
    want = [tok.decode(r) for r in hf_greedy(model, tok, PROMPTS, 12)]
    got = G.generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS))
    assert [g[0] for g in got] == want
    assert all(len(w) > 0 for w in want)
    # in batches of 2 the padding differs; on this model the greedy tokens do not
    assert [g[0] for g in G.generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2)] == want


def test_mode_restored_and_weights_untouched(model, tok):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    G.generate(model, tok, PROMPTS[:2], max_new_tokens=3)
    assert model.training
    model.eval()
    G.loglikelihoods(model, tok, [("a", " b")])
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stop_strings_cut_where_transformers_text_has_them(model, tok):
    full = [tok.decode(r) for r in hf_greedy(model, tok, PROMPTS, 16)]
    # a stop string taken from the middle of each row's own greedy text, and one that never occurs
    stops = [f[3:5] for f in full]
    got = G.generate(model, tok, PROMPTS, max_new_tokens=16, stop=stops + ["\x00never"], batch_size=len(PROMPTS))
    for f, (g,) in zip(full, got):
        first = min(i for i in (f.find(s) for s in stops) if i >= 0)
        assert g == f[:first]
    assert any(len(g[0]) < len(f) for g, f in zip(got, full))


def test_eos_ends_a_row_as_in_transformers(tok):
    model = models.build_tiny_model(1, len(tok))
    t = hf_greedy(model, tok, PROMPTS, 10)[0][2]
    with torch.no_grad():  # EOS's output row becomes a slightly larger copy of a token row 0 emits at step 3
        model.get_output_embeddings().weight[tok.eos_token_id] = 1.05 * model.get_output_embeddings().weight[t]
    ref = hf_greedy(model, tok, PROMPTS, 10)
    got = G.generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS))
    assert [g[0] for g in got] == [tok.decode(r) for r in ref]
    assert any(len(r) < 10 for r in ref), "no row met EOS: the test would not exercise it"
    assert all(tok.eos_token not in g[0] for g in got)


def test_sampling_is_seeded(model, tok):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.6, top_k=50, repetition_penalty=1.2,
              num_return_sequences=3, batch_size=2)
    a = G.generate(model, tok, PROMPTS, seed=5, **kw)
    assert a == G.generate(model, tok, PROMPTS, seed=5, **kw)
    assert a == G.generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    assert a != G.generate(model, tok, PROMPTS, seed=6, **kw)
    assert len(a) == len(PROMPTS) and all(len(x) == 3 for x in a)
    assert len({s for x in a for s in x}) > len(PROMPTS)  # the 3 samples of a prompt are not all one
    with pytest.raises(ValueError):
        G.generate(model, tok, PROMPTS, max_new_tokens=2, do_sample=True)


def test_top_k_one_sampling_is_greedy(model, tok):
    greedy = G.generate(model, tok, PROMPTS, max_new_tokens=8)
    sampled = G.generate(model, tok, PROMPTS, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7, seed=0)
    assert sampled == greedy


def test_loglikelihoods_equal_a_plain_forward(model, tok):
    pairs = [("Number: 7\nEven or odd?\nAnswer:", " odd"), ("Number: 7\nEven or odd?\nAnswer:", " even"),
             ("Repeat the word: apple\nAnswer: ", "apple"), ("x", " a much longer continuation here")]
    got = G.loglikelihoods(model, tok, pairs, batch_size=3)
    for (ctx, cont), g in zip(pairs, got):
        c, t = encode_pair(tok, ctx, cont)
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([c + t])).logits[0].float(), -1)
        want = sum(lp[len(c) - 1 + j, t[j]].item() for j in range(len(t)))
        assert g == pytest.approx(want, abs=1e-4)
    best = G.choose(model, tok, [pairs[0][0]], [["even", "odd"]], " ")
    assert best == [0 if got[1] > got[0] else 1]
    # acc_norm divides by the choice's length in bytes
    ll = G.loglikelihoods(model, tok, [("Q:", " a"), ("Q:", " bbbbbbbb")])
    assert G.choose(model, tok, ["Q:"], [["a", "bbbbbbbb"]], normalize=True) == \
        [0 if ll[0] / 1 >= ll[1] / 8 else 1]


def test_taskview_reads_the_task(tmp_path):
    from clbench.data import tasks as taskcat

    defs = taskcat.load_tasks([REPO / "configs" / "tiny_tasks"])
    lm = taskcat.build_lm_eval_tasks([defs["tiny_copy"], defs["tiny_parity"]], tmp_path)
    copy, parity = G.TaskView(lm["tiny_copy"]), G.TaskView(lm["tiny_parity"])
    assert not copy.multiple_choice and parity.multiple_choice
    assert copy.until == ["\n"] and copy.max_gen_toks == 8 and copy.delimiter == " "
    assert parity.fixed_choices() == ["even", "odd"]
    doc = copy.docs[0]
    word = doc["target"]
    assert copy.score(doc, word) == 1.0
    assert copy.score(doc, f"  {word.upper()} ") == 1.0  # the task's strip filter and ignore_case
    assert copy.score(doc, word + "s") == 0.0
    assert len(copy.docs) == len(taskcat.training_examples(lm["tiny_copy"]))
