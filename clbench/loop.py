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
    the method's own copies included), so compare methods within one run, not across runs."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0
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
            _release_freed_memory()  # so RSS starts from what is live, not from an earlier method's peak
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
    for i, spec in enumerate(cfg.methods):
        M.make(spec.name, spec.options, where=f"methods.{i}")  # validates name and options
    task_defs = T.load_tasks([(config_dir / d).resolve() for d in cfg.task_dirs])
    from .data import load_streams

    streams = load_streams([(config_dir / d).resolve() for d in cfg.task_dirs])
    names = T.resolve_stream(cfg, task_defs, streams)
    for n in names:
        task_defs[n].check_data(cache)
    unknown = [n for n in cfg.heldout if n not in task_defs]
    if unknown:
        raise ConfigError(f"unknown held-out task(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(task_defs))}")
    both = sorted(set(cfg.heldout) & set(names))
    if both:
        raise ConfigError(f"task(s) {', '.join(both)} are both in the stream and held out: a held-out task is never trained")
    for n in cfg.heldout:
        task_defs[n].check_data(cache, need_train=False)
    return Plan(cfg, config_dir, cache, names, task_defs, list(cfg.methods), list(cfg.heldout))


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
          "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return {"versions": versions, "model": model_desc, "hardware": hw}


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
        self.rows = [{**r, "seed": int(r["seed"]), "stage": int(r["stage"]), "value": float(r["value"])}
                     for r in results.read_csv(self.out / "matrix.csv")]
        self.summary = [{**r, "seed": int(r["seed"])} for r in results.read_csv(self.out / "summary.csv")] \
            if (self.out / "summary.csv").is_file() else []
        for r in self.summary:
            for k, v in r.items():
                if k not in ("method", "seed"):
                    r[k] = float(v) if v not in ("", None) else None
        return True

    def drop(self, method, seed, after_stage: int) -> None:
        self.rows = [r for r in self.rows if not (r["method"] == method and r["seed"] == seed and r["stage"] > after_stage)]

    def base_scores(self) -> dict | None:
        base = {r["eval_task"]: r["value"] for r in self.rows if r["stage"] == 0}
        return base if set(base) == set(self.plan.eval_names) else None

    def add_row(self, method, seed, stage, trained, scores: dict, primary: dict):
        for task in self.plan.eval_names:
            self.rows.append({"method": method, "seed": seed, "stage": stage, "trained_task": trained or "",
                              "eval_task": task, "metric": primary[task][0], "value": scores[task],
                              "eval_group": "heldout" if task in self.plan.heldout else "stream"})

    def heldout_matrix(self, method, seed) -> list[list[float]]:
        by_stage: dict[int, dict] = {}
        for r in self.rows:
            if r["method"] == method and r["seed"] == seed and r["eval_task"] in self.plan.heldout:
                by_stage.setdefault(int(r["stage"]), {})[r["eval_task"]] = r["value"]
        return [[by_stage[s][t] for t in self.plan.heldout] for s in sorted(by_stage)]

    def matrix(self, method, seed) -> list[list[float]]:
        names = self.plan.task_names
        by_stage: dict[int, dict] = {}
        for r in self.rows:
            if r["method"] == method and r["seed"] == seed and r["eval_task"] in names:
                by_stage.setdefault(int(r["stage"]), {})[r["eval_task"]] = r["value"]
        return [[by_stage[s][t] for t in names] for s in sorted(by_stage)]

    def flush(self):
        results.write_csv(self.out / "matrix.csv", results.MATRIX_COLUMNS, self.rows)
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
    console = console or Console(stderr=True)
    quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results.write_yaml(out / "config.yaml", cfg.model_dump(mode="json"))
    device, autocast = select_device(cfg)

    from . import models

    console.print(f"[bold]clbench[/] {cfg.name}: model={cfg.model} stream={cfg.stream or 'custom'} order={cfg.order} "
                  f"tasks={pl.task_names} methods={[m.run_name for m in pl.method_specs]} seeds={cfg.seeds} "
                  f"device={device.type} autocast={autocast or 'none'}")
    t0 = time.perf_counter()
    base_model, tok, desc = models.resolve(cfg.model, pl.cache)
    base_model.to(device)
    defs = [pl.task_defs[n] for n in pl.eval_names]
    lm_tasks = T.build_lm_eval_tasks(defs, pl.cache)
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
        base_scores, samples, base_eval_s = evaluate_model(base_model, tok, lm_tasks, primary, seed=0, **eval_kw)
        if cfg.eval.log_samples:
            results.write_samples(out / "samples" / "base" / "stage0", samples)
        console.print(f"base model: {_fmt_scores(base_scores)} ({base_eval_s:.1f}s)")
    else:
        base_eval_s = 0.0
        console.print(f"resuming {out}: base row and completed stages taken from the run directory")

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console, transient=True)
    tokenized_cache: dict[tuple[str, int], list] = {}
    with progress:
        for spec in pl.method_specs:
            for seed in cfg.seeds:
                run_method(pl, spec, seed, base_model, tok, lm_tasks, primary, pairs, tokenized_cache, base_scores,
                           base_eval_s, rec, device, autocast, eval_kw, progress, console, out)
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


def evaluate_model(model, tok, lm_tasks, primary, seed, **kw):
    from .evaluate import evaluate

    return evaluate(model, tok, lm_tasks, primary, seed=seed, **kw)


def run_method(pl, spec, seed, base_model, tok, lm_tasks, primary, pairs, tok_cache, base_scores, base_eval_s,
               rec: Recorder, device, autocast, eval_kw, progress, console, out: Path):
    from .train import tokenize, train_stage

    from . import checkpoint

    cfg = pl.cfg
    name = spec.run_name
    prev = rec.methods.get(name, {}).get("seeds", {}).get(str(seed))
    if prev and prev.get("complete"):
        console.print(f"[{name} seed {seed}] already complete in {out}; skipped")
        return None
    seed_everything(seed)
    meth = M.make(spec.name, spec.options)
    run_ctx = M.RunContext(method=name, seed=seed, tasks=pl.task_names, device=device, tokenizer=tok)
    model = copy.deepcopy(base_model)  # peft wraps in place; keep the base pristine for the next method
    model = meth.setup(model, run_ctx)
    model.to(device)
    # Checkpoints are diffs against this post-setup state (rebuilt identically on resume).
    reference = checkpoint.snapshot(model) if cfg.keep_checkpoints != "none" else None
    ckpt_dir = out / "checkpoints" / name / f"seed{seed}"
    train_s, eval_s, peak, stage_log, start = 0.0, base_eval_s, 0.0, [], 1
    done = len(prev.get("stages", [])) if prev else 0
    if done and reference is not None and (ckpt_dir / f"stage{done}.pt").is_file():
        ck = checkpoint.load(ckpt_dir / f"stage{done}.pt")
        checkpoint.apply_diff(model, reference, ck["diff"])
        if ck.get("method") is not None:
            M.call(meth, "load_state_dict", ck["method"])
        checkpoint.set_rng_state(ck["rng"])
        train_s, eval_s, peak = ck["train_seconds"], ck["eval_seconds"], ck["peak_mem_mb"]
        stage_log = list(prev["stages"][:done])
        start = done + 1
        rec.drop(name, seed, done)
        console.print(f"[{name} seed {seed}] resumed after stage {done} from {ckpt_dir / f'stage{done}.pt'}")
    else:
        rec.drop(name, seed, -1)
        rec.add_row(name, seed, 0, None, base_scores, primary)
    for t, task in enumerate(pl.task_names, 1):
        if t < start:
            continue
        tcfg = cfg.train.merged(spec.train, cfg.stage_overrides(t, task))
        key = (task, tcfg.max_length)
        if key not in tok_cache:
            ex = tokenize(pairs[task], tok, tcfg.max_length)
            tok_cache[key] = ex
        examples = tok_cache[key][: tcfg.max_train_examples] if tcfg.max_train_examples else tok_cache[key]
        s = stage_seed(seed, t)
        torch.manual_seed(s)
        gen = torch.Generator().manual_seed(s)
        stage = M.StageContext(stage=t, task=task, seed=seed, run=run_ctx, train_config=tcfg, generator=gen)
        from .train import num_steps

        stage.total_steps = num_steps(tcfg, len(examples))

        def calibrate(m, steps=None, lr=None, weight_decay=None, desc="calibrate", _stage=stage, _ex=examples, _tcfg=tcfg):
            c = _tcfg.merged(M_over(steps=steps, lr=lr, weight_decay=weight_decay))
            return train_stage(m, meth, _ex, c, _stage, device=device, autocast_dtype=autocast, pad_id=tok.pad_token_id,
                               progress=progress, desc=f"{name} s{seed} stage {t} {desc}", dense=True)

        stage.calibrate = calibrate
        with PeakMemory(device) as pm:
            t_start = time.perf_counter()
            model = M.call(meth, "stage_start", model, stage, default=model)
            stats = train_stage(model, meth, examples, tcfg, stage, device=device, autocast_dtype=autocast,
                                pad_id=tok.pad_token_id, progress=progress, desc=f"{name} seed {seed} stage {t}/{len(pl.task_names)} {task}")
            model = M.call(meth, "stage_end", model, stage, default=model)
            train_s += time.perf_counter() - t_start
        peak = max(peak, pm.peak_mb)
        limits = None
        if cfg.eval.offdiag_limit and t < len(pl.task_names):  # the diagonal and the final row stay exact
            limits = {n: (cfg.eval.limit if n == task else cfg.eval.offdiag_limit) for n in pl.eval_names}
        scores, samples, es = evaluate_model(model, tok, lm_tasks, primary, seed=seed, task_limits=limits, **eval_kw)
        eval_s += es
        if cfg.eval.log_samples:
            results.write_samples(out / "samples" / name / f"seed{seed}" / f"stage{t}", samples)
        rec.add_row(name, seed, t, task, scores, primary)
        ck_mb = None
        if reference is not None:
            ck_mb = checkpoint.save(ckpt_dir / f"stage{t}.pt", model, reference, M.call(meth, "state_dict"),
                                    {"train_seconds": train_s, "eval_seconds": eval_s, "peak_mem_mb": peak, "stage": t})
        stage_log.append({"stage": t, "task": task, "steps": stats["steps"], "first_loss": stats["first_loss"],
                          "last_loss": stats["last_loss"], "train_seconds": stats["seconds"], "eval_seconds": es,
                          "checkpoint_mb": ck_mb})
        console.print(f"[{name} seed {seed}] stage {t}/{len(pl.task_names)} {task}: {stats['steps']} steps, "
                      f"loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f} ({stats['seconds']:.1f}s); "
                      f"eval {_fmt_scores(scores)} ({es:.1f}s)" + (f"; checkpoint {ck_mb:.1f} MB" if ck_mb else ""))
        _record_method(rec, name, seed, meth, model, train_s, eval_s, peak, stage_log)
        rec.flush()
        # Only now that the results say stage t is done may the previous checkpoint go.
        if reference is not None and cfg.keep_checkpoints == "last" and t > 1:
            (ckpt_dir / f"stage{t - 1}.pt").unlink(missing_ok=True)
    return model


def M_over(**kw):
    from .config import TrainOverrides

    return TrainOverrides(**{k: v for k, v in kw.items() if v is not None})


def _record_method(rec: Recorder, name, seed, meth, model, train_s, eval_s, peak, stage_log):
    R = rec.matrix(name, seed)
    n_stages = len(R) - 1
    trainable = M.call(meth, "trainable_params", model, default=None)
    if trainable is None:
        trainable = M.count_trainable(model)
    summ = metrics.summary(R) if n_stages == len(rec.plan.task_names) else {}
    if summ and rec.plan.heldout:
        summ["general_delta"] = metrics.general_ability_delta(rec.heldout_matrix(name, seed))[-1]
    row = {"method": name, "seed": seed, **summ, "trainable_params": int(trainable), "train_seconds": train_s,
           "eval_seconds": eval_s, "peak_mem_mb": peak}
    rec.summary = [r for r in rec.summary if not (r["method"] == name and r["seed"] == seed)]
    if summ:
        rec.summary.append(row)
    rec.methods.setdefault(name, {"seeds": {}})["seeds"][str(seed)] = {
        "matrix": R, "complete": bool(summ), "metrics": summ, "trainable_params": int(trainable),
        **({"heldout_tasks": rec.plan.heldout, "heldout_matrix": rec.heldout_matrix(name, seed),
            "general_delta_per_stage": metrics.general_ability_delta(rec.heldout_matrix(name, seed))} if rec.plan.heldout else {}),
        "train_seconds": train_s, "eval_seconds": eval_s, "peak_mem_mb": peak, "stages": list(stage_log)}
