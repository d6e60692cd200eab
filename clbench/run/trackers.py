"""Optional experiment trackers: TensorBoard and Weights & Biases.

Enabled from the run config (`trackers: [tensorboard, wandb]`); off by default. A tracker only
mirrors what the results files already hold (plus the per-step loss and learning rate), so
turning one on or off never changes results (`trackers` is one of the config's non-result
fields: a run directory may be resumed with a different choice).

    tracker = open_trackers(cfg, out_dir)      # a no-op tracker when none is configured
    tracker.log_step(method, seed, stage, step, loss, lr)     # every optimizer step
    tracker.log_stage(method, seed, stage, scores, task=...)  # after each stage's evaluation
    tracker.log_schedule(method, seed, stage, schedule)       # after each stage's training
    tracker.close()

TensorBoard: one event folder per (method, seed) under `<run dir>/tensorboard/<method>/seed<k>/`
(`tensorboard --logdir <run dir>/tensorboard`). Scalars: `train/loss` and `train/lr` over the
(method, seed)'s optimizer steps counted across stages, `train/stage` (the stage of that step),
`eval/<task>` and `eval/mean` over the stage index (0 = base model); a labelled row such as
`merged:ties` or `multitask` as `eval_merged-ties/<task>` at step 0; each stage's lr schedule as
`schedule/<setting>` scalars (peak_lr, steps, warmup_steps, decay_steps, lr_first, ...) at the
stage index and as a `schedule` text entry (wandb: the same `schedule/` keys).

Weights & Biases: one wandb run per (method, seed), project `clbench` (or $WANDB_PROJECT),
group = the run's name, files under `<run dir>/wandb/`. It honours WANDB_MODE (offline for a
machine without network; `wandb sync` uploads later). wandb is an optional extra:
`pip install 'clbench[wandb]'`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clbench.config import check_trackers

class Tracker:
    """The interface; this base class logs nothing."""

    def log_step(self, method: str, seed: int, stage: int, step: int, loss: float, lr: float) -> None:
        pass

    def log_stage(self, method: str, seed: int, stage: int, scores: dict, task: str | None = None) -> None:
        pass

    def log_schedule(self, method: str, seed: int, stage: int, schedule: dict) -> None:
        """A stage's lr schedule (clbench.schedule.describe, as results.json records it)."""
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _eval_prefix(stage) -> tuple[str, int]:
    """("eval", t) for stage t (0 = base model); a labelled row (`multitask`, `merged:ties`) gets
    its own tag prefix ("eval_merged-ties", 0)."""
    try:
        return "eval", int(stage)
    except (TypeError, ValueError):
        return "eval_" + "".join(c if c.isalnum() or c in "._-" else "-" for c in str(stage)), 0


def _numbers(schedule: dict) -> dict[str, float]:
    """The numeric settings of a schedule (its name goes to the text log)."""
    return {k: float(v) for k, v in schedule.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _StepCounter:
    """Optimizer steps of one (method, seed) counted across stages, in this process."""

    def __init__(self):
        self.next: dict[tuple, int] = {}

    def __call__(self, key) -> int:
        n = self.next.get(key, 0)
        self.next[key] = n + 1
        return n


class TensorBoardTracker(Tracker):
    def __init__(self, out_dir: Path):
        self.root = Path(out_dir) / "tensorboard"
        self.writers: dict[tuple, object] = {}
        self.count = _StepCounter()

    def _writer(self, method, seed):
        key = (method, int(seed))
        if key not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[key] = SummaryWriter(log_dir=str(self.root / method / f"seed{seed}"))
        return self.writers[key]

    def log_step(self, method, seed, stage, step, loss, lr):
        w = self._writer(method, seed)
        g = self.count((method, int(seed)))
        w.add_scalar("train/loss", float(loss), g)
        w.add_scalar("train/lr", float(lr), g)
        w.add_scalar("train/stage", float(stage), g)

    def log_stage(self, method, seed, stage, scores, task=None):
        w = self._writer(method, seed)
        prefix, step = _eval_prefix(stage)
        for name, v in scores.items():
            w.add_scalar(f"{prefix}/{name}", float(v), step)
        if scores:
            w.add_scalar(f"{prefix}/mean", sum(map(float, scores.values())) / len(scores), step)
        w.flush()

    def log_schedule(self, method, seed, stage, schedule):
        w = self._writer(method, seed)
        for k, v in _numbers(schedule).items():
            w.add_scalar(f"schedule/{k}", v, int(stage))
        w.add_text("schedule", json.dumps(schedule, sort_keys=True), int(stage))

    def close(self):
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class WandbTracker(Tracker):
    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.dir = cfg, Path(out_dir)
        self.runs: dict[tuple, object] = {}
        self.count = _StepCounter()

    def _run(self, method, seed):
        key = (method, int(seed))
        if key not in self.runs:
            import wandb

            self.dir.mkdir(parents=True, exist_ok=True)
            self.runs[key] = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "clbench"), group=self.cfg.name, name=f"{self.cfg.name}/{method}/seed{seed}",
                dir=str(self.dir), config={**self.cfg.model_dump(mode="json"), "method": method, "seed": seed},
                reinit="create_new")
        return self.runs[key]

    def log_step(self, method, seed, stage, step, loss, lr):
        self._run(method, seed).log({"train/loss": float(loss), "train/lr": float(lr), "train/stage": stage},
                                    step=self.count((method, int(seed))))

    def log_stage(self, method, seed, stage, scores, task=None):
        prefix, step = _eval_prefix(stage)
        data = {f"{prefix}/{k}": float(v) for k, v in scores.items()}
        if prefix == "eval":
            data["eval/stage"] = step
        if scores:
            data[f"{prefix}/mean"] = sum(map(float, scores.values())) / len(scores)
        # at the step the next training step will use: wandb drops a step lower than one already logged
        self._run(method, seed).log(data, step=self.count.next.get((method, int(seed)), 0))

    def log_schedule(self, method, seed, stage, schedule):
        data = {f"schedule/{k}": v for k, v in _numbers(schedule).items()}
        self._run(method, seed).log({**data, "schedule/stage": int(stage)}, step=self.count.next.get((method, int(seed)), 0))

    def close(self):
        for r in self.runs.values():
            r.finish()
        self.runs.clear()


class MultiTracker(Tracker):
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_step(self, *a, **kw):
        for t in self.trackers:
            t.log_step(*a, **kw)

    def log_stage(self, *a, **kw):
        for t in self.trackers:
            t.log_stage(*a, **kw)

    def log_schedule(self, *a, **kw):
        for t in self.trackers:
            t.log_schedule(*a, **kw)

    def close(self):
        for t in self.trackers:
            t.close()


def open_trackers(cfg, out_dir) -> Tracker:
    """The trackers `cfg.trackers` names, behind one Tracker (a no-op one when the list is empty)."""
    names = check_trackers(getattr(cfg, "trackers", None) or [])
    out: list[Tracker] = []
    for name in names:
        out.append(TensorBoardTracker(out_dir) if name == "tensorboard" else WandbTracker(cfg, out_dir))
    return out[0] if len(out) == 1 else MultiTracker(out)
