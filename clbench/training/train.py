"""The one training loop. Methods never own a loop: they act through hooks.

    for each optimizer step:
        for each of grad_accum micro-batches:
            examples = method.batch(examples) or examples   (replay mixes buffered ones in)
            loss = task loss (+ method.extra_loss) / grad_accum;  backward
        method.after_backward      (gradient masks)
        clip global grad norm;  optimizer.step;  scheduler.step
        method.after_step          (sparse flushes, rank allocation)
        optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import math
import time

import torch
from torch.distributed.fsdp import FSDPModule

from clbench import interrupt
from clbench.method import call_hook, default_param_groups
from clbench.data.examples import IGNORE, Example, collate, tokenize  # noqa: F401  (their former home: clbench.train.Example ...)
from clbench.distributed import collectives
from clbench.errors import TrainingError  # noqa: F401  (raised here; clbench.training.train.TrainingError for users)
from clbench.method import adapters
from clbench.method.lm import Forward, head_logits, lm_loss, split_head, target_logits  # noqa: F401  (their former home: clbench.train.lm_loss ...)
from clbench.runtime import Runtime, derive_seed, state_bytes
from clbench.schedule import check as check_schedule, describe as describe_schedule, lr_factor

_split_head = split_head  # the name before it was public (method files written against it keep working)


def batch_stream(examples: list[Example], batch_size: int, generator: torch.Generator):
    """Endless seeded shuffles of the examples, batch by batch (epoch after epoch)."""
    while True:
        perm = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(perm) - batch_size + 1 if len(perm) >= batch_size else 1, batch_size):
            yield [examples[j] for j in perm[i:i + batch_size]]


OPTIMIZERS = ("adamw", "sgd", "rmsprop")


def optimizer_choice(method, cfg) -> str:
    """The stage's optimizer: the config's `train.optimizer` where set (globally, per method or
    per stage), else the one the method names (Method.optimizer_name: its paper's code), else AdamW."""
    return cfg.optimizer or call_hook(method, "optimizer_name") or "adamw"


def make_optimizer(groups, cfg, name: str = "adamw"):
    """torch's AdamW, SGD or RMSprop over `groups` (weight decay and momentum from cfg). AdamW uses
    the fused kernel where every parameter allows it (on 2 CPU cores it cuts the 135M model's
    optimizer step from ~0.5 s to ~0.1 s)."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name != "adamw":
        raise TrainingError(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda") for p in params)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg, total: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, total, step))


def num_steps(cfg, n_examples: int) -> int:
    if cfg.epochs is not None:
        per_epoch = max(1, n_examples // (cfg.batch_size * cfg.grad_accum))
        return max(1, math.ceil(cfg.epochs * per_epoch))
    return cfg.steps


def train_stage(model, method, examples: list[Example], cfg, stage, rt: Runtime, *, desc: str = "train",
                dense: bool = False, on_step=None, step_checkpoints=None) -> dict:
    """Train `model` on `examples` for one stage (`stage`: the method's clbench.method.Stage view) on
    the runtime `rt` (device, autocast, pad id, progress bar). Returns stats (steps, losses, seconds).

    dense=True is a calibration pass: all parameters that require grad train, and the
    method's hooks are not called (LoTA calibration, KS-Lottery's first pass).

    step_checkpoints (clbench.training.midstage.StepCheckpoints): resume from this stage's checkpoint inside
    the stage if there is one, and write one every `checkpoint_steps` optimizer steps."""
    if not examples:
        raise TrainingError(f"stage {stage.stage} ({stage.task}): no training examples")
    name = getattr(method, "name", "?")
    model.train()
    groups = None if dense else call_hook(method, "param_groups", model, stage)
    groups = groups or default_param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise TrainingError(f"stage {stage.stage}: method {name!r} gave the optimizer no parameters")
    opt_name = optimizer_choice(method, cfg)
    opt = make_optimizer(groups, cfg, opt_name)  # fresh per stage
    total = num_steps(cfg, len(examples))
    if check_schedule(cfg, total):  # train.epochs: the step count is known only now
        raise TrainingError(f"stage {stage.stage} ({stage.task}): {check_schedule(cfg, total)}")
    sched = make_scheduler(opt, cfg, total)
    clock = stage._clock  # the loop's position, which the method reads through the view
    saved = (clock.step, clock.lr)
    batches = batch_stream(examples, min(cfg.batch_size, len(examples)), stage.generator)
    params = [p for g in groups for p in g["params"]]
    multi, world = collectives.enabled(), collectives.world_size()
    sharded = isinstance(model, FSDPModule)  # clbench.distributed.fsdp: FSDP's reduce-scatter sums the gradients in backward
    losses: list[float] = []
    first, before = 0, 0.0  # a stage resumed inside: the steps taken and the seconds spent before
    if step_checkpoints is not None and not dense:
        meta = step_checkpoints.load(model, opt, sched, total)
        if meta is not None:
            first, losses, before = meta["step"], list(meta["losses"]), meta["seconds"]
            for _ in range(first * cfg.grad_accum):  # the seeded shuffle's batches of the steps taken
                next(batches)
    t0 = time.perf_counter()
    log = _StepLog(desc, total, rt.progress)
    for step in range(first, total):
        interrupt.check()  # a Ctrl-C that some library caught earlier (clbench.interrupt)
        lr = opt.param_groups[0]["lr"]  # this step's learning rate (before the scheduler moves it)
        clock.step, clock.lr = step, lr
        step_loss = 0.0
        for i in range(cfg.grad_accum):
            whole = next(batches)  # the global micro-batch: the batch hook sees it on every rank (replay, EWC)
            if not dense:
                whole = call_hook(method, "batch", whole, stage) or whole
            micro, rows = collectives.shard(whole), collectives.shard(list(range(len(whole))))  # rows: indices in the global batch
            batch = {k: v.to(rt.device) for k, v in collate(micro, rt.pad_id).items()}
            key = derive_seed(derive_seed(stage.seed, stage.stage, int(dense)), step, i)  # dropout masks by example
            with rt.autocast():
                with adapters.keyed(model, key, rows, cfg.max_length):  # the loop's forward only (not a method's own)
                    out = lm_loss(model, batch, cfg.head_only_targets, return_forward=True)
                loss = out.loss
                if multi:  # this rank's share of the global batch's token-mean (see clbench.distributed)
                    n_local = (batch["labels"][:, 1:] != IGNORE).sum().to(torch.float32)
                    loss = loss * (n_local / collectives.all_reduce_sum(n_local.clone()).clamp(min=1))
                extra = None if dense else call_hook(method, "extra_loss", model, batch, stage, out)
                if extra is not None:
                    loss = loss + (extra / world if multi else extra)
            del out
            value = collectives.all_reduce_sum(loss.detach().float().clone()) if multi else loss.detach()
            if not torch.isfinite(value):  # after the all-reduce, so every rank stops together
                raise TrainingError(
                    f"non-finite loss ({value.item()}) at stage {stage.stage} ({stage.task}), step {step + 1}, "
                    f"method {name!r}: lower the learning rate (train.lr={cfg.lr}) or check the data; "
                    "results of completed stages are kept"
                )
            (loss / cfg.grad_accum).backward()
            step_loss += value.item() / cfg.grad_accum
        if multi and not sharded:  # the global batch's gradient on every rank, before any method looks at it
            collectives.sum_gradients(list(dict.fromkeys([*model.parameters(), *params])))
        if not dense:
            call_hook(method, "after_backward", model, stage)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
        opt.step()
        sched.step()
        if not dense:
            call_hook(method, "after_step", model, stage)
        if step + 1 == total:
            held = state_bytes(model, opt)
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if on_step is not None:  # e.g. the run's trackers (TensorBoard, W&B)
            on_step(step, step_loss, lr)
        log.step(step, step_loss, lr)
        if step_checkpoints is not None and not dense and step_checkpoints.due(step + 1, total):
            step_checkpoints.save(model, opt, sched, step + 1, total, losses, before + time.perf_counter() - t0)
    log.close()
    if dense:  # a calibration pass leaves the stage's position as it found it
        clock.step, clock.lr = saved
    else:
        clock.lr = None
    del opt
    return {"steps": total, "losses": losses, "seconds": before + time.perf_counter() - t0, "first_loss": losses[0],
            "last_loss": losses[-1], **({"resumed_at_step": first} if first else {}),
            "state_bytes": held, "schedule": describe_schedule(cfg, total),
            "optimizer": {"name": opt_name, "weight_decay": cfg.weight_decay,
                          **({"momentum": cfg.momentum} if opt_name != "adamw" else {})}}


class _StepLog:
    """Progress of a training pass: a rich bar on a terminal; where output goes to a file (no
    terminal), a plain line every CLBENCH_LOG_EVERY steps (default 10) and at the last, with the
    loss and the rate, so a log shows progress while a long stage trains."""

    def __init__(self, desc: str, total: int, progress):
        import os
        import sys

        self.desc, self.total, self.progress = desc, total, progress
        self.every = max(1, int(os.environ.get("CLBENCH_LOG_EVERY", "10")))
        self.plain = progress is not None and not getattr(progress.console, "is_terminal", False) \
            and not getattr(progress.console, "quiet", False)
        self.task = progress.add_task(desc, total=total, loss=float("nan")) if progress is not None and not self.plain else None
        self.t0, self.out = time.perf_counter(), sys.stderr

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.task is not None:
            self.progress.update(self.task, advance=1, loss=loss)
        elif self.plain and ((step + 1) % self.every == 0 or step + 1 == self.total):
            dt = time.perf_counter() - self.t0
            print(f"{self.desc}: step {step + 1}/{self.total} loss {loss:.4f} lr {lr:.3g} "
                  f"({(step + 1) / dt:.2f} steps/s)", file=self.out, flush=True)

    def close(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
