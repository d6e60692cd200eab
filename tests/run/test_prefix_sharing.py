"""clbench's prefix-sharing log-likelihood scoring (clbench/run/evaluate.py: each context run once,
its continuations packed behind it) against lm-eval's own HFLM path
(CLBENCH_EVAL_PREFIX_SHARING=0), on the tiny model and on the real 135M model: every request's
log-likelihood within the tolerance below, the same greedy flags, the same argmax choice for
every document, the same accuracy.

Tolerance (float32, CPU): |a - b| <= 1e-4 + 1e-5 |b| nats per request. The two paths do the
same arithmetic in a different order (one packed sequence with a 4-D mask and the LM head at
the scored rows only, against one padded sequence per choice), so they agree to rounding."""

import json

import pytest

from conftest import REPO
from harness import cpu_rt

TINY_TASKS = REPO / "configs" / "tiny_tasks"
ATOL, RTOL = 1e-4, 1e-5

# four multi-token choices of different lengths: several continuations packed behind one context
FOUR_WAY = """task: four_way
output_type: multiple_choice
doc_to_text: "Number: {{number}}\\nWhat should we do?\\nAnswer:"
doc_to_target: "{{label}}"
doc_to_choice: ["add to playlist", "book a restaurant table", "get weather", "play some quiet music tonight"]
metric_list: [{metric: acc}]
clbench: {data: {test: four_way.test.jsonl}}
"""


def _tasks(tmp_path, limit_rows):
    from clbench.data import tasks as taskcat

    d = tmp_path / "tasks"
    d.mkdir()
    (d / "four_way.yaml").write_text(FOUR_WAY)
    rows = (TINY_TASKS / "tiny_parity.test.jsonl").read_text().splitlines()[:limit_rows]
    (d / "four_way.test.jsonl").write_text("\n".join(rows) + "\n")
    defs = taskcat.load_tasks([TINY_TASKS, d])
    names = ["tiny_parity", "tiny_compare", "four_way"]
    return taskcat.build_lm_eval_tasks([defs[n] for n in names], tmp_path / "cache"), \
        {n: defs[n].primary_metric for n in names}


def _score(model, tok, lm_tasks, primary, sharing, limit, monkeypatch):
    """{task: {doc_id: [(loglikelihood, is_greedy) per choice]}}, {task: acc}, packed batches run."""
    from clbench.run import evaluate as E

    monkeypatch.setenv("CLBENCH_EVAL_PREFIX_SHARING", "1" if sharing else "0")
    cls = E.lm_class()
    real, calls = cls._score_packed, []
    monkeypatch.setattr(cls, "_score_packed", lambda self, batch, *a: calls.append(len(batch)) or real(self, batch, *a))
    scores, samples, _ = E.evaluate(model, tok, lm_tasks, primary, cpu_rt(tok),
                                    batch_size=8, limit=limit, log_samples=True)
    monkeypatch.setattr(cls, "_score_packed", real)
    per_doc = {t: {s["doc_id"]: [tuple(r[0]) for r in s["resps"]] for s in recs} for t, recs in samples.items()}
    return per_doc, scores, calls


def _compare(model, tok, lm_tasks, primary, limit, monkeypatch):
    shared, acc_shared, packed = _score(model, tok, lm_tasks, primary, True, limit, monkeypatch)
    plain, acc_plain, unpacked = _score(model, tok, lm_tasks, primary, False, limit, monkeypatch)
    assert packed and not unpacked  # the packed path really ran, and only when enabled
    worst = 0.0
    for task in plain:
        assert shared[task].keys() == plain[task].keys() and len(plain[task]) == limit
        for doc, choices in plain[task].items():
            mine = shared[task][doc]
            assert len(mine) == len(choices)
            for (a, ga), (b, gb) in zip(mine, choices):
                assert abs(a - b) <= ATOL + RTOL * abs(b), (task, doc, a, b)
                assert ga == gb, (task, doc)
                worst = max(worst, abs(a - b))
            argmax = max(range(len(choices)), key=lambda i: choices[i][0])
            assert max(range(len(mine)), key=lambda i: mine[i][0]) == argmax, (task, doc)
    assert acc_shared == acc_plain
    print(f"\nprefix sharing vs lm-eval: largest |difference| {worst:.2e} nats; accuracy {json.dumps(acc_plain)}")
    return worst


def test_prefix_sharing_matches_lm_eval_on_the_tiny_model(tmp_path, monkeypatch, one_thread):
    from clbench.run import models

    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(0, len(tok))
    lm_tasks, primary = _tasks(tmp_path, 40)
    _compare(model, tok, lm_tasks, primary, 40, monkeypatch)


@pytest.mark.slow
def test_prefix_sharing_matches_lm_eval_on_the_real_model(tmp_path, monkeypatch):
    from clbench.run import models

    try:
        models._find_smollm2_gguf()
    except models.ModelError as e:
        pytest.skip(str(e))  # only where the wheel is missing; `make test` installs it
    model, tok, _ = models.resolve("smollm2-135m-instruct")
    lm_tasks, primary = _tasks(tmp_path, 12)
    _compare(model, tok, lm_tasks, primary, 12, monkeypatch)
