"""What the method tests share: the tiny prompt sets, a method set up on the tiny model, and one
stage run the way clbench.training.stage runs it (start_stage, the loop's train_stage, stage_end). The
`tok` and `one_thread` fixtures are conftest.py's."""

from __future__ import annotations

import torch

from clbench.method import RunContext, Stage, call_hook, make_method
from clbench.config import TrainConfig
from clbench.run import models
from clbench.runtime import Runtime
from clbench.training import train as T
from clbench.training.stage import start_stage

CPU = torch.device("cpu")
# four kinds of prompt, two of each: parity, comparison, copying, sentiment (the masked and OSF tests)
MIXED = [
    ("Number: 12\nEven or odd?\nAnswer:", " even"),
    ("Number: 7\nEven or odd?\nAnswer:", " odd"),
    ("Which is larger, 3 or 9?\nAnswer:", " second"),
    ("Which is larger, 8 or 2?\nAnswer:", " first"),
    ("Copy: abc\nAnswer:", " abc"),
    ("Copy: 4421\nAnswer:", " 4421"),
    ("Review: great fun\nSentiment:", " positive"),
    ("Review: dull and slow\nSentiment:", " negative"),
]


def parity(n: int) -> list[tuple[str, str]]:
    """n "even or odd" questions over 0..n-1."""
    return [(f"Number: {i}\nEven or odd?\nAnswer:", " even" if i % 2 == 0 else " odd") for i in range(n)]


def compare(n: int) -> list[tuple[str, str]]:
    """n "which is larger" questions, the first number rising by 3 from 3, the second falling by 2 from 50."""
    return [(f"Which is larger, {a} or {b}?\nAnswer:", " first" if a > b else " second")
            for a, b in zip(range(3, 3 + 3 * n, 3), range(50, 50 - 2 * n, -2))]


def cpu_rt(tok, autocast=None) -> Runtime:
    """The runtime of the tests' stages: the CPU, float32 unless `autocast`, the tokenizer's pad id."""
    return Runtime(CPU, autocast, tok.pad_token_id)


def fresh(tok, name: str, options: dict | None = None, tasks=("t1", "t2"), **run_fields):
    """(method, its model after setup, the RunContext): `name` with `options` on the tiny model of
    seed 0, with torch's global generator seeded first (setup's own draws, e.g. adapter inits)."""
    torch.manual_seed(0)
    meth = make_method(name, options or {})
    run = RunContext(method=name, seed=0, tasks=list(tasks), device=CPU, tokenizer=tok, **run_fields)
    return meth, meth.setup(models.build_tiny_model(0, len(tok)), run), run


def one_stage(meth, model, run, tok, examples, cfg, t: int, end: bool = True, between=None):
    """Stage t on `examples` as clbench.training.stage runs it: start_stage, then between(model, stage) if
    given, the loop's train_stage, and stage_end unless end=False. Returns (model, stage, the
    training statistics)."""
    model, stage = start_stage(model, meth, examples, cfg, run, t, f"t{t}", cpu_rt(tok))
    if between is not None:
        between(model, stage)
    stats = T.train_stage(model, meth, list(stage.examples), cfg, stage, cpu_rt(tok))
    if end:
        model = call_hook(meth, "stage_end", model, stage)
    return model, stage, stats


def stage_view(run, t: int, cfg: TrainConfig | None = None, examples=()):
    """The Stage a hook sees at stage t (task "t<t>"), built directly, without a stage having run."""
    return Stage(stage=t, task=f"t{t}", seed=0, run=run, train_config=cfg or TrainConfig(),
                   generator=torch.Generator().manual_seed(t), examples=examples)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's bits, for comparisons that must be exact (NaN and -0.0 included)."""
    return t.detach().clone().view(torch.int32)


def hf_greedy(model, tok, prompts, n):
    """transformers' greedy search on the prompts left-padded into one batch, as token lists
    (everything after the prompt, up to the first EOS)."""
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rows = []
    for r in out[:, width:].tolist():
        rows.append(r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r)
    return rows
