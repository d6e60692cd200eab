"""The continual loop: for each method and seed, stage after stage, train then evaluate
every task of the stream, filling the accuracy matrix R row by row.

    R[0]  = base model (evaluated once per run: every method starts from the same weights)
    for t, task in enumerate(stream, 1):
        model = run_stage(model, method, task's training examples)   # clbench.training.stage
        R[t]  = evaluate(model, every task of the stream)            # one lm-eval call, in memory

The modes: `sequential` (the stream), `single` (each task alone from the base model) and
`multitask` (one joint model), plus merged rows from the stages' task vectors. Planning
(clbench.run.planning), where the run executes (clbench.runtime), the results store
(clbench.results.recorder) and the checkpoint policy (clbench.run.resume) live in their own modules.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape

from clbench import checkpoint
from clbench.method import RunContext, call_hook, make_method
from clbench.checkpoint import preserved_rng
from clbench.config import TrainOverrides
import clbench.data.tasks
from clbench.data.examples import tokenize
from clbench.distributed import collectives
from clbench.distributed import fsdp
from clbench.errors import ClbenchError
from clbench.method import merging
from clbench.results import contract
from clbench.results.recorder import MULTITASK, CostLog, Recorder, meta_info, stage_entry
from clbench.results.rundir import RunDir
from clbench.run import models
from clbench.run.planning import Plan
from clbench.run.resume import StageCheckpoints
from clbench.run.trackers import Tracker, open_trackers
from clbench.runtime import PeakMemory, Runtime, method_state_bytes, quiet_libraries, seed_everything
from clbench.training.midstage import StepCheckpoints
from clbench.training.stage import autocast_factory, run_stage
from clbench.training.train import num_steps


@dataclass
class Session:
    """What every (method, seed) of one run shares; built once by `run` and handed down."""

    pl: Plan
    out: Path
    rec: Recorder
    console: object
    device: torch.device
    autocast: object  # the autocast dtype, or None
    base_model: torch.nn.Module | None  # the base weights, kept for the run; None when sharded (see base())
    tok: object
    lm_tasks: dict
    pairs: dict  # task -> (context, target) strings of its training examples
    progress: object = None  # the rich progress bar, once `run` has opened it
    tracker: object = None  # the experiment trackers (clbench.run.trackers), once opened
    base_scores: dict | None = None  # row 0, once evaluated or read back
    base_eval_s: float = 0.0
    tok_cache: dict = field(default_factory=dict)  # (task, max_length) -> tokenized examples, shared by all methods and seeds
    memory_released: bool = False  # PeakMemory has handed freed memory back once for the current method
    sharded: bool = False  # distributed.strategy fsdp: models are sharded after the method's setup (clbench.distributed.fsdp)
    skeleton: torch.nn.Module | None = None  # sharded, ranks but 0: the base model's structure on the meta device
    first_base: torch.nn.Module | None = None  # sharded, rank 0: the weights the run loaded, until base() hands them out
    notes: set = field(default_factory=set)  # what the run has said once

    def base(self) -> torch.nn.Module:
        """The base weights. Sharded, no rank keeps them for the run (host memory per rank shrinks with
        the ranks): the rank that needs them (rank 0 for a method's setup, a task vector or a merge)
        reads them from the model folder again, the first time taking the load the run started with."""
        if self.base_model is not None:
            return self.base_model
        if self.first_base is not None:
            model, self.first_base = self.first_base, None
            return model
        return models.resolve(self.cfg.model, self.pl.cache)[0]

    def model_to_shard(self) -> torch.nn.Module:
        """Sharded: what a model to be sharded with fsdp.shard(from_rank0=True) starts from: the base
        weights on rank 0, a copy of the structure (no memory) on the others."""
        return self.base() if collectives.is_main() else copy.deepcopy(self.skeleton)

    @property
    def runtime(self) -> Runtime:
        """The runtime stages train on: this run's device, autocast, pad id and progress bar."""
        return Runtime(self.device, self.autocast, self.tok.pad_token_id, self.progress)

    @property
    def cfg(self):
        return self.pl.cfg

    def evaluate(self, model, seed: int, limits=None, data_parallel: bool = False):
        """lm-eval on the model in memory; scores in R's scale (a task's clbench.score transform applied).
        data_parallel: every rank calls it with the whole model, the documents split over the ranks;
        rank 0 gets the scores (one process's, clbench.run.evaluate.one_process_order), the others None."""
        from clbench.run.evaluate import evaluate

        e = self.cfg.eval
        primary = {n: self.pl.task_defs[n].primary_metric for n in self.pl.eval_names}
        with preserved_rng():  # training's random stream does not depend on what was evaluated
            scores, samples, seconds = evaluate(model, self.tok, self.lm_tasks, primary, self.runtime, seed=seed,
                                                batch_size=e.batch_size, limit=e.limit,
                                                bootstrap_iters=e.bootstrap_iters, log_samples=e.log_samples,
                                                task_limits=limits, apply_chat_template=self.cfg.chat_template,
                                                system_instruction=self.cfg.system_instruction,
                                                data_parallel=data_parallel)
        if scores is None:
            return None, samples, seconds
        return {t: self.pl.task_defs[t].score(v) for t, v in scores.items()}, samples, seconds

    def task_pairs(self, task: str) -> list[tuple[str, str]]:
        """The (context, target) strings of any task's training examples (built on first use when
        the task is not in the stream), rendered as lm-eval renders its evaluation requests."""
        if task not in self.pairs:
            d = self.pl.task_defs.get(task)
            if d is None:
                raise ClbenchError(f"unknown task {task!r}")
            lm = clbench.data.tasks.build_lm_eval_tasks([d], self.pl.cache)[task]
            self.pairs[task] = clbench.data.tasks.run_examples(lm, self.tok, self.cfg)
        return list(self.pairs[task])

    def examples(self, task: str, tcfg) -> list:
        """The tokenized training examples of any task, as a fresh list: a method may change its
        list without touching the cache that every method and seed shares."""
        self.task_pairs(task)
        key = (task, tcfg.max_length)
        if key not in self.tok_cache:
            self.tok_cache[key] = tokenize(self.pairs[task], self.tok, tcfg.max_length)
        ex = self.tok_cache[key]
        return list(ex[: tcfg.max_train_examples] if tcfg.max_train_examples else ex)


@dataclass
class Job:
    """One (method, seed) of a run."""

    s: Session
    spec: object  # config.MethodSpec
    seed: int

    @property
    def name(self) -> str:
        return self.spec.run_name

    @property
    def ckpt_dir(self) -> Path:
        return self.s.out / "checkpoints" / self.name / f"seed{self.seed}"

    def tag(self) -> str:
        return f"[{self.name} seed {self.seed}]"

    def stage_config(self, t: int, task: str):
        return self.s.cfg.train.merged(self.spec.train, self.s.cfg.stage_overrides(t, task))

    def new_model(self):
        """A fresh copy of the base model with the method set up on it (peft wraps in place, so the
        base itself stays pristine for the next method)."""
        s = self.s
        seed_everything(self.seed)
        meth = make_method(self.spec.name, self.spec.options)
        run_cfg = s.cfg.train.merged(self.spec.train)
        run_ctx = RunContext(method=self.name, seed=self.seed, tasks=s.pl.task_names, device=s.device, tokenizer=s.tok,
                               examples=lambda task: s.examples(task, run_cfg),
                               pairs=s.task_pairs,
                               tokenize=lambda pairs: tokenize(pairs, s.tok, run_cfg.max_length),
                               task=lambda name: s.lm_tasks[name],
                               autocast=autocast_factory(s.device, s.autocast), sharded=s.sharded)
        if not s.sharded:
            model = call_hook(meth, "setup", copy.deepcopy(s.base_model), run_ctx)
            return meth, run_ctx, model.to(s.device)
        meth, model = self._setup_once(meth, run_ctx)
        return meth, run_ctx, fsdp.shard(model, s.device, s.autocast, from_rank0=True)

    def _setup_once(self, meth, run_ctx):
        """Sharded: rank 0 sets the method up on the base weights, the other ranks on the model's
        structure (meta device), and fsdp.shard sends them their shards. A method whose setup keeps
        something computed from the weights (fsdp.meta_tensors finds it) is set up on the weights on
        every rank instead, as one process would. The RNG leaves as rank 0's (a setup on the meta
        device draws nothing)."""
        s, main = self.s, collectives.is_main()
        error, held, model = None, [], None
        try:
            model = call_hook(meth, "setup", s.model_to_shard(), run_ctx)
            held = [] if main else [f"its setup keeps {p} from them" for p in fsdp.meta_tensors(meth, model)]
        except Exception as e:  # rank 0 raises after the others know, so that none waits for it
            if main:
                error = e
            else:
                held = [f"its setup reads them: {type(e).__name__} on the meta device"]
        said = collectives.gather((error is not None, held))
        if error is not None:
            raise error
        if said[0][0]:
            raise ClbenchError(f"{self.tag()}: the method's setup failed on rank 0")
        held = sorted({h for _, hs in said for h in hs})
        if held:
            if self.spec.name not in s.notes and main:
                s.console.print(f"{escape(self.tag())}: set up on the base weights on every rank ({'; '.join(held[:3])})")
            s.notes.add(self.spec.name)
            if not main:
                seed_everything(self.seed)
                meth = make_method(self.spec.name, self.spec.options)
                model = call_hook(meth, "setup", s.base(), run_ctx)
        state = collectives.broadcast(checkpoint.rng_state())
        checkpoint.set_rng_state({**state, "cuda": None})
        return meth, model

    def train(self, meth, model, run_ctx, t: int, task: str, examples: list, tcfg):
        """One stage (clbench.training.stage.run_stage) under the memory meter. Returns (model, stats, seconds, peak MB)."""
        s = self.s
        on_step = (lambda step, loss, lr: s.tracker.log_step(self.name, self.seed, t, step, loss, lr)) \
            if s.tracker is not None else None
        with PeakMemory(s.device, release=not s.memory_released) as pm:
            s.memory_released = True
            t_start = time.perf_counter()
            model, stats, _ = run_stage(model, meth, examples, tcfg, run_ctx, t, task, s.runtime, on_step=on_step, step_checkpoints=self.step_checkpoints(meth, t),
                                        desc=f"{self.name} seed {self.seed} stage {t}/{len(s.pl.task_names)} {task}")
            seconds = time.perf_counter() - t_start
        if stats.get("resumed_at_step"):
            s.console.print(f"{escape(self.tag())} stage {t} {task}: resumed at step {stats['resumed_at_step']} of "
                            f"{stats['steps']} from its checkpoint inside the stage")
        if s.tracker is not None and "schedule" in stats:
            s.tracker.log_schedule(self.name, self.seed, t, stats["schedule"])
        stats["per_rank"] = collectives.gather({**stats.pop("state_bytes"), "method_state": method_state_bytes(meth, model),
                                      "peak_mem_mb": pm.peak_mb})
        return model, stats, seconds, pm.peak_mb

    def step_checkpoints(self, meth, t: int):
        """The checkpoint inside stage t (config checkpoint_steps), or None where it is off or the
        method keeps state inside a stage that it would not hold (Method.step_resume_refusal)."""
        every = self.s.cfg.checkpoint_steps
        if not every:
            return None
        why = call_hook(meth, "step_resume_refusal")
        if why:
            if t == 1:
                self.s.console.print(f"{escape(self.tag())} checkpoint_steps: not used, a stage restarts from its "
                                     f"beginning ({why})")
            return None
        return StepCheckpoints(self.ckpt_dir, t, every, sharded=self.s.sharded)

    def evaluate(self, model, t, exact_task: str | None, folder: str, everywhere: bool = True):
        """Scores of every task; with eval.offdiag_limit, cells other than `exact_task` use the subset.
        With several processes (everywhere=True) every rank evaluates its share of the documents with
        the whole model (gathered under fsdp) and rank 0's scores are broadcast; everywhere=False: rank
        0 alone (a merged model that only rank 0 holds)."""
        s, cfg = self.s, self.s.cfg
        limits = None
        if exact_task is not None and cfg.eval.offdiag_limit:
            limits = {n: (cfg.eval.limit if s.pl.same_task(n) == exact_task else cfg.eval.offdiag_limit)
                      for n in s.pl.eval_names}
        scores = es = None
        with fsdp.unsharded(model):  # a sharded model is gathered on every rank, which evaluates its share
            parallel = everywhere and collectives.world_size() > 1
            if parallel or collectives.is_main():
                scores, samples, es = s.evaluate(model, self.seed, limits, data_parallel=parallel)
            if collectives.is_main():
                if cfg.eval.log_samples:
                    contract.write_samples(s.out / "samples" / self.name / f"seed{self.seed}" / folder, samples)
        if everywhere:
            scores, es = collectives.broadcast((scores, es))
        return scores, es

    def add_row(self, stage, trained, scores: dict) -> None:
        """One row of scores into the results (and the trackers)."""
        self.s.rec.add_row(self.name, self.seed, stage, trained, scores)
        if self.s.tracker is not None:
            self.s.tracker.log_stage(self.name, self.seed, stage, scores)

    def finish_stage(self, meth, model, entry: dict, scores: dict, log: CostLog, mode: str) -> None:
        """After a stage: check that every rank agrees, record it, write the results files, then log it."""
        log.stages.append(entry)
        collectives.check_ranks(self.tag(), model, lambda: call_hook(meth, "state_dict"), entry)
        # recorded first: the summary line means the stage is safely in the run directory
        self.record(meth, model, log, mode, merges_pending=bool(self.spec.merge))
        StepCheckpoints(self.ckpt_dir, entry["stage"], 1).remove()  # the stage is recorded: its step checkpoint goes
        n, ck_mb = len(self.s.pl.task_names), entry["checkpoint_mb"]
        self.s.console.print(f"{escape(self.tag())} stage {entry['stage']}/{n} {entry['task']}: {entry['steps']} steps, loss "
                             f"{entry['first_loss']:.3f} -> {entry['last_loss']:.3f} ({entry['train_seconds']:.1f}s); "
                             f"eval {_fmt_scores(scores)} ({entry['eval_seconds']:.1f}s)"
                             + (f"; checkpoint {ck_mb:.1f} MB" if ck_mb else ""))
        if entry.get("method_stats"):  # what the method measured in the stage (Method.stage_stats)
            self.s.console.print(f"{escape(self.tag())} stage {entry['stage']}/{n} {self.spec.name}: "
                                 + " ".join(f"{k}={_fmt_stat(v)}" for k, v in entry["method_stats"].items()))

    def record(self, meth, model, log: CostLog, mode: str, merges_pending: bool = False) -> None:
        self.s.rec.record_method(self.name, self.seed, meth, model, log.train_s, log.eval_s, log.peak, log.stages,
                                 mode=mode, merges_pending=merges_pending)
        self.s.rec.flush()

    def save_task_vector(self, t: int, model) -> None:
        """What merging needs of stage t: the model's effective weights (adapters merged in) as a diff
        against the base model, kept until the run directory is deleted."""
        base = self.s.base() if collectives.is_main() else None  # sharded: read again, on rank 0 only
        state = fsdp.effective_state(model, base) if self.s.sharded else merging.effective_state(model)
        if collectives.is_main():
            checkpoint.save_state_diff(self.ckpt_dir / f"taskvec{t}.pt",
                                       checkpoint.state_diff(state, base.state_dict(), copy=False))


def _fmt_stat(v: float) -> str:
    return f"{v:.4g}"


def _fmt_scores(scores: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in scores.items())


def run(pl: Plan, rundir: RunDir, device: torch.device, autocast, console=None) -> Recorder:
    """Every (method, seed) of the plan into `rundir`, which the caller (clbench.run.runner) has locked,
    checked and written config.yaml into; device and autocast from clbench.runtime.select_device."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = pl.cfg
    console = console or Console(stderr=True, quiet=not collectives.is_main())
    quiet_libraries()
    out = rundir.path
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    console.print(f"[bold]clbench[/] {cfg.name}: model={cfg.model} stream={cfg.stream or 'custom'} order={cfg.order} "
                  f"tasks={pl.task_names} methods={[m.run_name for m in pl.method_specs]} seeds={cfg.seeds} "
                  f"device={device.type} autocast={autocast or 'none'}")
    t0 = time.perf_counter()
    defs = [pl.task_defs[n] for n in pl.eval_names]
    sharded = fsdp.requested(cfg)
    for turn in ("main", "others"):  # rank 0 first: it fills the caches (model conversion, datasets) alone
        if (turn == "main") == collectives.is_main():
            # sharded, only rank 0 reads the weights: the others get their shards from it (fsdp.shard)
            base_model, tok, desc = models.resolve(cfg.model, pl.cache, weights=collectives.is_main() or not sharded)
            lm_tasks = clbench.data.tasks.build_lm_eval_tasks(defs, pl.cache)
        collectives.barrier()
    skeleton = first_base = None
    if sharded:  # no rank keeps the base weights for the run (Session.base)
        skeleton = None if collectives.is_main() else base_model  # rank 0 never sets up on the structure
        first_base, base_model = (base_model if collectives.is_main() else None), None
    else:
        base_model.to(device)
    pairs = {n: clbench.data.tasks.run_examples(lm_tasks[n], tok, cfg) for n in pl.task_names}
    console.print(f"loaded model and {len(defs)} tasks in {time.perf_counter() - t0:.1f}s "
                  f"(train examples: {', '.join(f'{n}={len(p)}' for n, p in pairs.items())})")

    rec = Recorder(rundir, cfg, pl)
    resumed = rec.load_existing()
    rec.meta = meta_info(desc, device, autocast)
    s = Session(pl=pl, out=out, rec=rec, console=console, device=device, autocast=autocast, base_model=base_model,
                tok=tok, lm_tasks=lm_tasks, pairs=pairs, sharded=sharded, skeleton=skeleton, first_base=first_base)

    # Row 0: every method starts from the same base weights, so the base model is evaluated once.
    base_scores = rec.base_scores() if resumed else None
    if base_scores is None:
        base_scores, samples, base_eval_s = _evaluate_base(s)  # every rank: its share of the documents
        base_scores, base_eval_s = collectives.broadcast((base_scores, base_eval_s))
        if cfg.eval.log_samples and collectives.is_main():
            contract.write_samples(out / "samples" / "base" / "stage0", samples)
        console.print(f"base model: {_fmt_scores(base_scores)} ({base_eval_s:.1f}s)")
    else:
        base_eval_s = 0.0
        console.print(f"resuming {out}: base row and completed stages taken from the run directory")
    s.base_scores, s.base_eval_s = base_scores, base_eval_s

    s.tracker = open_trackers(cfg, out) if collectives.is_main() else Tracker()
    s.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console, transient=True)
    with s.progress, s.tracker:
        for spec in pl.method_specs:
            for seed in cfg.seeds:
                run_method(Job(s, spec, seed))
    return rec


def _evaluate_base(s: Session):
    """Row 0, data-parallel over the ranks. Sharded: the base model is sharded as a method's model is
    (its weights sent from rank 0) and gathered for the evaluation as a stage's model is."""
    parallel = collectives.world_size() > 1
    if not s.sharded:
        return s.evaluate(s.base_model, 0, data_parallel=parallel)
    model = s.model_to_shard()
    model = fsdp.shard(model, s.device, s.autocast, from_rank0=True)
    with fsdp.unsharded(model):
        result = s.evaluate(model, 0, data_parallel=parallel)
    del model
    return result


def run_method(job: Job):
    s = job.s
    s.memory_released = False
    prev = s.rec.methods.get(job.name, {}).get("seeds", {}).get(str(job.seed))
    if prev and prev.get("complete"):
        s.console.print(f"{escape(job.tag())} already complete in {s.out}; skipped")
        return None
    s.rec.methods.setdefault(job.name, {"seeds": {}}).update(mode=job.spec.mode, merges=[m.row_name for m in job.spec.merge])
    runner = {"sequential": _run_sequential, "single": _run_single, "multitask": _run_multitask}[job.spec.mode]
    return runner(job, prev)


@dataclass
class StageOutcome:
    """What one trained and evaluated stage hands back to its mode (`_train_and_score`)."""

    model: torch.nn.Module
    stats: dict  # the training statistics (clbench.training.train.train_stage)
    train_s: float
    peak_mb: float
    scores: dict  # task -> score: the stage's row
    eval_s: float
    pending: object = None  # the stage checkpoint still being written (clbench.run.resume), or None


def _train_and_score(job: Job, meth, model, run_ctx, t: int, task: str, start_save=None) -> StageOutcome:
    """Train stage t, evaluate every task, record the row (and save the stage's weights for merging).
    start_save(model, train seconds, peak MB) may start writing the stage's checkpoint, which then
    runs while the stage is evaluated."""
    tcfg = job.stage_config(t, task)
    model, stats, secs, pk = job.train(meth, model, run_ctx, t, task, job.s.examples(task, tcfg), tcfg)
    pending = start_save(model, secs, pk) if start_save is not None else None
    try:
        scores, es = job.evaluate(model, t, task if t < len(job.s.pl.task_names) else None, f"stage{t}")
        job.add_row(t, task, scores)
        if job.spec.merge:
            job.save_task_vector(t, model)
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    return StageOutcome(model, stats, secs, pk, scores, es, pending)


def _run_sequential(job: Job, prev):
    """The continual stream: one model through stages 1..T."""
    s, names = job.s, job.s.pl.task_names
    meth, run_ctx, model = job.new_model()
    ckpts = StageCheckpoints(job, model)
    log, start = CostLog(eval_s=s.base_eval_s), 1
    done = len(prev.get("stages", [])) if prev else 0
    resume_at = ckpts.resume_point(done)
    if resume_at:
        ck = ckpts.restore(resume_at, model, meth, prev["stages"])
        log = CostLog(ck["train_seconds"], ck["eval_seconds"], ck["peak_mem_mb"], prev["stages"][:resume_at])
        start = resume_at + 1
        s.rec.drop(job.name, job.seed, resume_at)
        s.console.print(f"{escape(job.tag())} resumed after stage {resume_at} from {ckpts.path(resume_at)}"
                        + (f"; {_stages(resume_at + 1, done)} redone (no later checkpoint)" if resume_at < done else ""))
    else:
        if done:
            s.console.print(f"{escape(job.tag())} has no stage checkpoint to resume from; {_stages(1, done)} redone")
        s.rec.drop(job.name, job.seed, -1)
        job.add_row(0, None, s.base_scores)
    for t, task in enumerate(names, 1):
        if t < start:
            continue

        def start_save(model, secs, pk, t=t):
            return ckpts.start_save(t, model, meth, log, secs, pk)

        out = _train_and_score(job, meth, model, run_ctx, t, task, start_save)
        model = out.model
        log.add(out.train_s, out.eval_s, out.peak_mb)
        ck_mb = out.pending.wait() if out.pending is not None else None  # before the results say the stage is done
        ckpts.stage_done(t, out.train_s + out.eval_s, out.pending)
        job.finish_stage(meth, model, stage_entry(t, task, out.stats, out.eval_s, ck_mb), out.scores, log, "sequential")
        ckpts.stage_recorded(t, out.pending)  # only now may the previous checkpoint go
    if job.spec.merge:
        log.eval_s += _run_merges(job, "sequential")
        job.record(meth, model, log, "sequential")
    ckpts.method_complete()
    return model


def _stages(a: int, b: int) -> str:
    return f"stage {a} is" if a == b else f"stages {a}-{b} are"


def _run_single(job: Job, prev):
    """Reference: every task trained alone from the base model (row t = the model of task t only).
    Stages are independent, so a resumed run just continues with the first missing stage."""
    s, names = job.s, job.s.pl.task_names
    done = len(prev.get("stages", [])) if prev else 0
    if done:
        s.rec.drop(job.name, job.seed, done)
        log = CostLog(prev["train_seconds"], prev["eval_seconds"], prev["peak_mem_mb"], prev["stages"][:done])
        s.console.print(f"{escape(job.tag())} (single-task reference) resumed after stage {done}")
    else:
        s.rec.drop(job.name, job.seed, -1)
        job.add_row(0, None, s.base_scores)
        log = CostLog(eval_s=s.base_eval_s)
    meth = model = None
    for t, task in enumerate(names, 1):
        if t <= done:
            continue
        meth, run_ctx, model = job.new_model()
        out = _train_and_score(job, meth, model, run_ctx, t, task)
        model = out.model
        log.add(out.train_s, out.eval_s, out.peak_mb)
        job.finish_stage(meth, model, stage_entry(t, task, out.stats, out.eval_s), out.scores, log, "single")
        if t < len(names):
            del model
    if meth is None:  # every stage was done before: the trainable count comes from a fresh setup
        meth, _, model = job.new_model()
    if job.spec.merge:
        log.eval_s += _run_merges(job, "single")
    job.record(meth, model, log, "single")
    return model


def _run_multitask(job: Job, prev):
    """Reference: one joint training on all tasks of the stream, their examples shuffled together,
    with the stream's total budget (the sum of the stages' steps; lr and the other settings from
    train + the method's overrides). Its scores land in the row `multitask`."""
    s = job.s
    s.rec.drop(job.name, job.seed, -1)
    job.add_row(0, None, s.base_scores)
    meth, run_ctx, model = job.new_model()
    examples, total = [], 0
    for t, task in enumerate(s.pl.task_names, 1):
        ex = s.examples(task, job.stage_config(t, task))
        examples += ex
        total += num_steps(job.stage_config(t, task), len(ex))
    tcfg = s.cfg.train.merged(job.spec.train, TrainOverrides(steps=total))
    model, stats, train_s, peak = job.train(meth, model, run_ctx, 1, MULTITASK, examples, tcfg)
    scores, es = job.evaluate(model, MULTITASK, None, MULTITASK)
    job.add_row(MULTITASK, MULTITASK, scores)
    job.finish_stage(meth, model, stage_entry(1, MULTITASK, stats, es), scores,
                     CostLog(train_s, s.base_eval_s + es, peak), "multitask")
    return model


def _run_merges(job: Job, mode: str) -> float:
    """Merge the per-stage task vectors saved by the stages and evaluate each merged model as the row
    `merged:<label>`. Returns the evaluation seconds."""
    s = job.s
    s.rec.drop_extra(job.name, job.seed)
    if not collectives.is_main():  # merging trains nothing: rank 0 does it alone and writes the rows
        return 0.0
    n = len(s.pl.task_names)
    # read tensor by tensor while merging: memory stays the model plus a few tensors, whatever n
    diffs = [checkpoint.open_state_diff(job.ckpt_dir / f"taskvec{t}.pt") for t in range(1, n + 1)]
    spent = 0.0
    base = s.base()  # sharded: read again, on rank 0 only
    for ms in job.spec.merge:
        t0 = time.perf_counter()
        model = merging.merged_model(base, diffs, ms, cumulative=(mode == "sequential"), seed=job.seed).to(s.device)
        scores, es = job.evaluate(model, ms.row_name, None, ms.row_name.replace(":", "_"), everywhere=False)
        del model
        spent += es
        job.add_row(ms.row_name, "", scores)
        s.console.print(f"{escape(job.tag())} {ms.row_name}: {_fmt_scores(scores)} (merge + eval {time.perf_counter() - t0:.1f}s)")
    return spent
