"""The checkpoint policy of one (method, seed) in sequential mode: when a stage checkpoint is
written, where a resumed run starts, and when checkpoints are deleted.

- Checkpoints are diffs against the post-setup state (rebuilt identically on resume), written by
  clbench.checkpoint in a background thread while the stage is evaluated; the results record a
  stage only after its checkpoint is complete.
- keep_checkpoints `last` (default): a checkpoint is written once `checkpoint_interval` seconds of
  training and evaluation have passed since the last one (a stage cheaper than its checkpoint
  does not pay for it; a crash redoes at most that much), never for the last stage (a complete
  method is never resumed), and the previous one is deleted once the results say the newer
  stage is done; all are deleted when the method completes. `all` keeps every stage's; `none`
  writes none.
- A resumed run starts from the latest checkpoint at or before the last recorded stage and redoes
  the stages after it, with the same results.
- A sharded model (distributed.strategy fsdp) is checkpointed as a folder `stage<t>.dcp` through
  torch.distributed.checkpoint instead (clbench.distributed.fsdp.save_checkpoint: every rank writes its shards,
  written in the foreground, readable at another number of ranks); the policy is the same, decided
  on rank 0 for all ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from clbench import checkpoint
from clbench.method import call_hook
from clbench.distributed import collectives
from clbench.distributed import fsdp


class _Written:
    """A checkpoint already written (the sharded save runs in the foreground): wait() gives its MB."""

    def __init__(self, mb: float):
        self.mb = mb

    def wait(self) -> float:
        return self.mb

    def cancel(self) -> None:
        pass


class StageCheckpoints:
    def __init__(self, job, model):
        self.job, self.cfg, self.dir = job, job.s.cfg, job.ckpt_dir
        self.sharded = fsdp.is_sharded(model)
        self.enabled = self.cfg.keep_checkpoints != "none"
        self.reference = (checkpoint.snapshot(model, share=job.s.base_model.state_dict())
                          if self.enabled and not self.sharded else None)  # sharded: no base kept (Session.base)
        self.since = 0.0  # training and evaluation seconds since the last checkpoint (or the method's start)
        self.last: int | None = None
        self._loaded: tuple[int, dict] | None = None  # (stage, checkpoint) read by resume_point for restore
        self.n = len(job.s.pl.task_names)

    def path(self, t: int) -> Path:
        return self.dir / (f"stage{t}.dcp" if self.sharded else f"stage{t}.pt")

    def _read(self, k: int) -> dict:
        if self.sharded:
            return fsdp.checkpoint_meta(self.path(k))
        return checkpoint.load(self.path(k))

    def _delete(self, t: int) -> None:
        p = self.path(t)
        if self.sharded:
            if collectives.is_main():
                shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def resume_point(self, done: int) -> int:
        """The latest readable stage checkpoint at or before the last recorded stage `done` (0:
        none). One that cannot be read (truncated, not a checkpoint) is said so and deleted, and
        an earlier one, or the start, is used instead: the stages after it are redone."""
        self._loaded = None
        if not done or not self.enabled:
            return 0
        for k in range(done, 0, -1):
            if not self.path(k).exists():
                continue
            try:
                ck = self._read(k)
                missing = {"train_seconds", "peak_mem_mb"} - set(ck) | ({"diff", "rng"} - set(ck) if not self.sharded else set())
                if missing:
                    raise KeyError(f"no {', '.join(sorted(missing))}")
            except Exception as e:  # torch.load's errors for a broken file are RuntimeError, EOFError, pickle's, ...
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.job.s.console.print(f"{self.job.tag()} stage checkpoint {self.path(k)} cannot be read "
                                         f"({type(e).__name__}: {why}); deleted it, resuming from an earlier stage",
                                         soft_wrap=True)
                collectives.barrier()  # every rank has read it before rank 0 deletes it
                self._delete(k)
                continue
            self._loaded, self.last = (k, ck), k
            return k
        self.last = None
        return 0

    def restore(self, k: int, model, meth, prev_stages: list) -> dict:
        """Weights, method state and RNG of stage k into the model; returns the checkpoint's costs
        (train_seconds, eval_seconds up to and including stage k, peak_mem_mb)."""
        ck = self._loaded[1] if self._loaded and self._loaded[0] == k else self._read(k)
        self._loaded = None
        if self.sharded:
            ck = {**ck, **fsdp.load_checkpoint(self.path(k), model, self.job.name)}
        else:
            checkpoint.apply_diff(model, self.reference, ck["diff"])
        if ck.get("method") is not None:
            call_hook(meth, "load_state_dict", ck["method"])
        checkpoint.set_rng_state(ck["rng"])
        # written while stage k was evaluated: its evaluation time is in the results
        ev = ck["eval_seconds"] if "eval_seconds" in ck else ck["eval_seconds_before"] + prev_stages[k - 1]["eval_seconds"]
        return {"train_seconds": ck["train_seconds"], "eval_seconds": ev, "peak_mem_mb": ck["peak_mem_mb"]}

    def start_save(self, t: int, model, meth, log, secs: float, peak: float):
        """Start writing stage t's checkpoint (or not, by the policy); `log` holds the costs before
        stage t, `secs`/`peak` stage t's training. Returns the pending save or None."""
        if not self.enabled or not (self.sharded or collectives.is_main()):
            return None
        if self.sharded:  # every rank takes part in the write: rank 0's clock decides for all
            secs = collectives.broadcast(secs)
        if self.cfg.keep_checkpoints == "last":
            if t == self.n and not self.job.spec.merge:
                return None  # the last stage completes the method: nothing will resume from its checkpoint
            expected_eval = log.stages[-1]["eval_seconds"] if log.stages else self.job.s.base_eval_s
            if self.since + secs + expected_eval < self.cfg.checkpoint_interval:
                return None  # cheaper to redo than to write
        extra = {"train_seconds": log.train_s + secs, "eval_seconds_before": log.eval_s, "peak_mem_mb": max(log.peak, peak),
                 "stage": t}
        if self.sharded:
            return _Written(fsdp.save_checkpoint(self.path(t), model, call_hook(meth, "state_dict"), extra))
        return checkpoint.save_in_background(self.path(t), model, self.reference, call_hook(meth, "state_dict"), extra)

    def stage_done(self, t: int, seconds: float, pending) -> None:
        if self.sharded:
            seconds = collectives.broadcast(seconds)
        self.since = 0.0 if pending is not None else self.since + seconds

    def stage_recorded(self, t: int, pending) -> None:
        """The results now say stage t is done: the previous checkpoint may go."""
        if pending is None:
            return
        if self.cfg.keep_checkpoints == "last" and self.last is not None:
            self._delete(self.last)
        self.last = t

    def method_complete(self) -> None:
        """A complete method is never resumed: with keep last its stage checkpoints go."""
        if self.enabled and self.cfg.keep_checkpoints == "last" and collectives.is_main():
            for t in range(1, self.n + 1):
                self._delete(t)
