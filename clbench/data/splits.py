"""Seeded splits of a task's documents: test first, then train, then a validation set carved from
what is left (clbench.data.validation). Used by registry builds (clbench.data.prepare) and local releases
(clbench.data.presets) alike. Written by hand: the class-balanced and stratified quotas with a test set
that depends only on the seed, the documents and its size are clbench's own contract.
"""

from __future__ import annotations

from random import Random
from typing import Any

from clbench.errors import DataError

MAX_MOVED = 0.2  # the share of the train split a validation split may take when too few documents are left



def _even_quotas(avail: dict[Any, int], n: int) -> dict[Any, int]:
    """Split n as evenly as possible over classes, none above what it has (water filling).
    Leftover single slots go to classes in sorted order (deterministic)."""
    quota = {k: 0 for k in avail}
    left = n
    while left > 0:
        open_ = [k for k in sorted(avail) if quota[k] < avail[k]]
        if not open_:
            break
        share = left // len(open_)
        if share == 0:
            for k in open_[:left]:
                quota[k] += 1
            break
        for k in open_:
            add = min(share, avail[k] - quota[k])
            quota[k] += add
            left -= add
    return quota


def _proportional_quotas(avail: dict[Any, int], n: int) -> dict[Any, int]:
    """Split n in proportion to class sizes (largest remainder)."""
    total = sum(avail.values())
    n = min(n, total)
    if total == 0:
        return {k: 0 for k in avail}
    exact = {k: n * v / total for k, v in avail.items()}
    quota = {k: int(x) for k, x in exact.items()}
    for k in sorted(avail, key=lambda k: (-(exact[k] - quota[k]), str(k)))[: n - sum(quota.values())]:
        quota[k] += 1
    return quota


def split_documents(docs: list[dict], n_train: int, n_test: int, rng: Random,
                    sampling: str = "random") -> tuple[list[dict], list[dict]]:
    """Seeded train/test split, disjoint by construction.

    The test set is drawn first, so it depends only on the seed, the documents and n_test
    (changing the train size never changes the test set). 'balanced' gives every label
    an equal share where it has enough documents (the rest is filled from the others),
    'stratified' keeps the label proportions, 'random' ignores labels."""
    if sampling == "random":
        order = list(docs)
        rng.shuffle(order)
        test = order[:n_test]
        train = order[n_test:n_test + n_train]
        return train, test
    groups: dict[int, list[dict]] = {}
    for d in docs:
        groups.setdefault(d["label"], []).append(d)
    for k in sorted(groups):
        rng.shuffle(groups[k])
    quotas = _even_quotas if sampling == "balanced" else _proportional_quotas
    q_test = quotas({k: len(v) for k, v in groups.items()}, n_test)
    rest = {k: v[q_test[k]:] for k, v in groups.items()}
    q_train = quotas({k: len(v) for k, v in rest.items()}, n_train)
    test = [d for k in sorted(groups) for d in groups[k][: q_test[k]]]
    train = [d for k in sorted(rest) for d in rest[k][: q_train[k]]]
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


def carve_validation(docs: list[dict], train: list[dict], test: list[dict], n_val: int, rng: Random,
                     sampling: str = "random") -> tuple[list[dict], list[dict], str]:
    """(train, validation, how): a seeded validation set disjoint from train and test, drawn like the
    test set (`sampling`) from the documents in neither; when fewer than n_val are left, all of those
    plus the shortfall moved out of the train set, at most MAX_MOVED of it (so the validation split
    may be smaller than asked). `how` says which, for the manifest. Train and test are unchanged
    when enough documents are left."""
    used = {id(d) for d in train} | {id(d) for d in test}
    rest = [d for d in docs if id(d) not in used]
    if len(rest) >= n_val:
        _, val = split_documents(rest, 0, n_val, rng, sampling)
        return train, val, f"carved: {n_val} of the {len(rest)} documents in neither train nor test"
    short = min(n_val - len(rest), int(MAX_MOVED * len(train)))
    # out of the train set in proportion to its classes, so no small class is emptied
    _, moved = split_documents(train, 0, short, rng, "random" if sampling == "random" else "stratified")
    gone = {id(d) for d in moved}
    return [d for d in train if id(d) not in gone], rest + moved, (
        f"carved: all {len(rest)} documents in neither train nor test, and {short} moved out of the train set "
        f"(in proportion to its classes; too few documents left; at most {MAX_MOVED:.0%} of train)")


def validation_count(spec: dict) -> int:
    """clbench.data.validation: the validation size (default: the test size; 0 = none)."""
    v = spec.get("validation", spec.get("test", 0))
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DataError(f"clbench.data.validation must be a count >= 0, got {v!r}")
    return v
