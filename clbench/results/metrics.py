"""Continual-learning metrics: pure functions of the accuracy matrix R.

R is a (T+1) x T array: R[t, i] is the score on task i (0-based column i is the
paper's task i+1) after training through stage t; row 0 is the base model before
any training. Every score is "higher is better". Each docstring names its source (GEM,
Chaudhry et al. 2018, Riemer et al. 2019, TRACE) and its sign convention.
Indices in the docstrings are 1-based like the papers: R[t, i] with t = 0..T, i = 1..T.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _as_matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1 or R.shape[1] < 1:
        raise ValueError(f"R must be (T+1) x T with a base row 0, got shape {R.shape}")
    return R


def acc(R) -> float:
    """ACC, final average accuracy (GEM, Lopez-Paz & Ranzato 2017): (1/T) sum_i R[T, i]."""
    R = _as_matrix(R)
    return float(R[-1].mean())


def a_k(R, k: int) -> float:
    """A_k, average accuracy over the tasks seen after stage k (Chaudhry et al. 2018;
    TRACE's OP): (1/k) sum_{i<=k} R[k, i], for k = 1..T."""
    R = _as_matrix(R)
    T = R.shape[1]
    if not 1 <= k <= T:
        raise ValueError(f"k must be in 1..{T}, got {k}")
    return float(R[k, :k].mean())


def avg_incremental_acc(R) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017): (1/T) sum_{k=1..T} A_k."""
    R = _as_matrix(R)
    T = R.shape[1]
    return float(np.mean([a_k(R, k) for k in range(1, T + 1)]))


def bwt(R) -> float:
    """Backward transfer (GEM): 1/(T-1) sum_{i<T} (R[T, i] - R[i, i]).

    Negative = forgetting. NaN when T == 1 (undefined).
    """
    R = _as_matrix(R)
    T = R.shape[1]
    if T < 2:
        return math.nan
    return float(np.mean([R[T, i - 1] - R[i, i - 1] for i in range(1, T)]))


def fwt(R) -> float:
    """Forward transfer (GEM), with the base model (row 0) as the baseline, as LLM work
    does: 1/(T-1) sum_{i>=2} (R[i-1, i] - R[0, i]).

    Positive = training on earlier tasks helped a task before it was trained.
    NaN when T == 1.
    """
    R = _as_matrix(R)
    T = R.shape[1]
    if T < 2:
        return math.nan
    return float(np.mean([R[i - 1, i - 1] - R[0, i - 1] for i in range(2, T + 1)]))


def forgetting_per_task(R) -> list[float]:
    """Max-based forgetting of each task i < T (Chaudhry et al. 2018):
    f_i = max_{l in 1..T-1} R[l, i] - R[T, i]. Positive = forgetting.

    Note the max runs over all stages 1..T-1, including stages before task i was
    trained, exactly as the formula states.
    """
    R = _as_matrix(R)
    T = R.shape[1]
    return [float(R[1:T, i - 1].max() - R[T, i - 1]) for i in range(1, T)]


def forgetting(R) -> float:
    """Average max-based forgetting F = mean_{i<T} f_i (Chaudhry et al. 2018).
    Positive = forgetting. NaN when T == 1. Avalanche's "forgetting" (R[i,i] - R[T,i])
    is -BWT per task and is not this function."""
    f = forgetting_per_task(R)
    return float(np.mean(f)) if f else math.nan


def learning_accuracy(R) -> float:
    """Learning accuracy / plasticity (Riemer et al. 2019): LA = (1/T) sum_i R[i, i]."""
    R = _as_matrix(R)
    T = R.shape[1]
    return float(np.mean([R[i, i - 1] for i in range(1, T + 1)]))


def intransigence(R, joint: Sequence[float]) -> list[float]:
    """Intransigence (Chaudhry et al. 2018): I_k = a*_k - R[k, k], k = 1..T, where
    joint[k-1] = a*_k is the score on task k of a joint (multi-task) reference model.
    Positive = the continual learner learns task k worse than the joint reference."""
    R = _as_matrix(R)
    T = R.shape[1]
    if len(joint) != T:
        raise ValueError(f"joint reference needs {T} scores, got {len(joint)}")
    return [float(joint[k - 1] - R[k, k - 1]) for k in range(1, T + 1)]


def general_ability_delta(G) -> list[float]:
    """General-ability delta per stage (TRACE): for a (T+1) x G matrix of held-out
    general-task scores, mean over tasks of (G[t] - G[0]) for t = 0..T. Negative = lost
    general ability."""
    G = np.asarray(G, dtype=float)
    if G.ndim != 2 or G.shape[0] < 1:
        raise ValueError(f"G must be (T+1) x n_tasks, got shape {G.shape}")
    return [float(x) for x in (G - G[0]).mean(axis=1)]


def summary(R) -> dict[str, float]:
    """All single-number metrics of one matrix, keyed as in summary.csv."""
    return {
        "acc": acc(R),
        "bwt": bwt(R),
        "fwt": fwt(R),
        "forgetting": forgetting(R),
        "la": learning_accuracy(R),
        "aia": avg_incremental_acc(R),
    }
