"""Data-parallel evaluation: the documents of every task split over the ranks through lm-eval's own
rank/world-size support, gathered back to rank 0 in one process's order, scores and samples those
of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO
from clbench.run.evaluate import one_process_order


def test_one_process_order_interleaves_values_and_sorts_samples():
    # 5 documents over 2 ranks: rank 0 scored documents 0, 2, 4 and rank 1 documents 1, 3 (lm-eval's islice)
    r0 = {"t": {("acc", "none"): [0.0, 2.0, 4.0], ("bpb", "none"): [10.0, 12.0, 14.0]}}
    r1 = {"t": {("acc", "none"): [1.0, 3.0], ("bpb", "none"): [11.0, 13.0]}}
    first, second = one_process_order([r0, r1])
    assert first["t"][("acc", "none")] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert first["t"][("bpb", "none")] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert second == {"t": {("acc", "none"): [], ("bpb", "none"): []}}  # lm-eval chains the ranks: nothing added
    # samples: one process logs them filter by filter, each in document order
    s0 = {"t": [{"doc_id": d, "filter": f} for f in ("strip", "none") for d in (0, 2, 4)]}
    s1 = {"t": [{"doc_id": d, "filter": f} for f in ("strip", "none") for d in (1, 3)]}
    first, second = one_process_order([s0, s1])
    assert [(x["filter"], x["doc_id"]) for x in first["t"]] == [("strip", d) for d in range(5)] + [("none", d) for d in range(5)]
    assert second == {"t": []}
    # rank 1 had one request fewer: lm-eval ran its last request (document 3) again and appended the
    # response to it; the record keeps the one response one process gives
    s0 = {"t": [{"doc_id": d, "resps": [[f"a{d}"]]} for d in (0, 2, 4)]}
    s1 = {"t": [{"doc_id": 1, "resps": [["a1"]]}, {"doc_id": 3, "resps": [["a3", "a3"]]}]}
    first, _ = one_process_order([s0, s1])
    assert [x["resps"] for x in first["t"]] == [[[f"a{d}"]] for d in range(5)]


def test_two_ranks_split_the_documents_and_give_one_process_scores_and_samples(tmp_path):
    out = tmp_path / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "tests" / "distributed" / "parallel_eval_worker.py"), str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2
    # each rank scored its share of the 7 documents (lm-eval's split: 0, 2, 4, 6 and 1, 3, 5), no document twice
    for task in ("tiny_parity", "tiny_copy"):
        assert r["ranks"][0][task] == [0, 2, 4, 6] and r["ranks"][1][task] == [1, 3, 5]
    assert r["parallel"] == r["alone"]
    # the samples, record for record in one process's order: the generated strings identical; the
    # log-likelihoods to float32 rounding (1e-5 relative: a rank batches other requests together, and
    # the CPU's matrix products round a row differently in products of another shape; measured here:
    # 2e-7), the greedy flags identical
    for task in ("tiny_parity", "tiny_copy"):
        par, alone = r["parallel_samples"][task], r["alone_samples"][task]
        assert [(x["doc_id"], x["filter"]) for x in par] == [(x["doc_id"], x["filter"]) for x in alone]
        assert [x["doc_id"] for x in par] == list(range(7))
        for a, b in zip(par, alone):
            if task == "tiny_copy":
                assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
            else:
                for (la, ga), (lb, gb) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
                    assert abs(la - lb) <= 1e-5 * abs(lb) and ga == gb
