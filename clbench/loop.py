"""The continual loop: for each method and seed, stage after stage, train then evaluate
every task of the stream, filling the accuracy matrix R row by row.

    R[0]  = base model (evaluated once per run: every method starts from the same weights)
    for t, task in enumerate(stream, 1):
        model = method.stage_start(model, stage)
        train_stage(model, method, task's training examples)    # the one training loop
        model = method.stage_end(model, stage)
        R[t]  = evaluate(model, every task of the stream)       # one lm-eval call, in memory

Everything cheap is validated before anything expensive starts (config, methods and their
options, tasks, data files), so a typo fails in a second, not after an hour of training.
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed as D
from . import metrics, paths, results
from . import method as M
from . import tasks as T
from .config import RunConfig
from .errors import ClbenchError, ConfigError


# --- devices and precision -----------------------------------------------------------


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_device(cfg: RunConfig) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None). Master weights always stay float32."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    dev = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and D.enabled():
        dev = torch.device("cuda", D.local_rank())
    if cfg.precision == "fp32":
        return dev, None
    ok = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_supports_bf16()
    if cfg.precision == "bf16" and not ok:
        raise ConfigError(f"precision: bf16 was requested but {dev.type} here does not support it; use auto or fp32")
    return dev, (torch.bfloat16 if ok else None)


def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory while a block runs: CUDA's allocator peak, or sampled process RSS on CPU.

    On CPU this is the whole process (the kept base model, the checkpoint reference copy and
    the method's own copies included), so compare methods within one run, not across runs.
    release=True first hands freed memory back to the OS, so that RSS starts from what is live,
    not from an earlier method's peak; the loop does that once per method, not per stage:
    memory handed back must be faulted in again by the next stage (0.7 s per stage on the
    demo model), while a method's own earlier stages cannot raise its peak above itself."""

    def __init__(self, device: torch.device, release: bool = True):
        self.device, self.peak_mb, self.release = device, 0.0, release
        self._stop = threading.Event()

    def _rss_mb(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return 0.0

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if self.release:
                _release_freed_memory()
            self.peak_mb = self._rss_mb()
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)
        else:
            self._stop.set()
            self._t.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(seed: int, stage: int) -> int:
    return seed * 1_000_003 + stage * 7919


# --- the prepared run ----------------------------------------------------------------


@dataclass
class Plan:
    """Everything validated and resolved before the first expensive step."""

    cfg: RunConfig
    config_dir: Path
    cache: Path
    task_names: list[str]
    task_defs: dict[str, T.TaskDef]
    method_specs: list = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)

    @property
    def eval_names(self) -> list[str]:
        return self.task_names + self.heldout


def plan(cfg: RunConfig, config_dir: Path) -> Plan:
    from . import models

    cache = paths.cache_dir(cfg.cache_dir)
    paths.set_offline_env(cache, cfg.offline)
    models.check(cfg.model, cache, cfg.offline)
    M.load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    for f in cfg.method_files:
        M.load_method_file((config_dir / f).resolve())
    made = [M.make(spec.name, spec.options, where=f"methods.{i}") for i, spec in enumerate(cfg.methods)]  # validates
    task_defs = T.load_tasks([(config_dir / d).resolve() for d in cfg.task_dirs])
    for i, meth in enumerate(made):  # tasks a method reads besides the stream (e.g. replay's general data)
        for n in getattr(meth, "needs_tasks", None) or []:
            if n not in task_defs:
                raise ConfigError(f"methods.{i} ({cfg.methods[i].name}) needs task {n!r}, which does not exist; "
                                  f"available: {', '.join(sorted(task_defs))}")
            task_defs[n].check_data(paths.cache_dir(cfg.cache_dir))
    from .data import load_streams

    streams = load_streams([(config_dir / d).resolve() for d in cfg.task_dirs])
    names = T.resolve_stream(cfg, task_defs, streams)
    for n in names:
        if task_defs[n].lm_eval.get("output_type") == "loglikelihood_rolling":
            raise ConfigError(f"task {n!r} ({task_defs[n].path}) is a perplexity probe (loglikelihood_rolling): "
                              "it can only be held out (`heldout:`), not trained in the stream")
        task_defs[n].check_data(cache)
    heldout = expand_heldout(cfg.heldout, task_defs)
    unknown = [n for n in heldout if n not in task_defs]
    if unknown and cfg.offline:
        raise ConfigError(f"unknown held-out task(s) {', '.join(map(repr, unknown))}; available: "
                          f"{', '.join(sorted(task_defs))}, or `general` (every built-in held-out task). lm-eval's "
                          "standard tasks (arc_easy, hellaswag, ...) load from the hub: set `offline: false`")
    for n in unknown:  # offline: false: lm-eval's own task of that name, data from the hub
        task_defs[n] = T.hub_task(n)
    both = sorted(set(heldout) & set(names))
    if both:
        raise ConfigError(f"task(s) {', '.join(both)} are both in the stream and held out: a held-out task is never trained")
    for n in heldout:
        if not task_defs[n].hub:
            task_defs[n].check_data(cache, need_train=False)
    return Plan(cfg, config_dir, cache, names, task_defs, list(cfg.methods), heldout)


GENERAL_SUITE = "general"


def expand_heldout(names: list[str], task_defs: dict) -> list[str]:
    """`general` stands for every built-in held-out task (tasks/ with clbench.heldout: true)."""
    out: list[str] = []
    for n in names:
        if n == GENERAL_SUITE:
            out += sorted(k for k, d in task_defs.items()
                          if d.heldout and d.path is not None and d.path.parent == paths.BUILTIN_TASKS_DIR)
        else:
            out.append(n)
    return list(dict.fromkeys(out))


# --- running -------------------------------------------------------------------------


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def meta_info(model_desc: str, device, autocast) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("clbench", "torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "pydantic"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    hw = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "device": str(device), "autocast": str(autocast) if autocast else "none",
          "torch_threads": torch.get_num_threads(), "processes": D.world_size()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "model": model_desc, "hardware": hw}


def _stage_label(v: str):
    """matrix.csv's stage: an int for the stream's stages, a label for extra rows (multitask, merged:*)."""
    return int(v) if str(v).lstrip("-").isdigit() else str(v)


class Recorder:
    """Holds every result so far and rewrites the results files atomically after each stage."""

    def __init__(self, out: Path, cfg: RunConfig, plan: Plan):
        self.out, self.cfg, self.plan = out, cfg, plan
        self.rows: list[dict] = []
        self.summary: list[dict] = []
        self.methods: dict = {}
        self.meta: dict = {}
        self.config_changes: list = []

    def load_existing(self) -> bool:
        """Pick up the results of an earlier, interrupted run of the same config."""
        f = self.out / "results.json"
        if not (f.is_file() and (self.out / "matrix.csv").is_file()):
            return False
        import json

        prev = json.loads(f.read_text())
        self.methods = prev.get("methods", {})
        self.config_changes = prev.get("run", {}).get("config_changes", [])
        self.rows = [{**r, "seed": int(r["seed"]), "stage": _stage_label(r["stage"]), "value": float(r["value"])}
                     for r in results.read_csv(self.out / "matrix.csv")]
        self.summary = [{**r, "seed": int(r["seed"])} for r in results.read_csv(self.out / "summary.csv")] \
            if (self.out / "summary.csv").is_file() else []
        for r in self.summary:
            for k, v in r.items():
                if k not in ("method", "seed", "mode"):
                    r[k] = (int if k == "trainable_params" else float)(v) if v not in ("", None) else None
        return True

    def drop(self, method, seed, after_stage: int) -> None:
        """Forget the rows of stages after `after_stage`, and every extra row (multitask, merged:*)."""
        self.rows = [r for r in self.rows if not (r["method"] == method and r["seed"] == seed
                                                  and (not isinstance(r["stage"], int) or r["stage"] > after_stage))]

    def drop_extra(self, method, seed) -> None:
        self.rows = [r for r in self.rows if not (r["method"] == method and r["seed"] == seed
                                                  and not isinstance(r["stage"], int))]

    def base_scores(self) -> dict | None:
        base = {r["eval_task"]: r["value"] for r in self.rows if r["stage"] == 0}
        return base if set(base) == set(self.plan.eval_names) else None

    def stage_scores(self, method, seed, stage) -> dict | None:
        """{eval_task: value} of one row (an int stage or a label such as `multitask`), or None."""
        got = {r["eval_task"]: r["value"] for r in self.rows
               if r["method"] == method and r["seed"] == seed and r["stage"] == stage}
        return got if set(got) >= set(self.plan.task_names) else None

    def extra_rows(self, method, seed) -> dict[str, dict]:
        """merged:* rows: {stage label: {eval_task: value}}."""
        out: dict[str, dict] = {}
        for r in self.rows:
            if r["method"] == method and r["seed"] == seed and str(r["stage"]).startswith("merged:"):
                out.setdefault(r["stage"], {})[r["eval_task"]] = r["value"]
        return out

    def update_intransigence(self) -> None:
        """Intransigence of every complete sequential (method, seed) against the run's multitask
        reference of the same seed (metrics.intransigence; a* = the joint model's score on task k).
        With several multitask references, a method is paired with the one of the same method name."""
        refs = {(m, s): r for m in self.methods if self.methods[m].get("mode") == MULTITASK
                for s in self.cfg.seeds if (r := self.stage_scores(m, s, MULTITASK)) is not None}
        if not refs:
            return
        names = self.plan.task_names
        spec_name = {m.run_name: m.name for m in self.plan.method_specs}
        for row in self.summary:
            m, s = row["method"], row["seed"]
            if self.methods.get(m, {}).get("mode", "sequential") != "sequential" or row.get("acc") is None:
                continue
            cands = [k for k in refs if k[1] == s]
            if len(cands) > 1:
                cands = [k for k in cands if spec_name.get(k[0]) == spec_name.get(m)]
            if len(cands) != 1:
                continue
            joint = [refs[cands[0]][t] for t in names]
            per_task = metrics.intransigence(self.matrix(m, s), joint)
            row["intransigence"] = float(sum(per_task) / len(per_task))
            seed_entry = self.methods[m]["seeds"].get(str(s))
            if seed_entry is not None:
                seed_entry["intransigence"] = {"reference": cands[0][0], "per_task": per_task,
                                               "mean": row["intransigence"]}

    def add_row(self, method, seed, stage, trained, scores: dict, primary: dict):
        for task in self.plan.eval_names:
            self.rows.append({"method": method, "seed": seed, "stage": stage, "trained_task": trained or "",
                              "eval_task": task, "metric": self.plan.task_defs[task].metric_name, "value": scores[task],
                              "eval_group": "heldout" if task in self.plan.heldout else "stream"})

    def heldout_matrix(self, method, seed) -> list[list[float]]:
        return self._grid(method, seed, self.plan.heldout)

    def matrix(self, method, seed) -> list[list[float]]:
        return self._grid(method, seed, self.plan.task_names)

    def _grid(self, method, seed, names: list[str]) -> list[list[float]]:
        """Rows of the stream's stages 0..t (extra rows left out), columns `names`."""
        by_stage: dict[int, dict] = {}
        for r in self.rows:
            if r["method"] == method and r["seed"] == seed and r["eval_task"] in names and isinstance(r["stage"], int):
                by_stage.setdefault(r["stage"], {})[r["eval_task"]] = r["value"]
        return [[by_stage[s][t] for t in names] for s in sorted(by_stage)]

    def _ordered_rows(self) -> list[dict]:
        """The rows in the config's order (methods, seeds, stages, then extra rows, tasks), the order
        an uninterrupted run computes them in: a resumed run may redo stages after other rows."""
        m_ix = {s.run_name: i for i, s in enumerate(self.plan.method_specs)}
        s_ix = {s: i for i, s in enumerate(self.cfg.seeds)}
        t_ix = {t: i for i, t in enumerate(self.plan.eval_names)}
        extra_ix: dict = {}
        for r in self.rows:
            if not isinstance(r["stage"], int):
                extra_ix.setdefault(r["stage"], len(extra_ix))

        def key(r):
            st = r["stage"]
            return (m_ix.get(r["method"], len(m_ix)), s_ix.get(r["seed"], len(s_ix)),
                    (0, st) if isinstance(st, int) else (1, extra_ix[st]), t_ix.get(r["eval_task"], len(t_ix)))

        return sorted(self.rows, key=key)  # stable: rows of methods no longer in the config keep their order

    def flush(self):
        if not D.is_main():  # one writer: the other ranks hold the same results
            return
        results.write_csv(self.out / "matrix.csv", results.MATRIX_COLUMNS, self._ordered_rows())
        results.write_csv(self.out / "summary.csv", results.SUMMARY_COLUMNS, self.summary)
        results.write_json(self.out / "results.json", {
            "run": {"name": self.cfg.name, "stream": self.cfg.stream or "custom", "order": self.cfg.order if self.cfg.stream else "custom",
                    "tasks": self.plan.task_names, "seeds": self.cfg.seeds, "git_sha": git_sha(),
                    "config_hash": self.cfg.hash(), "config_changes": self.config_changes,
                    "config": self.cfg.model_dump(mode="json")},
            "meta": self.meta,
            "methods": self.methods,
        })


def run(pl: Plan, out: Path, console=None, config_changes: list | None = None) -> Recorder:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = pl.cfg
    console = console or Console(stderr=True, quiet=not D.is_main())
    quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if D.is_main():
        results.write_yaml(out / "config.yaml", cfg.model_dump(mode="json"))
    device, autocast = select_device(cfg)

    from . import models

    console.print(f"[bold]clbench[/] {cfg.name}: model={cfg.model} stream={cfg.stream or 'custom'} order={cfg.order} "
                  f"tasks={pl.task_names} methods={[m.run_name for m in pl.method_specs]} seeds={cfg.seeds} "
                  f"device={device.type} autocast={autocast or 'none'}")
    t0 = time.perf_counter()
    defs = [pl.task_defs[n] for n in pl.eval_names]
    for turn in ("main", "others"):  # rank 0 first: it fills the caches (model conversion, datasets) alone
        if (turn == "main") == D.is_main():
            base_model, tok, desc = models.resolve(cfg.model, pl.cache)
            lm_tasks = T.build_lm_eval_tasks(defs, pl.cache)
        D.barrier()
    base_model.to(device)
    primary = {n: pl.task_defs[n].primary_metric for n in pl.eval_names}
    pairs = {n: T.training_examples(lm_tasks[n], tok.eos_token if lm_tasks[n].OUTPUT_TYPE == "generate_until" else None)
             for n in pl.task_names}
    console.print(f"loaded model and {len(defs)} tasks in {time.perf_counter() - t0:.1f}s "
                  f"(train examples: {', '.join(f'{n}={len(p)}' for n, p in pairs.items())})")

    rec = Recorder(out, cfg, pl)
    resumed = rec.load_existing()
    if config_changes:
        rec.config_changes = rec.config_changes + [config_changes]
    rec.meta = meta_info(desc, device, autocast)
    eval_kw = dict(device=device, autocast_dtype=autocast, batch_size=cfg.eval.batch_size, limit=cfg.eval.limit,
                   bootstrap_iters=cfg.eval.bootstrap_iters, log_samples=cfg.eval.log_samples)

    # Row 0: every method starts from the same base weights, so the base model is evaluated once.
    base_scores = rec.base_scores() if resumed else None
    if base_scores is None:
        base_scores, samples, base_eval_s = evaluate_model(base_model, tok, lm_tasks, primary, 0, pl.task_defs, **eval_kw) \
            if D.is_main() else (None, None, None)
        base_scores, base_eval_s = D.broadcast((base_scores, base_eval_s))
        if cfg.eval.log_samples and D.is_main():
            results.write_samples(out / "samples" / "base" / "stage0", samples)
        console.print(f"base model: {_fmt_scores(base_scores)} ({base_eval_s:.1f}s)")
    else:
        base_eval_s = 0.0
        console.print(f"resuming {out}: base row and completed stages taken from the run directory")

    from .trackers import Tracker, open_trackers

    tracker = open_trackers(cfg, out) if D.is_main() else Tracker()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console, transient=True)
    tokenized_cache: dict[tuple[str, int], list] = {}
    with progress, tracker:
        for spec in pl.method_specs:
            for seed in cfg.seeds:
                run_method(pl, spec, seed, base_model, tok, lm_tasks, primary, pairs, tokenized_cache, base_scores,
                           base_eval_s, rec, device, autocast, eval_kw, progress, console, out, tracker)
    return rec


def quiet_libraries() -> None:
    """The run prints its own progress; the libraries' per-file bars would drown it."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _fmt_scores(scores: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in scores.items())


def evaluate_model(model, tok, lm_tasks, primary, seed, task_defs, **kw):
    """lm-eval on the model in memory; scores in R's scale (a task's clbench.score transform applied)."""
    from .checkpoint import preserved_rng
    from .evaluate import evaluate

    with preserved_rng():  # training's random stream does not depend on what was evaluated
        scores, samples, seconds = evaluate(model, tok, lm_tasks, primary, seed=seed, **kw)
    return {t: task_defs[t].score(v) for t, v in scores.items()}, samples, seconds


@dataclass
class Job:
    """One (method, seed) of a run and everything its stages need."""

    pl: Plan
    spec: object  # config.MethodSpec
    seed: int
    base_model: torch.nn.Module
    tok: object
    lm_tasks: dict
    primary: dict
    pairs: dict
    tok_cache: dict
    base_scores: dict
    base_eval_s: float
    rec: Recorder
    device: torch.device
    autocast: object
    eval_kw: dict
    progress: object
    console: object
    out: Path
    tracker: object = None  # clbench.trackers: per-step loss and lr, each row's scores
    memory_released: bool = False  # PeakMemory has handed freed memory back once for this method

    @property
    def name(self) -> str:
        return self.spec.run_name

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints" / self.name / f"seed{self.seed}"

    def tag(self) -> str:
        return f"[{self.name} seed {self.seed}]"


def run_method(pl, spec, seed, base_model, tok, lm_tasks, primary, pairs, tok_cache, base_scores, base_eval_s,
               rec: Recorder, device, autocast, eval_kw, progress, console, out: Path, tracker=None):
    job = Job(pl, spec, seed, base_model, tok, lm_tasks, primary, pairs, tok_cache, base_scores, base_eval_s, rec,
              device, autocast, eval_kw, progress, console, out, tracker)
    prev = rec.methods.get(job.name, {}).get("seeds", {}).get(str(seed))
    if prev and prev.get("complete"):
        console.print(f"{job.tag()} already complete in {out}; skipped")
        return None
    rec.methods.setdefault(job.name, {"seeds": {}}).update(mode=spec.mode, merges=[m.row_name for m in spec.merge])
    runner = {"sequential": _run_sequential, "single": _run_single, "multitask": _run_multitask}[spec.mode]
    return runner(job, prev)


def _new_model(job: Job):
    """A fresh copy of the base model with the method set up on it (peft wraps in place, so the
    base itself stays pristine for the next method)."""
    seed_everything(job.seed)
    meth = M.make(job.spec.name, job.spec.options)
    run_ctx = M.RunContext(method=job.name, seed=job.seed, tasks=job.pl.task_names, device=job.device, tokenizer=job.tok,
                           examples=lambda task: _task_examples(job, task))
    model = meth.setup(copy.deepcopy(job.base_model), run_ctx)
    model.to(job.device)
    return meth, run_ctx, model


def _stage_config(job: Job, t: int, task: str):
    return job.pl.cfg.train.merged(job.spec.train, job.pl.cfg.stage_overrides(t, task))


def _examples(job: Job, task: str, tcfg) -> list:
    from .train import tokenize

    key = (task, tcfg.max_length)
    if key not in job.tok_cache:
        job.tok_cache[key] = tokenize(job.pairs[task], job.tok, tcfg.max_length)
    ex = job.tok_cache[key]
    return ex[: tcfg.max_train_examples] if tcfg.max_train_examples else ex


def _task_examples(job: Job, task: str) -> list:
    """Tokenized training examples of any task (built on first use when it is not in the stream)."""
    if task not in job.pairs:
        d = job.pl.task_defs.get(task)
        if d is None:
            raise ClbenchError(f"unknown task {task!r}")
        lm = T.build_lm_eval_tasks([d], job.pl.cache)[task]
        job.pairs[task] = T.training_examples(lm, job.tok.eos_token if lm.OUTPUT_TYPE == "generate_until" else None)
    return _examples(job, task, job.pl.cfg.train.merged(job.spec.train))


def _train(job: Job, meth, model, run_ctx, t: int, task: str, examples: list, tcfg):
    """stage_start, the loop's training, stage_end. Returns (model, stats, seconds, peak MB)."""
    from .train import num_steps, train_stage

    s = stage_seed(job.seed, t)
    torch.manual_seed(s)
    gen = torch.Generator().manual_seed(s)
    stage = M.StageContext(stage=t, task=task, seed=job.seed, run=run_ctx, train_config=tcfg, generator=gen)
    stage.total_steps = num_steps(tcfg, len(examples))
    n = len(job.pl.task_names)
    kw = dict(device=job.device, autocast_dtype=job.autocast, pad_id=job.tok.pad_token_id, progress=job.progress)

    def calibrate(m, steps=None, lr=None, weight_decay=None, desc="calibrate"):
        c = tcfg.merged(M_over(steps=steps, lr=lr, weight_decay=weight_decay))
        return train_stage(m, meth, examples, c, stage, desc=f"{job.name} s{job.seed} stage {t} {desc}", dense=True, **kw)

    stage.calibrate = calibrate
    with PeakMemory(job.device, release=not job.memory_released) as pm:
        job.memory_released = True
        t_start = time.perf_counter()
        model = M.call(meth, "stage_start", model, stage, default=model)
        on_step = (lambda step, loss, lr: job.tracker.log_step(job.name, job.seed, t, step, loss, lr)) \
            if job.tracker is not None else None
        stats = train_stage(model, meth, examples, tcfg, stage, desc=f"{job.name} seed {job.seed} stage {t}/{n} {task}",
                            on_step=on_step, **kw)
        model = M.call(meth, "stage_end", model, stage, default=model)
        seconds = time.perf_counter() - t_start
    return model, stats, seconds, pm.peak_mb


def _evaluate(job: Job, model, t, exact_task: str | None, folder: str, everywhere: bool = True):
    """Scores of every task; with eval.offdiag_limit, cells other than `exact_task` use the subset.
    With several processes rank 0 evaluates and (everywhere=True) broadcasts the scores."""
    cfg = job.pl.cfg
    limits = None
    if exact_task is not None and cfg.eval.offdiag_limit:
        limits = {n: (cfg.eval.limit if n == exact_task else cfg.eval.offdiag_limit) for n in job.pl.eval_names}
    scores = es = None
    if D.is_main():
        scores, samples, es = evaluate_model(model, job.tok, job.lm_tasks, job.primary, job.seed, job.pl.task_defs,
                                             task_limits=limits, **job.eval_kw)
        if cfg.eval.log_samples:
            results.write_samples(job.out / "samples" / job.name / f"seed{job.seed}" / folder, samples)
    if everywhere:
        scores, es = D.broadcast((scores, es))
    return scores, es


def _check_ranks(job: Job, meth, model, entry: dict) -> None:
    """With several processes: every rank must hold the same weights and method state after a stage."""
    if not D.enabled():
        return
    digests = D.gather(D.state_digest(model, M.call(meth, "state_dict")))
    entry["rank_digests"] = [d[:16] for d in digests]
    if len(set(digests)) != 1:
        raise ClbenchError(f"{job.tag()} stage {entry['stage']}: ranks diverged (weights or method state differ: "
                           f"{entry['rank_digests']}); results up to the previous stage are kept")


def _add_row(job: Job, stage, trained, scores: dict) -> None:
    """One row of scores into the results (and the trackers)."""
    job.rec.add_row(job.name, job.seed, stage, trained, scores, job.primary)
    if job.tracker is not None:
        job.tracker.log_stage(job.name, job.seed, stage, scores)


def _finish_stage(job: Job, meth, model, entry: dict, scores: dict, stage_log: list, train_s, eval_s, peak,
                  mode: str) -> None:
    """After a stage: log it, check that every rank agrees, record it and write the results files."""
    stage_log.append(entry)
    _check_ranks(job, meth, model, entry)
    n, ck_mb = len(job.pl.task_names), entry["checkpoint_mb"]
    job.console.print(f"{job.tag()} stage {entry['stage']}/{n} {entry['task']}: {entry['steps']} steps, loss "
                      f"{entry['first_loss']:.3f} -> {entry['last_loss']:.3f} ({entry['train_seconds']:.1f}s); "
                      f"eval {_fmt_scores(scores)} ({entry['eval_seconds']:.1f}s)"
                      + (f"; checkpoint {ck_mb:.1f} MB" if ck_mb else ""))
    _record_method(job.rec, job.name, job.seed, meth, model, train_s, eval_s, peak, stage_log, mode=mode,
                   merges_pending=bool(job.spec.merge))
    job.rec.flush()


def _stage_entry(t, task, stats, es, ck_mb=None) -> dict:
    return {"stage": t, "task": task, "steps": stats["steps"], "first_loss": stats["first_loss"],
            "last_loss": stats["last_loss"], "train_seconds": stats["seconds"], "eval_seconds": es, "checkpoint_mb": ck_mb}


def _save_task_vector(job: Job, t: int, model, base_state) -> None:
    """What merging needs of stage t: the model's effective weights (adapters merged in) as a diff
    against the base model, kept until the run directory is deleted."""
    from . import checkpoint, merging

    if D.is_main():
        checkpoint.save_state_diff(job.ckpt_dir / f"taskvec{t}.pt",
                                   checkpoint.state_diff(merging.effective_state(model), base_state, copy=False))


def _run_stage(job: Job, meth, model, run_ctx, t: int, task: str, base_state, start_save=None):
    """Train stage t, evaluate every task, record the row (and save the stage's weights for merging).
    start_save(model, train seconds, peak MB) may start writing the stage's checkpoint, which then
    runs while the stage is evaluated. Returns (model, stats, train seconds, peak MB, scores,
    eval seconds, the pending save or None)."""
    tcfg = _stage_config(job, t, task)
    model, stats, secs, pk = _train(job, meth, model, run_ctx, t, task, _examples(job, task, tcfg), tcfg)
    pending = start_save(model, secs, pk) if start_save is not None else None
    try:
        scores, es = _evaluate(job, model, t, task if t < len(job.pl.task_names) else None, f"stage{t}")
        _add_row(job, t, task, scores)
        if job.spec.merge:
            _save_task_vector(job, t, model, base_state)
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    return model, stats, secs, pk, scores, es, pending


def _stages(a: int, b: int) -> str:
    return f"stage {a} is" if a == b else f"stages {a}-{b} are"


def _run_sequential(job: Job, prev):
    """The continual stream: one model through stages 1..T."""
    from . import checkpoint

    cfg, name, seed = job.pl.cfg, job.name, job.seed
    meth, run_ctx, model = _new_model(job)
    # Checkpoints are diffs against this post-setup state (rebuilt identically on resume).
    reference = checkpoint.snapshot(model, share=job.base_model.state_dict()) if cfg.keep_checkpoints != "none" else None
    ckpt_dir, rec = job.ckpt_dir, job.rec
    train_s, eval_s, peak, stage_log, start = 0.0, job.base_eval_s, 0.0, [], 1
    done = len(prev.get("stages", [])) if prev else 0
    # the latest stage checkpoint at or before the last recorded stage (with checkpoint_interval
    # not every stage has one: the stages after it are redone, with the same results)
    resume_at = next((k for k in range(done, 0, -1) if (ckpt_dir / f"stage{k}.pt").is_file()), 0) \
        if done and reference is not None else 0
    if resume_at:
        ck = checkpoint.load(ckpt_dir / f"stage{resume_at}.pt")
        checkpoint.apply_diff(model, reference, ck["diff"])
        if ck.get("method") is not None:
            M.call(meth, "load_state_dict", ck["method"])
        checkpoint.set_rng_state(ck["rng"])
        stage_log = list(prev["stages"][:resume_at])
        train_s, peak = ck["train_seconds"], ck["peak_mem_mb"]
        # written while stage `resume_at` was evaluated: its evaluation time is in the results
        eval_s = ck["eval_seconds"] if "eval_seconds" in ck else ck["eval_seconds_before"] + stage_log[-1]["eval_seconds"]
        start = resume_at + 1
        rec.drop(name, seed, resume_at)
        job.console.print(f"{job.tag()} resumed after stage {resume_at} from {ckpt_dir / f'stage{resume_at}.pt'}"
                          + (f"; {_stages(resume_at + 1, done)} redone (no later checkpoint)" if resume_at < done else ""))
    else:
        if done:
            job.console.print(f"{job.tag()} has no stage checkpoint to resume from; {_stages(1, done)} redone")
        rec.drop(name, seed, -1)
        _add_row(job, 0, None, job.base_scores)
    since_ck = 0.0  # training and evaluation seconds since the last checkpoint (or the method's start)
    last_ck = resume_at or None
    base_state = job.base_model.state_dict() if job.spec.merge else None
    last = len(job.pl.task_names)
    for t, task in enumerate(job.pl.task_names, 1):
        if t < start:
            continue
        def start_save(model, secs, pk, t=t):
            if reference is None or not D.is_main():
                return None
            if cfg.keep_checkpoints == "last":
                if t == last and not job.spec.merge:
                    return None  # the last stage completes the method: nothing will resume from its checkpoint
                expected_eval = stage_log[-1]["eval_seconds"] if stage_log else job.base_eval_s
                if since_ck + secs + expected_eval < cfg.checkpoint_interval:
                    return None  # cheaper to redo than to write
            return checkpoint.save_in_background(
                ckpt_dir / f"stage{t}.pt", model, reference, M.call(meth, "state_dict"),
                {"train_seconds": train_s + secs, "eval_seconds_before": eval_s, "peak_mem_mb": max(peak, pk), "stage": t})

        model, stats, secs, pk, scores, es, pending = _run_stage(job, meth, model, run_ctx, t, task, base_state,
                                                                 start_save)
        train_s, peak, eval_s = train_s + secs, max(peak, pk), eval_s + es
        ck_mb = pending.wait() if pending is not None else None  # before the results say the stage is done
        since_ck = 0.0 if pending is not None else since_ck + secs + es
        _finish_stage(job, meth, model, _stage_entry(t, task, stats, es, ck_mb), scores, stage_log, train_s, eval_s,
                      peak, "sequential")
        # Only now that the results say stage t is done may the previous checkpoint go.
        if pending is not None:
            if cfg.keep_checkpoints == "last" and last_ck is not None:
                (ckpt_dir / f"stage{last_ck}.pt").unlink(missing_ok=True)
            last_ck = t
    if job.spec.merge:
        eval_s += _run_merges(job, "sequential")
        _record_method(rec, name, seed, meth, model, train_s, eval_s, peak, stage_log, mode="sequential")
        rec.flush()
    if reference is not None and cfg.keep_checkpoints == "last" and D.is_main():
        for t in range(1, last + 1):  # complete: a stage checkpoint is only ever read to resume
            (ckpt_dir / f"stage{t}.pt").unlink(missing_ok=True)
    return model


def _run_single(job: Job, prev):
    """Reference: every task trained alone from the base model (row t = the model of task t only).
    Stages are independent, so a resumed run just continues with the first missing stage."""
    name, seed, rec = job.name, job.seed, job.rec
    done = len(prev.get("stages", [])) if prev else 0
    if done:
        rec.drop(name, seed, done)
        train_s, eval_s, peak = prev["train_seconds"], prev["eval_seconds"], prev["peak_mem_mb"]
        stage_log = list(prev["stages"][:done])
        job.console.print(f"{job.tag()} (single-task reference) resumed after stage {done}")
    else:
        rec.drop(name, seed, -1)
        _add_row(job, 0, None, job.base_scores)
        train_s, eval_s, peak, stage_log = 0.0, job.base_eval_s, 0.0, []
    base_state = job.base_model.state_dict() if job.spec.merge else None
    n = len(job.pl.task_names)
    meth = model = None
    for t, task in enumerate(job.pl.task_names, 1):
        if t <= done:
            continue
        meth, run_ctx, model = _new_model(job)
        model, stats, secs, pk, scores, es, _ = _run_stage(job, meth, model, run_ctx, t, task, base_state)
        train_s, peak, eval_s = train_s + secs, max(peak, pk), eval_s + es
        _finish_stage(job, meth, model, _stage_entry(t, task, stats, es), scores, stage_log, train_s, eval_s, peak,
                      "single")
        if t < n:
            del model
    if meth is None:  # every stage was done before: the trainable count comes from a fresh setup
        meth, _, model = _new_model(job)
    if job.spec.merge:
        eval_s += _run_merges(job, "single")
    _record_method(rec, name, seed, meth, model, train_s, eval_s, peak, stage_log, mode="single")
    rec.flush()
    return model


def _run_multitask(job: Job, prev):
    """Reference: one joint training on all tasks of the stream, their examples shuffled together,
    with the stream's total budget (the sum of the stages' steps; lr and the other settings from
    train + the method's overrides). Its scores land in the row `multitask`."""
    name, seed, rec = job.name, job.seed, job.rec
    rec.drop(name, seed, -1)
    _add_row(job, 0, None, job.base_scores)
    meth, run_ctx, model = _new_model(job)
    from .train import num_steps

    examples, total = [], 0
    for t, task in enumerate(job.pl.task_names, 1):
        tcfg_t = _stage_config(job, t, task)
        ex = _examples(job, task, tcfg_t)
        examples += ex
        total += num_steps(tcfg_t, len(ex))
    tcfg = job.pl.cfg.train.merged(job.spec.train, M_over(steps=total))
    model, stats, train_s, peak = _train(job, meth, model, run_ctx, 1, "multitask", examples, tcfg)
    scores, es = _evaluate(job, model, MULTITASK, None, MULTITASK)
    _add_row(job, MULTITASK, MULTITASK, scores)
    _finish_stage(job, meth, model, _stage_entry(1, MULTITASK, stats, es), scores, [], train_s, job.base_eval_s + es,
                  peak, "multitask")
    return model


MULTITASK = "multitask"  # the stage label of the joint reference's row in matrix.csv


def _run_merges(job: Job, mode: str) -> float:
    """Merge the per-stage task vectors saved by the stages and evaluate each merged model as the row
    `merged:<label>`. Returns the evaluation seconds."""
    from . import checkpoint, merging

    rec, name, seed = job.rec, job.name, job.seed
    rec.drop_extra(name, seed)
    if not D.is_main():  # merging trains nothing: rank 0 does it alone and writes the rows
        return 0.0
    base_state = job.base_model.state_dict()
    T = len(job.pl.task_names)
    diffs = [checkpoint.load_state_diff(job.ckpt_dir / f"taskvec{t}.pt") for t in range(1, T + 1)]
    vectors = merging.vectors_from_diffs(base_state, diffs, cumulative=(mode == "sequential"))
    del diffs
    spent = 0.0
    for ms in job.spec.merge:
        t0 = time.perf_counter()
        state = merging.merge(base_state, vectors, ms)
        model = merging.load_merged(job.base_model, state)
        del state
        scores, es = _evaluate(job, model, ms.row_name, None, ms.row_name.replace(":", "_"), everywhere=False)
        del model
        spent += es
        _add_row(job, ms.row_name, "", scores)
        job.console.print(f"{job.tag()} {ms.row_name}: {_fmt_scores(scores)} (merge + eval {time.perf_counter() - t0:.1f}s)")
    return spent


def M_over(**kw):
    from .config import TrainOverrides

    return TrainOverrides(**{k: v for k, v in kw.items() if v is not None})


def _record_method(rec: Recorder, name, seed, meth, model, train_s, eval_s, peak, stage_log, mode="sequential",
                   merges_pending=False):
    T = len(rec.plan.task_names)
    trainable = M.call(meth, "trainable_params", model, default=None)
    if trainable is None:
        trainable = M.count_trainable(model)
    if mode == "multitask":
        joint = rec.stage_scores(name, seed, MULTITASK)
        done = joint is not None
        summ = {"acc": float(sum(joint[t] for t in rec.plan.task_names) / T)} if done else {}
        base = rec.stage_scores(name, seed, 0)
        R = [[base[t] for t in rec.plan.task_names]] if base else []
        if done:
            R.append([joint[t] for t in rec.plan.task_names])
    else:
        R = rec.matrix(name, seed)
        done = len(R) - 1 == T
        if not done:
            summ = {}
        elif mode == "single":  # only the diagonal means something: each task's single-task score
            summ = {"la": metrics.learning_accuracy(R)}
        else:
            summ = metrics.summary(R)
    G = rec.heldout_matrix(name, seed) if rec.plan.heldout and mode == "sequential" and len(R) > 0 else None
    if summ and G is not None:
        summ["general_delta"] = metrics.general_ability_delta(G)[-1]
    complete = done and not merges_pending
    row = {"method": name, "seed": seed, "mode": mode, **summ, "trainable_params": int(trainable),
           "train_seconds": train_s, "eval_seconds": eval_s, "peak_mem_mb": peak}
    rec.summary = [r for r in rec.summary if not (r["method"] == name and r["seed"] == seed)]
    if summ:
        rec.summary.append(row)
    entry = rec.methods.setdefault(name, {"seeds": {}})
    entry["mode"] = mode
    merged = rec.extra_rows(name, seed)
    entry["seeds"][str(seed)] = {
        "matrix": R, "complete": complete, "metrics": summ, "trainable_params": int(trainable),
        **({"merged": merged} if merged else {}),
        **({"heldout_tasks": rec.plan.heldout, "heldout_matrix": G,
            "general_delta_per_stage": metrics.general_ability_delta(G)} if G is not None else {}),
        "train_seconds": train_s, "eval_seconds": eval_s, "peak_mem_mb": peak, "stages": list(stage_log)}
    rec.update_intransigence()
