"""SDFT on the tiny model and the tiny tasks: multiple-choice targets stay the choice strings,
each generation target trained is the stage-start model's rewrite (transformers' own greedy
decoding of the paper's distill prompt, cut at the task's `until`) or the original example
bit-identical, contexts never change, rejected rewrites fall back, greedy and seeded rewrites
repeat on the same weights; plus a two-stage CLI run resumed after stage 1."""

import pytest
import torch

from clbench.method import MethodError, RunContext, call_hook, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.data import tasks as taskcat
from clbench.run import models
from clbench.runtime import Runtime
from clbench.training.stage import start_stage
from clbench.training.train import tokenize
from conftest import REPO, two_stage_run_and_resume
from harness import cpu_rt, hf_greedy

load_method_file(REPO / "methods" / "sdft.py")

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
N = 12  # training examples per stage in these tests (a prefix of the task's pairs, as max_train_examples)
USING = ("Below are an instruction that describes a task along with a reference answer. Using the reference answer "
         "as a guide, write your own response.\n\n### Instruction:\n{x}\n\n### Reference Answer:\n{y}\n\n### Response:\n")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    defs = taskcat.load_tasks([REPO / "configs" / "tiny_tasks"])
    return taskcat.build_lm_eval_tasks([defs["tiny_copy"], defs["tiny_parity"]], tmp_path_factory.mktemp("c"))


def make_run(tok, lm):
    pairs = {n: taskcat.training_examples(t, tok.eos_token if t.OUTPUT_TYPE == "generate_until" else None)
             for n, t in lm.items()}
    return RunContext(method="sdft", seed=0, tasks=list(lm), device=CPU, tokenizer=tok,
                        examples=lambda t: tokenize(pairs[t], tok, 64)[:N], pairs=lambda t: list(pairs[t]),
                        tokenize=lambda p: tokenize(p, tok, 64), task=lambda t: lm[t])


def tiny_model(tok, noise=0.0):
    """The tiny model; noise > 0 moves its attention and MLP weights by seeded Gaussian noise
    (the untrained model mostly repeats the prompt's last token whatever its seed)."""
    model = models.build_tiny_model(0, len(tok))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if noise and ("mlp" in name or "self_attn" in name):
                p.add_(noise * torch.randn(p.shape, generator=g))
    return model


def sdft_stage(tok, lm, task, options, noise=0.0):
    meth = make_method("sdft", options)
    run = make_run(tok, lm)
    model = call_hook(meth, "setup", tiny_model(tok, noise), run)
    cfg = TrainConfig(steps=1, lr=1e-3, batch_size=4, max_length=64)
    model, stage = start_stage(model, meth, run.examples(task), cfg, run, 1, task, cpu_rt(tok))
    return meth, run, model, stage


def hf_rewrites(model, tok, prompts, n):
    """transformers' greedy search (harness.hf_greedy) decoded, leading whitespace dropped, cut at
    tiny_copy's '\\n' and stripped."""
    return [tok.decode(r).lstrip().split("\n")[0].strip() for r in hf_greedy(model, tok, prompts, n)]


def test_multiple_choice_targets_are_kept(tok, lm):
    meth, run, _, stage = sdft_stage(tok, lm, "tiny_parity", {})
    assert list(stage.examples) == run.examples("tiny_parity")
    assert meth.stats[1]["multiple_choice"] and meth.stats[1]["rewritten"] == 0


def test_targets_are_the_greedy_rewrite_or_the_original(tok, lm):
    # a custom prompt: after the paper's templates (which end in a newline) the untrained model's
    # greedy text starts with the task's stop string "\n", so every rewrite would be empty
    greedy = {"do_sample": False, "accept": "phrases", "batch_size": N, "prompt": "{instruction} {reference}"}
    meth, run, model, stage = sdft_stage(tok, lm, "tiny_copy", greedy)
    pairs, orig = run.pairs("tiny_copy")[:N], run.examples("tiny_copy")
    words = [ctx.split("Repeat the word: ")[1].split("\n")[0] for ctx, _ in pairs]
    want = [w.strip() for w in hf_rewrites(model, tok, [f"{ctx} {w}" for (ctx, _), w in zip(pairs, words)], 8)]
    assert meth.last_rewrites == want
    # a reject phrase taken from one rewrite: that example (and any other holding it) falls back
    phrase = next(w for w in want if len(w) >= 3)[:3]
    meth2, _, _, stage2 = sdft_stage(tok, lm, "tiny_copy", {**greedy, "reject_phrases": [phrase.upper()]})
    for trained, (first, second), ex, (ctx, _), w in zip(stage.examples, zip(stage.examples, stage2.examples), orig,
                                                         pairs, want):
        assert trained.input_ids[:trained.n_prompt] == ex.input_ids[:ex.n_prompt]  # context unchanged
        assert first == (tokenize([(ctx, f" {w}{tok.eos_token}")], tok, 64)[0] if w else ex)
        assert second == (ex if (not w or phrase.lower() in w.lower()) else first)
    assert sum(not w for w in want) == meth.stats[1]["rejected"].get("empty", 0)
    assert meth2.stats[1]["rejected"]["phrase"] == sum(phrase.lower() in w.lower() for w in want) >= 1
    assert meth.stats[1]["rewritten"] == sum(bool(w) for w in want) > 0
    assert meth.stats[1]["fraction"] == meth.stats[1]["rewritten"] / N


def test_paper_template_and_empty_rewrites_fall_back(tok, lm):
    opts = {"do_sample": False, "accept": "phrases", "batch_size": N}
    meth, run, model, stage = sdft_stage(tok, lm, "tiny_copy", opts)
    pairs = run.pairs("tiny_copy")[:N]
    words = [ctx.split("Repeat the word: ")[1].split("\n")[0] for ctx, _ in pairs]
    prompts = [USING.format(x=ctx, y=w) for (ctx, _), w in zip(pairs, words)]
    assert [meth._render(ctx, w) for (ctx, _), w in zip(pairs, words)] == prompts
    assert meth.last_rewrites == hf_rewrites(model, tok, prompts, 8)
    # EOS's output row made a slightly larger copy of the row of the token the model answers the
    # template with first: EOS comes first, every rewrite is empty and every example is kept
    ids = torch.tensor([tok(prompts[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                               pad_token_id=0, eos_token_id=0)[0, -1].item()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = 1.05 * head[first]
    meth2 = make_method("sdft", opts)
    call_hook(meth2, "setup", model, run)
    cfg = TrainConfig(steps=1, lr=1e-3, batch_size=4, max_length=64)
    _, stage2 = start_stage(model, meth2, run.examples("tiny_copy"), cfg, run, 1, "tiny_copy", Runtime(CPU, None, 0))
    assert meth2.last_rewrites == hf_rewrites(model, tok, prompts, 8) == [""] * N
    assert list(stage2.examples) == run.examples("tiny_copy") and meth2.stats[1]["rejected"] == {"empty": N}


def test_answer_check_keeps_originals_the_task_scores_lower(tok, lm):
    # the untrained model's rewrites never repeat the word, so tiny_copy's exact match rejects them all
    meth, run, model, stage = sdft_stage(tok, lm, "tiny_copy", {"do_sample": False, "prompt": "{instruction} {reference}"})
    pairs = run.pairs("tiny_copy")[:N]
    words = [ctx.split("Repeat the word: ")[1].split("\n")[0] for ctx, _ in pairs]
    assert all(r.strip().lower() != w for r, w in zip(meth.last_rewrites, words))
    assert list(stage.examples) == run.examples("tiny_copy")
    assert meth.stats[1]["rewritten"] == 0 and meth.stats[1]["rejected"] == {"answer": N}


def test_rewrites_are_a_function_of_the_stage_start_weights(tok, lm):
    for opts in ({"do_sample": False, "accept": "phrases", "prompt": "{instruction} {reference}"},
                 {"accept": "phrases", "prompt": "{instruction} {reference}"}):  # greedy; seeded sampling
        a = sdft_stage(tok, lm, "tiny_copy", opts)
        b = sdft_stage(tok, lm, "tiny_copy", opts)
        assert list(a[3].examples) == list(b[3].examples) and a[0].last_rewrites == b[0].last_rewrites
        c = sdft_stage(tok, lm, "tiny_copy", opts, noise=0.3)
        assert c[0].last_rewrites != a[0].last_rewrites


def test_state_dict_keeps_the_stats(tok, lm):
    meth, *_ = sdft_stage(tok, lm, "tiny_copy", {"do_sample": False, "accept": "phrases"})
    other = make_method("sdft", {})
    other.load_state_dict(meth.state_dict())
    assert other.stats == meth.stats and other.stats[1]["total"] == N


def test_bad_prompt_is_refused():
    with pytest.raises(MethodError):
        make_method("sdft", {"prompt": "{instruction} {answer}"})


def test_two_stage_run_and_resume(tmp_path):
    two_stage_run_and_resume(tmp_path, [{"name": "sdft", "options": {"accept": "phrases", "max_new_tokens": 4,
                                                                       "prompt": "{instruction} {reference}"}},
                                        {"name": "sdft", "label": "sdft_lora", "options": {"base": "lora",
                                                                                           "base_options": {"r": 4}}}],
                             tasks=("tiny_copy", "tiny_parity"), train={"max_train_examples": 16})
