"""The one training loop. Methods never own a loop: they act through hooks.

    for each optimizer step:
        for each of grad_accum micro-batches:
            loss = task loss (+ method.extra_loss) / grad_accum;  backward
        method.after_backward      (gradient masks)
        clip global grad norm;  optimizer.step;  scheduler.step
        method.after_step          (sparse flushes, rank allocation)
        optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed as D
from . import method as M
from .errors import ClbenchError

IGNORE = -100


class TrainingError(ClbenchError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # positions < n_prompt carry no loss


def tokenize(pairs, tokenizer, max_length: int) -> list[Example]:
    from .tasks import encode_pair

    out = []
    for ctx, cont in pairs:
        c, t = encode_pair(tokenizer, ctx, cont)
        t = t[:max_length - 1]
        c = c[-(max_length - len(t)):]  # cut long prompts from the left, keep the target
        out.append(Example(c + t, len(c)))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L] = torch.tensor(e.input_ids)
        labels[i, e.n_prompt:L] = ids[i, e.n_prompt:L]
        mask[i, :L] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_stream(examples: list[Example], batch_size: int, generator: torch.Generator):
    """Endless seeded shuffles of the examples, batch by batch (epoch after epoch)."""
    while True:
        perm = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(perm) - batch_size + 1 if len(perm) >= batch_size else 1, batch_size):
            yield [examples[j] for j in perm[i:i + batch_size]]


def _split_head(model):
    """(decoder, lm_head) of a causal LM (also inside a peft wrapper), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_dec = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    dec = get_dec() if get_dec else None
    if dec is None or head is None or dec is base:
        return None
    return dec, head


def lm_loss(model, batch: dict, head_only_targets: bool = True) -> torch.Tensor:
    """Mean next-token cross entropy over target positions.

    With head_only_targets the LM head runs only on positions whose next token is a
    target: prompt positions carry no loss, and the vocabulary-wide logits over every
    position otherwise dominate memory and time."""
    labels = batch["labels"]
    split = _split_head(model) if head_only_targets else None
    if split is not None:
        dec, head = split
        h = dec(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        tgt = labels[:, 1:]
        sel = tgt != IGNORE
        logits = head(h[:, :-1][sel])
        return F.cross_entropy(logits.float(), tgt[sel])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def make_optimizer(groups, cfg):
    """AdamW; the fused kernel where every parameter allows it (on 2 CPU cores it cuts the
    135M model's optimizer step from ~0.5 s to ~0.1 s)."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda") for p in params)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg, total: int):
    warm = cfg.warmup_steps

    def factor(step):
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def num_steps(cfg, n_examples: int) -> int:
    if cfg.epochs is not None:
        per_epoch = max(1, n_examples // (cfg.batch_size * cfg.grad_accum))
        return max(1, math.ceil(cfg.epochs * per_epoch))
    return cfg.steps


def train_stage(model, method, examples: list[Example], cfg, stage_ctx, *, device, autocast_dtype, pad_id: int,
                progress=None, desc: str = "train", dense: bool = False, on_step=None) -> dict:
    """Train `model` on `examples` for one stage. Returns stats (steps, losses, seconds).

    dense=True is a calibration pass: all parameters that require grad train, and the
    method's gradient hooks are not called (LoTA calibration, KS-Lottery's first pass)."""
    if not examples:
        raise TrainingError(f"stage {stage_ctx.stage} ({stage_ctx.task}): no training examples")
    model.train()
    if dense:
        groups = M.default_param_groups(model, cfg.weight_decay)
    else:
        groups = M.call(method, "param_groups", model, stage_ctx) or M.default_param_groups(model, cfg.weight_decay)
    if not groups or not any(g["params"] for g in groups):
        raise TrainingError(f"stage {stage_ctx.stage}: method {stage_ctx.run.method!r} gave the optimizer no parameters")
    opt = make_optimizer(groups, cfg)  # fresh per stage
    total = num_steps(cfg, len(examples))
    sched = make_scheduler(opt, cfg, total)
    saved = (stage_ctx.total_steps, stage_ctx.optimizer)
    stage_ctx.total_steps, stage_ctx.optimizer = total, opt
    batches = batch_stream(examples, min(cfg.batch_size, len(examples)), stage_ctx.generator)
    params = [p for g in groups for p in g["params"]]
    multi, world = D.enabled(), D.world_size()
    losses: list[float] = []
    t0 = time.perf_counter()
    task = None if progress is None else progress.add_task(desc, total=total, loss=float("nan"))
    for step in range(total):
        stage_ctx.global_step = step
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in collate(D.shard(next(batches)), pad_id).items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = lm_loss(model, batch, cfg.head_only_targets)
                if multi:  # this rank's share of the global batch's token-mean (see clbench.distributed)
                    n_local = (batch["labels"][:, 1:] != IGNORE).sum().to(torch.float32)
                    loss = loss * (n_local / D.all_reduce_sum(n_local.clone()).clamp(min=1))
                extra = None if dense else M.call(method, "extra_loss", model, batch, stage_ctx)
                if extra is not None:
                    loss = loss + (extra / world if multi else extra)
            value = D.all_reduce_sum(loss.detach().float().clone()) if multi else loss.detach()
            if not torch.isfinite(value):  # after the all-reduce, so every rank stops together
                raise TrainingError(
                    f"non-finite loss ({value.item()}) at stage {stage_ctx.stage} ({stage_ctx.task}), step {step + 1}, "
                    f"method {stage_ctx.run.method!r}: lower the learning rate (train.lr={cfg.lr}) or check the data; "
                    "results of completed stages are kept"
                )
            (loss / cfg.grad_accum).backward()
            step_loss += value.item() / cfg.grad_accum
        if multi:  # the global batch's gradient on every rank, before any method looks at it
            D.sum_gradients(list(dict.fromkeys([*model.parameters(), *params])))
        if not dense:
            M.call(method, "after_backward", model, stage_ctx)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]  # this step's learning rate (before the scheduler moves it)
        opt.step()
        sched.step()
        if not dense:
            M.call(method, "after_step", model, stage_ctx)
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if on_step is not None:  # e.g. the run's trackers (TensorBoard, W&B)
            on_step(step, step_loss, lr)
        if progress is not None:
            progress.update(task, advance=1, loss=step_loss)
    if progress is not None:
        progress.remove_task(task)
    if dense:  # a calibration pass must not leave its own step count behind for the real stage
        stage_ctx.total_steps, stage_ctx.optimizer = saved
    else:
        stage_ctx.optimizer = None
    del opt
    return {"steps": total, "losses": losses, "seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": losses[-1]}
