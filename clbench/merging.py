"""Model merging over state dicts: task arithmetic, TIES, LoTA's additive merge.

Pure functions: inputs are never modified; every result tensor is float32 (a floating-point
tensor is upcast before any arithmetic; a non-floating tensor, e.g. an integer buffer, is
copied from the base unchanged). A key missing from a task vector counts as a zero delta.

Tensor by tensor: every merge is computed one key at a time from a source of task vectors
(`_merged`), holding for that key a fixed number of float32 tensors (the running sums of TIES,
the current stage's task vector, ...), never all stages' task vectors at once. In a run
(`merged_model`) the source reads each stage's saved task vector file one tensor at a time, so
a merge needs the base model, the merged copy and a few tensors, whatever the number of stages
(TIES with scope "global" also holds one stage's |task vector| over the whole model, to find
its threshold). Measured by `python bench/run.py --only storage` (docs/performance.md).

  task_vectors(base, finetuned_list)   tau_t = theta_t - theta_0
  task_arithmetic(base, vectors, lam)  theta_0 + lam * sum_t tau_t
                                       (Ilharco et al. 2023, arXiv 2212.04089)
  ties(base, vectors, density, lam)    TIES-Merging (Yadav et al. 2023, arXiv 2306.01708):
                                       trim, elect sign, disjoint mean; theta_0 + lam * merged
  lota_additive(base, sparse_deltas)   theta_0 + sum_t delta_t for LoTA's sparse task vectors
                                       (Panda et al. 2024, arXiv 2406.16797)

TIES, step by step (per key; `scope` says over which entries trimming ranks magnitudes):
  1. Trim: in every task vector keep the k = round(density * n) entries of largest |tau|
     (n entries in the scope; at least 1); entries tied with the k-th largest magnitude are
     all kept (the official code keeps |tau| >= its threshold), everything else becomes 0.
  2. Elect sign: gamma = sign(sum_t trimmed_t) per entry. Where that sum is exactly 0 but
     some trimmed value is not, the official code (prateeky2806/ties-merging,
     resolve_zero_signs "majority") uses the sign of sum(gamma) over the scope; so do we.
  3. Disjoint mean: per entry, the mean of the trimmed values whose sign equals gamma, over
     the task vectors where such a value is nonzero (0 where none is).
  Result: theta_0 + lam * disjoint mean.
Choices no source fixes, or where this differs from the official code:
  - scope "tensor" (default, this suite's choice): the top-k is taken per tensor
    per task vector. The official code flattens the whole model's task vector into one
    vector and trims globally; scope="global" does that.
  - k: the official code thresholds at kthvalue(n - int(density * n)) of |tau|, which keeps
    int(density * n) + 1 entries when there are no ties; here exactly round(density * n)
    (plus ties). Negligible at model scale, visible on hand-made tensors.
  - lam default 1.0 (the paper tunes it on validation data).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t)


def task_vectors(base: StateDict, finetuned_list: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """tau_t = theta_t - theta_0 (float32) for every floating-point key of `base`."""
    out = []
    for i, ft in enumerate(finetuned_list):
        missing = [k for k, v in base.items() if _is_float(v) and k not in ft]
        if missing:
            raise KeyError(f"finetuned state {i} lacks keys of the base: {missing[:5]}")
        tv = {}
        for k, v in base.items():
            if not _is_float(v):
                continue
            if ft[k].shape != v.shape:
                raise ValueError(f"finetuned state {i}: {k} has shape {tuple(ft[k].shape)}, base {tuple(v.shape)}")
            tv[k] = _f32(ft[k]) - _f32(v)
        out.append(tv)
    return out


def _check_keys(base: StateDict, vectors) -> None:
    for i, tv in enumerate(vectors):
        extra = [k for k in tv if k not in base]
        if extra:
            raise KeyError(f"task vector {i} has keys the base lacks: {extra[:5]}")
        for k, d in tv.items():
            if tuple(d.shape) != tuple(base[k].shape):
                raise ValueError(f"task vector {i}: {k} has shape {tuple(d.shape)}, base {tuple(base[k].shape)}")


def _start(base: StateDict) -> dict[str, torch.Tensor]:
    return {k: (_f32(v).clone() if _is_float(v) else v.detach().clone()) for k, v in base.items()}


class _Vectors:
    """Task vectors as the merges read them: `keys` (the keys any vector has, base order) and
    `stages(k)`, the float32 tau_t[k] (None where vector t has no delta for k) for t = 1..T,
    produced one at a time."""

    def __init__(self, base: StateDict, vectors: Sequence[StateDict]):
        self.base, self.vectors, self.T = base, vectors, len(vectors)
        self.keys = [k for k in base if _is_float(base[k]) and any(k in tv for tv in vectors)]

    def stages(self, k):
        for t in range(self.T):
            yield self.stage(k, t)

    def stage(self, k, t: int):
        return _f32(self.vectors[t][k]) if k in self.vectors[t] else None


def task_arithmetic(base: StateDict, vectors: Sequence[StateDict], lam: float) -> dict[str, torch.Tensor]:
    """theta_0 + lam * sum_t tau_t."""
    _check_keys(base, vectors)
    return _collect(base, _task_arithmetic(base, _Vectors(base, vectors), lam))


def _collect(base: StateDict, merged) -> dict[str, torch.Tensor]:
    out = _start(base)
    for k, v in merged:
        out[k] = v
    return out


def _task_arithmetic(base: StateDict, src, lam: float):
    for k in src.keys:
        acc = None
        for d in src.stages(k):
            if d is not None:
                acc = d.clone() if acc is None else acc.add_(d)  # d may be the caller's own tensor
        if acc is not None:
            yield k, _f32(base[k]) + lam * acc


def _lota_additive(base: StateDict, src):
    """theta_0 + delta_1 + delta_2 + ..., added in stage order (as lota_additive)."""
    for k in src.keys:
        out = None
        for d in src.stages(k):
            if d is not None:
                out = (_f32(base[k]).clone() if out is None else out).add_(d.view(base[k].shape))
        if out is not None:
            yield k, out


def _trim(flat: torch.Tensor, density: float, tau: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the round(density * n) largest |values| of a 1-D tensor (ties kept), zero the rest;
    tau: a threshold found elsewhere (scope global) instead."""
    n = flat.numel()
    if n == 0:
        return flat.clone()
    mag = flat.abs()
    if tau is None:
        k = min(n, max(1, round(density * n)))
        tau = torch.topk(mag, k, sorted=False).values.min()
    return torch.where(mag >= tau, flat, torch.zeros_like(flat))


def _trimmed(src, k, density, taus):
    """tau_t[k] trimmed, flat, for t = 1..T (None where vector t has no delta for k)."""
    for t, d in enumerate(src.stages(k)):
        yield None if d is None else _trim(d.reshape(-1), density, None if taus is None else taus[t])


def _elected_sum(src, k, density, taus) -> torch.Tensor:
    total = torch.zeros(src.base[k].numel(), dtype=torch.float32, device=src.base[k].device)
    for tr in _trimmed(src, k, density, taus):
        if tr is not None:
            total.add_(tr)
    return total


def _disjoint_mean(src, k, density, taus, sign: torch.Tensor) -> torch.Tensor:
    selected = torch.zeros_like(sign, dtype=torch.float32)
    count = torch.zeros_like(sign, dtype=torch.float32)
    for tr in _trimmed(src, k, density, taus):
        if tr is not None:
            agree = torch.where(sign > 0, tr > 0, tr < 0)
            selected.add_(tr * agree)
            count.add_(agree)
    return selected / count.clamp(min=1)


def _global_thresholds(src, density) -> list[torch.Tensor]:
    """Per task vector, the round(density * n)-th largest |entry| over all keys (n entries: every
    key's, zeros where the vector has none): one vector's |values| in memory at a time."""
    n = sum(src.base[k].numel() for k in src.keys)
    k_keep = min(n, max(1, round(density * n)))
    taus = []
    for t in range(src.T):
        parts = []
        for k in src.keys:
            d = src.stage(k, t)
            parts.append(d.reshape(-1).abs() if d is not None else torch.zeros(src.base[k].numel(), device=src.base[k].device))
        flat = torch.cat(parts)
        del parts
        taus.append(torch.kthvalue(flat, n - k_keep + 1).values)
        del flat
    return taus


def _ties(base: StateDict, src, density: float, lam: float, scope: str):
    if not src.keys or not src.T:
        return
    taus = _global_thresholds(src, density) if scope == "global" else None
    if scope == "global":  # the zero-sum entries' sign: the majority of elected signs over the whole model
        majority = torch.sign(sum(torch.sign(_elected_sum(src, k, density, taus)).sum() for k in src.keys))
    for k in src.keys:
        sign = torch.sign(_elected_sum(src, k, density, taus))
        m = majority if scope == "global" else torch.sign(sign.sum())
        sign = torch.where(sign == 0, m, sign)
        yield k, _f32(base[k]) + lam * _disjoint_mean(src, k, density, taus, sign).view(base[k].shape)


def ties(base: StateDict, vectors: Sequence[StateDict], density: float, lam: float = 1.0,
         scope: Literal["tensor", "global"] = "tensor") -> dict[str, torch.Tensor]:
    """TIES-Merging: theta_0 + lam * disjoint_mean(elect_sign(trim(tau_t, density)))."""
    _check_ties(density, scope)
    _check_keys(base, vectors)
    return _collect(base, _ties(base, _Vectors(base, vectors), density, lam, scope))


def _check_ties(density, scope) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    if scope not in ("tensor", "global"):
        raise ValueError(f"ties: scope must be 'tensor' or 'global', got {scope!r}")


def lota_additive(base: StateDict, sparse_deltas: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t delta_t. A delta maps a key to (bool mask, values on the mask), as
    methods/lota.py keeps its per-stage task vectors (LoTA.task_vectors), or to a dense
    tensor. Same result as lota.lota_additive_merge, in float32."""
    out = _start(base)
    for i, d in enumerate(sparse_deltas):
        for k, entry in d.items():
            if k not in out:
                raise KeyError(f"delta {i} has key {k!r} the base lacks")
            if isinstance(entry, torch.Tensor):
                if entry.shape != out[k].shape:
                    raise ValueError(f"delta {i}: {k} has shape {tuple(entry.shape)}, base {tuple(out[k].shape)}")
                out[k] = out[k] + _f32(entry)
                continue
            mask, values = entry
            t = out[k].clone()
            mask = mask.to(t.device)  # a restored method's masks and values are on the CPU
            t[mask] = t[mask] + _f32(values).to(t.device)
            out[k] = t
    return out


# --- merging inside a run (clbench.loop): task vectors from the stages' saved weights -------------


def effective_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with, in the base model's keys: a peft model's adapters are
    merged into a copy (merge_and_unload), so LoRA-family task vectors are the dense Delta W = B A."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if isinstance(model, PeftModel):
        import copy

        return copy.deepcopy(model).merge_and_unload().state_dict()
    return model.state_dict()


def tied_aliases(state: StateDict) -> set[str]:
    """Keys whose tensor shares storage with an earlier key (tied embedding and LM head)."""
    from .checkpoint import storage_key

    seen, out = set(), set()
    for k, v in state.items():
        key = storage_key(v)
        if key in seen:
            out.add(k)
        seen.add(key)
    return out


class DiffVectors:
    """The task vectors of a run's stages from their saved weights (clbench.checkpoint state diffs
    against `base`, as dicts or DiffFiles), read one tensor of one stage at a time.

    cumulative=False (mode single, every stage trained from the base): tau_t = theta_t - theta_0.
    cumulative=True (the sequential stream): tau_t = theta_t - theta_{t-1}, the stage's own change,
    so that theta_0 + sum_t tau_t is the final model. Tied aliases are left out (one key per tensor);
    a tau_t that is zero everywhere counts as absent."""

    def __init__(self, base: StateDict, diffs: Sequence, cumulative: bool):
        self.base, self.diffs, self.cumulative, self.T = base, list(diffs), cumulative, len(diffs)
        aliases = tied_aliases(base)
        changed = set()
        for d in self.diffs:
            kinds = d.kinds if hasattr(d, "kinds") else {k: e[0] for k, e in d.items()}
            changed |= {k for k, kind in kinds.items() if kind != "alias"}
        self.keys = [k for k in base if k in changed and k not in aliases and _is_float(base[k])]

    def _theta(self, k, t: int) -> torch.Tensor:
        from .checkpoint import diff_value

        return self.base[k] if t < 0 else diff_value(self.base, self.diffs[t], k)

    @staticmethod
    def _delta(cur, prev):
        d = _f32(cur) - _f32(prev)
        return d if bool(d.any()) else None

    def stage(self, k, t: int):
        return self._delta(self._theta(k, t), self._theta(k, t - 1 if self.cumulative else -1))

    def stages(self, k):
        prev = self.base[k]
        for t in range(self.T):
            cur = self._theta(k, t)
            yield self._delta(cur, prev)
            if self.cumulative:
                prev = cur


def vectors_from_diffs(base: StateDict, diffs: Sequence, cumulative: bool) -> list[dict[str, torch.Tensor]]:
    """Every stage's task vector in memory (see DiffVectors; a merge in a run reads them tensor
    by tensor instead)."""
    src = DiffVectors(base, diffs, cumulative)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(src.T)]
    for k in src.keys:
        for t, d in enumerate(src.stages(k)):
            if d is not None:
                out[t][k] = d
    return out


def _merged(base: StateDict, src, spec):
    """(key, merged float32 tensor) for each key some task vector changes, one at a time."""
    if spec.how == "task_arithmetic":
        return _task_arithmetic(base, src, spec.lam)
    if spec.how == "lota_additive":
        return _lota_additive(base, src)
    if spec.how == "ties":
        _check_ties(spec.density, spec.scope)
        return _ties(base, src, spec.density, spec.lam, spec.scope)
    raise ValueError(f"unknown merge {spec.how!r}")


def merge(base: StateDict, vectors: Sequence[StateDict], spec) -> dict[str, torch.Tensor]:
    """One merged state for a config.MergeSpec (how, lam, density, scope); tied aliases left out."""
    aliases = tied_aliases(base)
    base = {k: v for k, v in base.items() if k not in aliases}
    if spec.how == "lota_additive":
        return lota_additive(base, vectors)
    _check_keys(base, vectors)
    return _collect(base, _merged(base, _Vectors(base, vectors), spec))


@torch.no_grad()
def merged_model(base_model: torch.nn.Module, diffs: Sequence, spec, cumulative: bool) -> torch.nn.Module:
    """A copy of the base model holding the merge `spec` of the stages' task vectors, computed
    tensor by tensor from their saved diffs (DiffVectors) and cast to each parameter's dtype:
    memory is the base model, the copy and a few tensors, whatever the number of stages."""
    import copy

    base = base_model.state_dict()
    src = DiffVectors(base, diffs, cumulative)
    model = copy.deepcopy(base_model)
    target = model.state_dict()  # shares storage with the copy's parameters and buffers
    for k, v in _merged(base, src, spec):
        target[k].copy_(v)
        del v
    return model


def load_merged(base_model: torch.nn.Module, state: StateDict) -> torch.nn.Module:
    """A copy of the base model holding the merged weights (cast to each parameter's dtype)."""
    import copy

    model = copy.deepcopy(base_model)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if unexpected:
        raise RuntimeError(f"merged state does not fit the model: unexpected keys {unexpected[:5]}")
    return model
