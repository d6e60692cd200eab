"""`clbench run` around the loop: the run directory taken and checked (clbench.results.rundir.RunDir: the
lock, the config and data checks, the derived files verified), the loop run, the final printout."""

from __future__ import annotations

import contextlib
from pathlib import Path

from clbench.distributed import collectives
from clbench.errors import ClbenchError, RunDirError
from clbench.files import remove_unfinished_writes
from clbench.results.resultcheck import check_data, data_fingerprint, verify_results
from clbench.results.rundir import RunDir
from clbench.run.loop import run
from clbench.run.planning import Plan
from clbench.runtime import select_device, wants_cpu



def execute(pl: Plan, out: Path, fresh: bool = False, allow_changes: bool = False, allow_data_change: bool = False):
    from rich.console import Console

    collectives.init(cpu=wants_cpu(pl.cfg))
    device, autocast = select_device(pl.cfg)
    console = Console(stderr=True, quiet=not collectives.is_main())
    rd = RunDir(out)
    # One process owns the run directory; with several (accelerate launch / torchrun) that is rank 0.
    with rd.lock() if collectives.is_main() else contextlib.nullcontext():
        changes = err = None
        if collectives.is_main():
            try:
                changes = rd.check_config(pl.cfg, fresh, allow_changes)
                for f in remove_unfinished_writes(out):
                    console.print(f"removed {f.relative_to(out)}: the temp file of a write that was interrupted", soft_wrap=True)
                res = rd.results()
                fp = data_fingerprint(pl)
                history, data_changed = check_data(out, res, fp, allow_data_change)
                for line in verify_results(out, pl, res):
                    console.print(line, soft_wrap=True)
                # every results.json this run writes carries the fingerprint (RunDir.write_results)
                rd.run_info = {"data_fingerprint": fp, "data_changes": history}
                if data_changed:
                    rd.record_data_change(fp, history)
                    console.print("data changed (--allow-data-change, recorded in results.json data_changes): "
                                  + "; ".join(data_changed), soft_wrap=True)
            except ClbenchError as e:
                if not collectives.enabled():
                    raise
                err = str(e)
        changes, err = collectives.broadcast((changes, err))
        if err:  # every rank stops, not only rank 0
            raise RunDirError(err)
        if collectives.is_main():
            if changes:
                rd.record_config_change(pl.cfg, changes)
                console.print(f"config changed ({len(changes)} difference(s), recorded in results.json config_changes): "
                              + "; ".join(changes[:5]), soft_wrap=True)
            rd.write_config(pl.cfg)
        rec = run(pl, rd, device, autocast, console)
    if collectives.is_main():
        print_results(rec, Console(width=max(120, Console().width)))
    collectives.finish()
    return rec


def print_results(rec, console) -> None:
    from rich.table import Table

    names = rec.plan.task_names
    for name, m in rec.methods.items():
        mode = m.get("mode", "sequential")
        for seed, s in m["seeds"].items():
            what = {"sequential": "accuracy matrix R[stage, task]", "single": "single-task reference (row t: task t alone)",
                    "multitask": "multitask reference (one joint model)"}[mode]
            t = Table(title=f"{name} (seed {seed}): {what}")
            t.add_column("stage")
            for task in names:
                t.add_column(task, justify="right")
            trained = ["base"] + (["multitask"] if mode == "multitask" else names)
            for i, row in enumerate(s["matrix"]):
                t.add_row(f"{i} {trained[i]}" if mode != "multitask" or i == 0 else "multitask", *[f"{v:.3f}" for v in row])
            for label, scores in (s.get("merged") or {}).items():
                t.add_row(label, *[f"{scores[task]:.3f}" for task in names])
            console.print(t)
    t = Table(title="summary")
    cols = ["method", "seed", "mode", "acc", "bwt", "fwt", "forgetting", "la", "intransigence", "did_not_learn",
            "trainable_params", "train_seconds", "eval_seconds", "peak_mem_mb"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rec.summary:
        t.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else ("–" if r.get(c) is None else str(r.get(c)))
                    for c in cols])
    console.print(t)
    console.print(f"results in {rec.out}")
