"""Checkpoints inside a stage (`checkpoint_steps: N`): a run killed in the middle of a long stage
resumes at the last multiple of N optimizer steps instead of the stage's beginning, with the
numbers of an uninterrupted run.

What one holds (written every N steps, replaced atomically, deleted once the stage is recorded):
- the step reached, the losses so far and the training seconds spent;
- the model's state (every tensor: the stage's own trainable set may be any of them), the
  optimizer's and the scheduler's state;
- the RNG states (the loop's dropout draws are keyed by step, these cover anything else).
The data position is not stored: the stage's batches are an endless seeded shuffle
(`train.batch_stream` on the stage's generator), so the resumed stage re-creates it and skips the
batches of the steps already taken; the stage's `stage_start` runs again as in an uninterrupted
run (the same seeds, so the same masks and adapters).

Which methods: a method's state inside a stage (a mask chosen at the first step, accumulators
fed by every step, a generator drawn by its batch hook) is not in this file, so only methods
that declare none resume inside a stage (`Method.step_resume_refusal() -> None`); for any other
the setting is ignored with one line saying why (the stage restarts, as without it).

Several processes: under ddp rank 0 writes and every rank reads the same file (the ranks hold
the same model). Under fsdp the model and optimizer state go through torch.distributed.checkpoint
(each rank writes its shards into `stage<t>.steps.dcp`; rank 0 writes the rest beside them).

Written by hand: no library resumes clbench's own loop (accelerate's `save_state` /
`load_state` save the same objects but own the dataloader position through its sampler).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from clbench import checkpoint
from clbench.distributed import collectives


class StepCheckpoints:
    """The mid-stage checkpoint of one (method, seed, stage)."""

    def __init__(self, folder: Path, stage: int, every: int, sharded: bool = False):
        self.folder, self.stage, self.every, self.sharded = Path(folder), int(stage), int(every), sharded
        self.path = self.folder / f"stage{stage}.steps.pt"
        self.dcp = self.folder / f"stage{stage}.steps.dcp"

    def due(self, steps_done: int, total: int) -> bool:
        return steps_done % self.every == 0 and steps_done < total

    def save(self, model, opt, sched, steps_done: int, total: int, losses: list, seconds: float) -> None:
        meta = {"stage": self.stage, "step": steps_done, "total": total, "losses": list(losses), "seconds": seconds,
                "scheduler": sched.state_dict(), "rng": checkpoint.rng_state()}
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, opt)
            tmp = self.folder / f".clbench-tmp-stage{self.stage}.steps.dcp"
            if collectives.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            collectives.barrier()
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
            collectives.barrier()
            if collectives.is_main():
                checkpoint.save_atomic(tmp / "meta.pt", meta)
                shutil.rmtree(self.dcp, ignore_errors=True)
                tmp.rename(self.dcp)
            collectives.barrier()
            return
        if collectives.is_main():
            checkpoint.save_atomic(self.path, {**meta, "model": model.state_dict(), "optim": opt.state_dict()})

    def load(self, model, opt, sched, total: int) -> dict | None:
        """Restore model, optimizer, scheduler and RNG from this stage's checkpoint if there is one
        for a stage of `total` steps; returns its meta (step, losses, seconds) or None."""
        if self.sharded:
            if not (self.dcp / "meta.pt").is_file():
                return None
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            meta = checkpoint.load(self.dcp / "meta.pt")
            if meta["total"] != total:
                return None
            msd, osd = get_state_dict(model, opt)
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(self.dcp))
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        else:
            if not self.path.is_file():
                return None
            meta = checkpoint.load(self.path)
            if meta["total"] != total:
                return None
            with torch.no_grad():
                model.load_state_dict(meta.pop("model"))
            opt.load_state_dict(meta.pop("optim"))
        sched.load_state_dict(meta["scheduler"])
        checkpoint.set_rng_state(meta["rng"])
        return meta

    def remove(self) -> None:
        if collectives.is_main():
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.dcp, ignore_errors=True)
