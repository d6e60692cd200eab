"""Evaluation: every task of the stream, one lm-eval `simple_evaluate` call, the live model.

An HFLM wraps the in-memory model (a PeftModel too); nothing is saved or reloaded.
HFLM calls model.eval() only when constructed, so we build a fresh wrapper per call
(cheap: no weights move) and put the model back in train mode afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time

import torch


_TASK_MANAGER = None


def _score(results: dict, task: str, metric: str, filt: str) -> float:
    res = results["results"][task]
    key = f"{metric},{filt}"
    if key not in res:
        avail = sorted(k for k in res if "," in k and not k.split(",")[0].endswith("_stderr"))
        raise KeyError(f"task {task!r}: lm-eval returned no {key!r}; it returned {avail}")
    return float(res[key])


def evaluate(model, tokenizer, lm_tasks: dict, primary: dict[str, tuple[str, str]], *, device, autocast_dtype,
             batch_size, limit=None, seed: int = 0, bootstrap_iters: int = 0, log_samples: bool = True,
             max_length: int | None = None, task_limits: dict[str, int | None] | None = None):
    """Returns (scores {task: value}, samples {task: [records]} or {}, seconds).

    task_limits: a smaller limit for some tasks (off-diagonal cells on a subset); the
    first n test documents of the task are used, the same ones at every stage."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    global _TASK_MANAGER
    if _TASK_MANAGER is None:  # the default manager indexes ~230 built-in task folders (~7 s) per call
        _TASK_MANAGER = TaskManager(include_defaults=False)

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(device),
        mixed_precision_dtype=autocast_dtype,
        max_length=max_length,
    )
    # lm-eval draws a progress bar per request type; they would drown the run's own progress.
    sink = contextlib.nullcontext() if os.environ.get("CLBENCH_VERBOSE_EVAL") else contextlib.redirect_stderr(io.StringIO())
    per_task = None
    if task_limits and any(task_limits.get(t, limit) != limit for t in lm_tasks):
        per_task = {}
        for t, task in lm_tasks.items():
            n = len(task.eval_docs)
            cap = task_limits.get(t, limit)
            per_task[t] = list(range(min(n, cap) if cap else n))
    # simple_evaluate collects environment info (torch's collect_env, `pip list` subprocesses:
    # ~1 s per call) into its result; results.json records versions once, so skip it here.
    env_info = evaluator.add_env_info
    evaluator.add_env_info = lambda *a, **k: None
    try:
        with torch.no_grad(), sink:
            out = evaluator.simple_evaluate(
                model=lm,
                tasks=list(lm_tasks.values()),
                limit=None if per_task else limit,
                samples=per_task,
                bootstrap_iters=bootstrap_iters,
                log_samples=log_samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                verbosity="ERROR",
                task_manager=_TASK_MANAGER,
            )
    finally:
        evaluator.add_env_info = env_info
    if was_training:
        model.train()
    scores = {t: _score(out, t, *primary[t]) for t in lm_tasks}
    samples = out.get("samples", {}) if log_samples else {}
    return scores, samples, time.perf_counter() - t0
