"""Run by tests/distributed/test_parallel_eval.py under torchrun (2 CPU processes, gloo): every rank evaluates
the tiny model data-parallel (clbench.run.evaluate.evaluate(data_parallel=True)) on a multiple-choice
and a generation task with an odd number of test documents; rank 0 then evaluates alone, as one
process does, and writes both results and what each rank scored to the JSON file named by argv[1]."""

import json
import sys
from pathlib import Path

import torch

from clbench.data import tasks as taskcat
from clbench.distributed import collectives
from clbench.run import models
from clbench.run.evaluate import evaluate
from clbench.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]


def main(out: str) -> None:
    torch.set_num_threads(1)
    collectives.init_group(torch.device("cpu"))
    model, tok, _ = models.resolve("tiny")
    defs = taskcat.load_tasks([REPO / "configs" / "tiny_tasks"])
    names = ["tiny_parity", "tiny_copy"]
    lm_tasks = taskcat.build_lm_eval_tasks([defs[n] for n in names], None)
    primary = {n: defs[n].primary_metric for n in names}
    rt, kw = Runtime(torch.device("cpu")), dict(batch_size=4, limit=7, log_samples=True)
    scores, samples, _ = evaluate(model, tok, lm_tasks, primary, rt, data_parallel=True, **kw)
    mine = {n: sorted({i.doc_id for i in lm_tasks[n].instances}) for n in names}  # what this rank scored
    ranks = collectives.gather(mine)
    if collectives.is_main():
        alone, alone_samples, _ = evaluate(model, tok, lm_tasks, primary, rt, data_parallel=False, **kw)
        Path(out).write_text(json.dumps({
            "world": collectives.world_size(), "ranks": ranks, "parallel": scores, "alone": alone,
            "parallel_samples": {n: [{k: s[k] for k in ("doc_id", "filter", "resps", "filtered_resps")} for s in v]
                                 for n, v in samples.items()},
            "alone_samples": {n: [{k: s[k] for k in ("doc_id", "filter", "resps", "filtered_resps")} for s in v]
                              for n, v in alone_samples.items()},
        }, default=str))
    collectives.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
