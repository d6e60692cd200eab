"""EWC's penalty share at several lambdas on a real model: how methods/ewc.py's default was chosen.

    .venv/bin/python bench/ewc_lambda.py [--config configs/demo.yaml] [--steps 20] [--lambdas 1,1e3,1e4,3e4]

Stage 1 of the config's stream is trained once with EWC (full fine-tuning, its Fisher at the
stage end, as a run does); then, from that same state, the first --steps steps of stage 2 are
trained at each lambda and EWC's method_stats are printed: penalty_ratio, the mean over the
steps' micro-batches of (lambda / 2) sum F (theta - theta*)^2 / task CE. No evaluation. The
config's train settings apply (demo: lr 1e-4 constant, batch 8, max_length 96, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from clbench.config import load_config
from clbench.method import RunContext, call_hook, make_method
from clbench.data.tasks import build_lm_eval_tasks, run_examples
from clbench.run import models, planning
from clbench.runtime import Runtime
from clbench.training.stage import run_stage, start_stage
from clbench.training.train import tokenize, train_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=20, help="stage-2 steps per lambda")
    ap.add_argument("--lambdas", default="1,1e3,1e4,3e4")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg, cdir = load_config(a.config)
    pl = planning.plan(cfg, cdir)
    model, tok, _ = models.resolve(cfg.model, pl.cache)
    names = pl.task_names[:2]
    lm = build_lm_eval_tasks([pl.task_defs[n] for n in names], pl.cache)
    ex = {n: tokenize(run_examples(lm[n], tok, cfg), tok, cfg.train.max_length) for n in names}
    dev, t0 = torch.device("cpu"), time.time()
    run = RunContext(method="ewc", seed=0, tasks=names, device=dev, tokenizer=tok)
    meth = make_method("ewc", {})
    model = call_hook(meth, "setup", model, run)
    model, st1, _ = run_stage(model, meth, ex[names[0]], cfg.train, run, 1, names[0], Runtime(dev, None, tok.pad_token_id))
    print(f"stage 1 ({names[0]}): loss {st1['first_loss']:.3f} -> {st1['last_loss']:.3f}; Fisher {meth.stats[-1]} "
          f"({time.time() - t0:.0f}s)", flush=True)
    state, c2 = meth.state_dict(), cfg.train.model_copy(update={"steps": a.steps})
    for lam in (float(x) for x in a.lambdas.split(",")):
        m2, e2 = copy.deepcopy(model), make_method("ewc", {"ewc_lambda": lam})
        e2.load_state_dict(copy.deepcopy(state))
        m2, stage = start_stage(m2, e2, ex[names[1]], c2, run, 2, names[1], Runtime(dev, None, tok.pad_token_id))
        stats = train_stage(m2, e2, list(stage.examples), c2, stage, Runtime(dev, None, tok.pad_token_id))
        s = e2.stage_stats(stage)
        print(f"lambda {lam:g}: stage 2 ({names[1]}), {a.steps} steps: penalty_ratio {s['penalty_ratio']:.3g} "
              f"(penalty {s['penalty']:.3g}); loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f} "
              f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
