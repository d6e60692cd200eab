"""One stage of a method, driven the one way the loop, the tests and the benchmark all use:

    start_stage:  the stage view (seeded generator, the task's examples)
                  examples = method.stage_examples(model, stage) or the task's examples
                  model = method.stage_start(model, stage)    # may calibrate: stage.calibrate(...)
    train_stage(model, method, examples, ...)                 # the one training loop (clbench.training.train)
    model = method.stage_end(model, stage)
    stats["method_stats"] = method.stage_stats(stage)   # the method's diagnostics, if any

A test or benchmark that looks at the model between stage_start and training calls start_stage,
then train_stage itself.
"""

from __future__ import annotations

import contextlib

import torch

from clbench.method import MethodError, RunContext, Stage, call_hook
from clbench.config import TrainOverrides
from clbench.runtime import Runtime, derive_seed
from clbench.training.train import num_steps, train_stage


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage `stage` of one (method, seed): its batch order and the loop's RNG."""
    return derive_seed(seed, stage)


def start_stage(model, method, examples, cfg, run: RunContext, t: int, task: str, rt: Runtime):
    """Everything of stage t before its training: the seeded stage view (whose calibrate() runs
    the loop's training loop densely on the stage's examples), the method's stage_examples and
    stage_start. Returns (model, stage view); the stage's examples are `stage.examples`."""
    torch.manual_seed(stage_seed(run.seed, t))
    holder: dict = {}

    def calibrate(m, steps=None, lr=None, weight_decay=None, desc="calibrate"):
        over = {k: v for k, v in dict(steps=steps, lr=lr, weight_decay=weight_decay).items() if v is not None}
        st = holder["stage"]
        return train_stage(m, method, list(st.examples), cfg.merged(TrainOverrides(**over)), st, rt,
                           desc=f"{run.method} seed {run.seed} stage {t} {desc}", dense=True)

    gen = torch.Generator().manual_seed(stage_seed(run.seed, t))
    stage = Stage(stage=t, task=task, seed=run.seed, run=run, train_config=cfg, generator=gen, examples=examples,
                    total_steps=num_steps(cfg, len(examples)) if examples else 0, calibrate=calibrate)
    holder["stage"] = stage
    changed = call_hook(method, "stage_examples", model, stage)
    if changed is not None:
        if not changed:
            raise MethodError(f"method {run.method!r}, hook stage_examples returned no examples for stage {t} ({task})")
        stage = stage.replace(examples=changed, total_steps=num_steps(cfg, len(changed)))
        holder["stage"] = stage
    return call_hook(method, "stage_start", model, stage), stage


def run_stage(model, method, examples, cfg, run: RunContext, t: int, task: str, rt: Runtime, *, on_step=None,
              desc: str | None = None, step_checkpoints=None):
    """Stage t of `method` on `examples` (clbench.training.train.Example) with train config `cfg` on the
    runtime `rt` (clbench.runtime.Runtime): start_stage, the one training loop, stage_end. Returns
    (model, stats, stage view)."""
    model, stage = start_stage(model, method, examples, cfg, run, t, task, rt)
    stats = train_stage(model, method, list(stage.examples), cfg, stage, rt,
                        desc=desc or f"{run.method} seed {run.seed} stage {t} {task}", on_step=on_step,
                        step_checkpoints=step_checkpoints)
    model = call_hook(method, "stage_end", model, stage)
    measured = call_hook(method, "stage_stats", stage)  # the method's own diagnostics (results.json: method_stats)
    if measured:
        stats["method_stats"] = {k: float(v) for k, v in measured.items()}
    return model, stats, stage


def autocast_factory(device: torch.device, dtype):
    """RunContext.autocast: the loop's autocast as a context-manager factory."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
