"""Each method that is meant to change training changes it at its defaults.

A regulariser or a projection whose default strength is nil turns the method into its base (EWC
at a lambda whose penalty is 1e-5 of the loss is full fine-tuning) and the benchmark would report
the base's forgetting under the method's name. Here each such method runs at its defaults on a
two-task stream built like the tiny tasks tiny_parity then tiny_compare (on those, full
fine-tuning's parity accuracy falls from 0.8 to 0.525 at 30 steps of lr 3e-3), and its base (full fine-tuning, or LoRA for the
LoRA-based methods) runs on the same seed, data order and steps. It must report, at stage 2, a
share of the loss (or of the gradient projected away) above 1% (EWC at lambda 1 reports 0.06%,
LwF at weight 0.01 0.2%), and end with weights that differ from its base's: on one CPU process
the runs are deterministic, so any difference is the method's.

Whether it then forgets less is a question for a model that learns: the tiny model's
accuracies move in steps of 0.025 and its training is chaotic (a stage moves the weights by
~45% of their norm), so the comparison of forgetting is the study's (docs/study.md), on the
135M default at a budget where full FT's BWT is below 0."""

import pytest
import torch

from clbench.method import RunContext, call_hook, load_builtin_methods, make_method
from clbench import paths
from clbench.config import TrainConfig
from clbench.run import models
from clbench.training.stage import run_stage
from clbench.training.train import tokenize
from harness import cpu_rt


def _pairs(numbers):
    return [(f"Number: {n}\nEven or odd?\nAnswer:", " " + ("even", "odd")[n % 2]) for n in numbers]


TRAIN = list(range(400))


def _run(tok, name, options, lr, steps=30):
    """Stage 1 (parity) then stage 2 (which of two numbers is larger) of `name`; returns the final model
    (merged where the method keeps an adapter) and each stage's method_stats."""
    torch.manual_seed(0)
    import random
    r = random.Random(0)
    cmp = [(r.randrange(100), r.randrange(100)) for _ in range(400)]
    cmp_pairs = [(f"Which is larger, {a} or {b}?\nAnswer:", " first" if a > b else " second") for a, b in cmp if a != b]
    task_pairs = {"parity": _pairs(TRAIN), "compare": cmp_pairs}

    def examples(task):
        return tokenize(task_pairs[task], tok, 64)

    run = RunContext(method=name, seed=0, tasks=["parity", "compare"], device=torch.device("cpu"), tokenizer=tok,
                       examples=examples, pairs=lambda t: list(task_pairs[t]), tokenize=lambda p: tokenize(p, tok, 64),
                       autocast=lambda: torch.autocast("cpu", enabled=False))
    meth = make_method(name, options)
    model = call_hook(meth, "setup", models.build_tiny_model(0, len(tok)), run)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=8, max_length=64)
    stats = []
    for t, task in enumerate(["parity", "compare"], start=1):
        model, s, _ = run_stage(model, meth, examples(task), cfg, run, t, task, cpu_rt(tok))
        stats.append(s.get("method_stats"))
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), stats


def _distance(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    num = sum(((sa[k].float() - sb[k].float()) ** 2).sum() for k in sa)
    den = sum((sb[k].float() ** 2).sum() for k in sb)
    return (num / den).sqrt().item()


@pytest.fixture(scope="module")
def bases(tok, one_thread):
    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    return {"full_ft": _run(tok, "full_ft", {}, 3e-3)[0], "lora": _run(tok, "lora", {}, 3e-2)[0]}


# (method, its base, lr, the per-stage share it reports at stage 2)
ACTING = [
    ("ewc", "full_ft", 3e-3, "penalty_ratio"),
    ("lwf", "full_ft", 3e-3, "kd_ratio"),
    ("agem", "full_ft", 3e-3, "projected_fraction"),
    ("gem", "full_ft", 3e-3, "projected_fraction"),
    ("olora", "lora", 3e-2, "penalty_ratio"),
    ("ilora", "lora", 3e-2, "consistency_ratio"),
    ("nlora", "lora", 3e-2, "penalty_ratio"),
    ("osf", "full_ft", 3e-3, "projected_fraction"),
]


@pytest.mark.parametrize("name,base,lr,share", ACTING, ids=[a[0] for a in ACTING])
def test_the_method_acts_at_its_defaults(tok, bases, name, base, lr, share):
    model, stats = _run(tok, name, {}, lr)
    ref = bases[base]
    assert stats[1] is not None and stats[1][share] > 0.01, (name, stats)
    assert _distance(model, ref) > 1e-3, name
