"""clbench.results.stats on hand-computed cases: the percentile computation on a fixed resample set, paired
intervals that must or must not contain 0, the example-level bootstrap from samples files, and the
"did not learn" check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clbench.results import stats
from clbench.results.rundirs import group_runs, load_run
from test_report import write_run


def test_percentile_interval_on_a_fixed_resample_set():
    # 1..100: the 2.5% quantile (type 7) sits at 99 * 0.025 = 2.475 -> 3 + 0.475; the 97.5% one at
    # 99 * 0.975 = 96.525 -> 97 + 0.525
    lo, hi = stats.percentile_interval(np.arange(1, 101))
    assert (lo, hi) == pytest.approx((3.475, 97.525))
    # the order of the resamples does not matter, NaN resamples are dropped
    assert stats.percentile_interval(list(range(100, 0, -1)) + [math.nan]) == pytest.approx((3.475, 97.525))
    assert stats.percentile_interval([0.5] * 7) == (0.5, 0.5)


def test_resample_indices_are_seeded_and_in_range():
    a = stats.resample_indices(5, 200, np.random.default_rng(3))
    b = stats.resample_indices(5, 200, np.random.default_rng(3))
    assert a.shape == (200, 5) and (a == b).all() and a.min() == 0 and a.max() == 4


def test_paired_interval_over_seeds_must_and_must_not_contain_zero():
    # every paired difference positive: every resampled mean lies in [0.1, 0.3], so the CI excludes 0
    r = stats.mean_interval([0.1, 0.2, 0.3])
    assert r["diff"] == pytest.approx(0.2) and r["n"] == 3
    assert 0.1 <= r["lo"] < r["hi"] <= 0.3 and stats.excludes_zero(r["lo"], r["hi"])
    # {-0.1, 0.1, 0.2}: a resampled mean <= 0 has probability 7/27 (all -0.1: 1 way; two -0.1 and one 0.1
    # or 0.2: 3 + 3 ways, of 27), far above 2.5%, so the CI's lower end is below 0 and it holds 0
    r = stats.mean_interval([-0.1, 0.1, 0.2])
    assert r["lo"] < 0 < r["hi"] and not stats.excludes_zero(r["lo"], r["hi"])
    # a difference that is 0 up to float noise: 0.3 - (0.1 + 0.2) = -5.6e-17. The resample made of
    # it alone (probability 1/27, above 2.5%) sets the upper end; the CI touches 0, it does not exclude it
    noise = 0.3 - (0.1 + 0.2)
    assert -1e-15 < noise < 0
    r = stats.mean_interval([-0.05, -0.025, noise])
    assert r["lo"] < 0 and abs(r["hi"]) < 1e-15 and not stats.excludes_zero(r["lo"], r["hi"])
    # one sample: no interval
    r = stats.mean_interval([0.4])
    assert r["diff"] == 0.4 and math.isnan(r["lo"]) and r["over"] == "none"
    assert not stats.excludes_zero(r["lo"], r["hi"])


BASE = [[0.2, 0.3, 0.1]]


def _group(*dirs):
    return group_runs([load_run(d) for d in dirs])[0]


def test_paired_differences_over_seeds_and_reference_by_setting_suffix(tmp_path):
    # ACC of 'good' minus ref: seed 0: (0.9+0.9+0.9)/3 - (0.5+0.5+0.5)/3 = 0.4, likewise 0.3 and 0.5;
    # 'same' equals ref at every seed: difference 0 in every resample
    ref = {s: BASE + [[0.6, 0.3, 0.1], [0.5, 0.6, 0.1], [0.5, 0.5, 0.5 + d]] for s, d in ((0, 0.0), (1, 0.0), (2, 0.0))}
    good = {0: BASE + [[0.9, 0.3, 0.1], [0.9, 0.9, 0.1], [0.9, 0.9, 0.9]],
            1: BASE + [[0.8, 0.3, 0.1], [0.8, 0.8, 0.1], [0.8, 0.8, 0.8]],
            2: BASE + [[1.0, 0.3, 0.1], [1.0, 1.0, 0.1], [1.0, 1.0, 1.0]]}
    d = write_run(tmp_path / "r", {"full_ft@lr=1e-05": ref, "good": good, "same": ref})
    rows = {(r["method"], r["metric"]): r for r in stats.paired_differences(_group(d), "full_ft")}
    acc = rows[("good", "acc")]
    assert acc["reference"] == "full_ft@lr=1e-05" and acc["n"] == 3 and acc["over"] == "runs"
    assert acc["diff"] == pytest.approx(0.4) and 0.3 <= acc["lo"] and acc["hi"] <= 0.5 and acc["significant"]
    same = rows[("same", "bwt")]
    assert same["diff"] == 0 and (same["lo"], same["hi"]) == (0, 0) and not same["significant"]
    assert stats.paired_differences(_group(d), "lora") == []  # no such reference: no comparison


def _write_samples(folder: Path, task: str, correct: list[int]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "acc": float(c), "target": 0}) + "\n" for i, c in enumerate(correct)))


def _one_seed_run_with_samples(tmp_path, per_cell):
    """A one-seed run with two tasks a, b; per_cell: {method: {(stage, task): [0/1 per example]}}; the base
    model's stage-0 records are per_cell['base']. R is the mean of the records (as lm-eval's acc)."""
    tasks = ("a", "b")
    base = [per_cell["base"][(0, t)] for t in tasks]
    mats = {}
    for m, cells in per_cell.items():
        if m == "base":
            continue
        R = [[float(np.mean(v)) for v in base]] + [[float(np.mean(cells[(s, t)])) for t in tasks] for s in (1, 2)]
        mats[m] = {0: R}
        for (s, t), v in cells.items():
            _write_samples(tmp_path / "r" / "samples" / m / "seed0" / f"stage{s}", t, v)
    for t, v in zip(tasks, base):
        _write_samples(tmp_path / "r" / "samples" / "base" / "stage0", t, v)
    return write_run(tmp_path / "r", mats, tasks=tasks)


def test_one_seed_bootstraps_over_test_examples_and_checks_learning(tmp_path):
    n = 40
    zeros, ones = [0] * n, [1] * n
    half = [1, 0] * (n // 2)
    # learner: perfect on each task after training it (gain 1.0 over the base's 0.5 on every example pair
    # that is 0 in the base); stuck: the base model's answers at every stage (gain exactly 0)
    d = _one_seed_run_with_samples(tmp_path, {
        "base": {(0, "a"): half, (0, "b"): half},
        "full_ft": {(1, "a"): ones, (1, "b"): half, (2, "a"): ones, (2, "b"): ones},
        "stuck": {(1, "a"): half, (1, "b"): half, (2, "a"): half, (2, "b"): half},
    })
    g = _group(d)
    rows = {(r["method"], r["metric"]): r for r in stats.paired_differences(g, "full_ft")}
    la = rows[("stuck", "la")]
    # LA: stuck 0.5, full_ft 1.0 -> -0.5; each resample: stuck's diagonal = mean of the resampled base
    # answers (between 0 and 1), full_ft's = 1, so the difference is <= 0 and a CI that excludes 0
    assert la["over"] == "examples" and la["diff"] == pytest.approx(-0.5)
    assert la["hi"] < 0 and la["significant"]
    check = stats.learning_check(g)
    assert check["stuck"]["not_learned"] == ["a", "b"] and check["stuck"]["over"] == "examples"
    assert check["full_ft"]["not_learned"] == [] and stats.flag_text(check["full_ft"]) == ""
    assert stats.flag_text(check["stuck"]) == "did not learn 2/2 tasks"


def test_learning_margin_without_ci_and_seed_interval(tmp_path):
    # one seed, no samples files: learned iff R[i, i] - R[0, i] > 0.05; gains 0.05 (not above), 0.06, 0.5
    one = write_run(tmp_path / "one", {"m": {0: BASE + [[0.25, 0.3, 0.1], [0.25, 0.36, 0.1], [0.2, 0.3, 0.6]]}})
    c = stats.learning_check(_group(one))["m"]
    assert c["over"] == "margin" and c["not_learned"] == ["a"]
    assert c["gains"]["a"] == pytest.approx(0.05) and c["gains"]["b"] == pytest.approx(0.06)
    assert stats.not_learned_by_margin([[0.2, 0.3], [0.25, 0.3], [0.2, 0.36]]) == [0]
    # three seeds: task a's gains 0.1, -0.05, 0.2 (CI holds 0: not learned), b's 0.1, 0.2, 0.15 (learned)
    three = write_run(tmp_path / "three", {"m": {
        0: BASE + [[0.3, 0.3, 0.1], [0.3, 0.4, 0.1], [0.3, 0.4, 0.6]],
        1: BASE + [[0.15, 0.3, 0.1], [0.15, 0.5, 0.1], [0.15, 0.5, 0.6]],
        2: BASE + [[0.4, 0.3, 0.1], [0.4, 0.45, 0.1], [0.4, 0.45, 0.6]]}})
    c = stats.learning_check(_group(three))["m"]
    assert c["over"] == "runs" and c["not_learned"] == ["a"]


def test_method_intervals_over_test_examples_and_over_seeds(tmp_path):
    n = 40
    ones, half = [1] * n, [1, 0] * (n // 2)
    # forgets: learns a (0.5 -> 1.0) and then loses half of it (a at stage 2: 1,0,1,0... = 0.5): BWT = 0.5 - 1.0
    # on every resample of a's examples whose stage-1 score is 1 (all of them): the CI is a point; keeps:
    # the same stage 1, a kept at 1.0: BWT 0 exactly
    d = _one_seed_run_with_samples(tmp_path, {
        "base": {(0, "a"): half, (0, "b"): half},
        "forgets": {(1, "a"): ones, (1, "b"): half, (2, "a"): half, (2, "b"): ones},
        "keeps": {(1, "a"): ones, (1, "b"): half, (2, "a"): ones, (2, "b"): ones},
    })
    rows = {(r["method"], r["metric"]): r for r in stats.method_intervals(_group(d))}
    bwt = rows[("forgets", "bwt")]
    assert bwt["over"] == "examples" and bwt["diff"] == pytest.approx(-0.5)
    # a resample of a's stage-2 answers (1,0,1,0...) has a mean strictly inside (0, 1) almost surely: the CI
    # spreads around -0.5 and lies below 0
    assert bwt["lo"] < -0.5 < bwt["hi"] < 0 and bwt["significant"]
    keeps = rows[("keeps", "bwt")]
    assert keeps["diff"] == 0 and (keeps["lo"], keeps["hi"]) == (0, 0) and not keeps["significant"]
    # several seeds: the interval is over the seeds' values (as paired_differences over runs)
    many = write_run(tmp_path / "many", {"m": {s: BASE + [[0.6, 0.3, 0.1], [0.6 - d, 0.6, 0.1], [0.6 - d, 0.6, 0.6]]
                                              for s, d in ((0, 0.1), (1, 0.2), (2, 0.3))}})
    r = {(x["method"], x["metric"]): x for x in stats.method_intervals(_group(many))}[("m", "bwt")]
    # BWT per seed: ((0.6-d-0.6) + (0.6-0.6)) / 2 = -d/2: -0.05, -0.10, -0.15, mean -0.10
    assert r["over"] == "runs" and r["n"] == 3 and r["diff"] == pytest.approx(-0.10)
    # (1e-12: 0.6 - 0.1 - 0.6 is -0.0999...9 in floating point, so the bounds may pass the seeds' values by rounding)
    assert -0.15 - 1e-12 <= r["lo"] < -0.10 < r["hi"] <= -0.05 + 1e-12


def test_example_bootstrap_keeps_each_cells_own_examples_under_offdiag_limit(tmp_path):
    """eval.offdiag_limit: off-diagonal cells score the first N test examples, the diagonal all of
    them. Task a: its diagonal (stage 1) scores 40 examples, 1 on the first 10 and 0 on the other 30
    (0.25); stage 2, off the diagonal, scores only the first 10, all 1 (1.0): BWT = 1.0 - 0.25 = 0.75.
    Resampling only the 10 examples every cell shares would give the diagonal 1.0 on every resample:
    a BWT interval of exactly (0, 0), which does not even hold the point estimate."""
    n, first = 40, 10
    d = _one_seed_run_with_samples(tmp_path, {
        "base": {(0, "a"): [0] * n, (0, "b"): [0] * n},
        "m": {(1, "a"): [1] * first + [0] * (n - first), (1, "b"): [0] * first,
              (2, "a"): [1] * first, (2, "b"): [1] * n},
    })
    bwt = {(r["method"], r["metric"]): r for r in stats.method_intervals(_group(d))}[("m", "bwt")]
    assert bwt["over"] == "examples" and bwt["diff"] == pytest.approx(0.75)
    # each resample: 1.0 (the 10 off-diagonal answers, all 1) minus the resampled diagonal's share of
    # ones, which varies around 0.25 (a binomial over 40 draws): the CI holds 0.75 and has width
    assert bwt["lo"] < 0.75 < bwt["hi"] and bwt["significant"]
