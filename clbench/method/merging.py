"""Model merging over state dicts: task arithmetic, TIES, DARE through peft, LoTA's additive merge.

The merges are peft's (peft.utils.merge_utils, the functions behind add_weighted_adapter): this
module feeds them, key by key, the stages' task vectors of one tensor stacked on a new dim 0,
with weights = lam for every stage, and adds the result to the base. Written here: only what
peft has no function for, LoTA's additive merge of sparse deltas and the whole-model trim of
TIES scope "global".

Pure functions: inputs are never modified; every result tensor is float32 (a floating-point
tensor is upcast before any arithmetic; a non-floating tensor, e.g. an integer buffer, is
copied from the base unchanged). A key missing from a task vector counts as a zero delta.

  task_vectors(base, finetuned_list)   tau_t = theta_t - theta_0
  task_arithmetic(base, vectors, lam)  theta_0 + lam * sum_t tau_t  (peft task_arithmetic;
                                       Ilharco et al. 2023, arXiv 2212.04089)
  ties(base, vectors, density, lam)    TIES-Merging (Yadav et al. 2023, arXiv 2306.01708), peft ties:
                                       trim, elect sign, disjoint mean; theta_0 + lam * merged
  dare_linear / dare_ties(base, vectors, density, lam, seed)   DARE (Yu et al. 2024, arXiv
                                       2311.03099), peft dare_linear / dare_ties: every entry kept
                                       with probability density and rescaled by 1/density, then
                                       summed (linear) or merged as TIES (ties)
  lota_additive(base, sparse_deltas)   theta_0 + sum_t delta_t for LoTA's sparse task vectors
                                       (Panda et al. 2024, arXiv 2406.16797); no peft function

What peft computes, per tensor (peft 0.21.2; tests/method/test_baselines.py checks each by hand):
  trim (peft magnitude_based_pruning): keep exactly k = int(density * n) entries of largest
    |tau| (floor, so k = 0 zeroes a tensor with density * n < 1; ties at the k-th magnitude are
    broken by torch.topk's order); density >= 1 keeps everything.
  elect sign (calculate_majority_sign_mask "total"): gamma = +1 where sum_t trimmed_t >= 0,
    else -1, so an entry whose trimmed values sum to exactly 0 elects +.
  disjoint mean (disjoint_merge): per entry, the sum of lam * trimmed_t over the stages whose
    sign equals gamma, divided by their count (0 where none).
  Where this differs from the paper's code (github.com/prateeky2806/ties-merging): it trims the
  whole model's flattened task vector at once, keeping |tau| >= the kthvalue(n - int(density*n))
  threshold (int(density*n) + 1 entries without ties, all ties kept), and resolves a zero sum
  with the majority sign over the model. scope "global" here trims over the whole model (keep
  |tau| >= the int(density * n)-th largest magnitude, ties kept) and elects as peft does.
  DARE's random drop uses torch's generator, seeded per (seed, key) from the (method, seed)'s seed: the
  same seed gives the same merge whatever the order of the keys.

Memory: one key at a time; for that key the T stages' float32 tensors in one (T, n) stack,
each pruned as it is read, and peft's entrywise steps on column blocks of it (`_merged`): about
T + 6 tensors of the key's size. In a run (`merged_model`) the stages' saved task vector files
are read one tensor at a time, so a merge needs the base model, the merged copy and that for the
largest tensor (the embedding), never the stages' whole task vectors (TIES scope "global" also
holds one stage's |task vector| over the whole model, to find its threshold). Measured by
`python bench/run.py --only storage` (docs/performance.md).
"""

from __future__ import annotations

import warnings
import zlib
from typing import Literal, Mapping, Sequence

import torch
from peft.utils import merge_utils
from clbench.checkpoint import diff_value
from clbench.checkpoint import storage_key

StateDict = Mapping[str, torch.Tensor]
HOWS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "lota_additive")


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


def _collect(base: StateDict, merged) -> dict[str, torch.Tensor]:
    out = _start(base)
    for k, v in merged:
        out[k] = v
    return out


class _Merge:
    """The fields of a config.MergeSpec the merges read (the functions below build one)."""

    def __init__(self, how: str, lam: float = 1.0, density: float = 1.0, scope: str = "tensor"):
        self.how, self.lam, self.density, self.scope = how, lam, density, scope


def _check(spec) -> None:
    if spec.how not in HOWS:
        raise ValueError(f"unknown merge {spec.how!r}; merges: {', '.join(HOWS)}")
    if not 0 < spec.density <= 1:
        raise ValueError(f"{spec.how}: density must be in (0, 1], got {spec.density}")
    if spec.scope not in ("tensor", "global"):
        raise ValueError(f"{spec.how}: scope must be 'tensor' or 'global', got {spec.scope!r}")
    if spec.scope == "global" and spec.how != "ties":
        raise ValueError(f"{spec.how}: scope 'global' is for ties only (its trim ranks magnitudes over the model)")


def _in_memory(base: StateDict, vectors: Sequence[StateDict], spec, seed: int = 0) -> dict[str, torch.Tensor]:
    _check(spec)
    _check_keys(base, vectors)
    return _collect(base, _merged(base, _Vectors(base, vectors), spec, seed))


def task_arithmetic(base: StateDict, vectors: Sequence[StateDict], lam: float) -> dict[str, torch.Tensor]:
    """theta_0 + lam * sum_t tau_t (peft task_arithmetic)."""
    return _in_memory(base, vectors, _Merge("task_arithmetic", lam))


def ties(base: StateDict, vectors: Sequence[StateDict], density: float, lam: float = 1.0,
         scope: Literal["tensor", "global"] = "tensor") -> dict[str, torch.Tensor]:
    """TIES-Merging: theta_0 + disjoint_merge(lam * trim(tau_t, density), elected sign) (peft ties)."""
    return _in_memory(base, vectors, _Merge("ties", lam, density, scope))


def dare_linear(base: StateDict, vectors: Sequence[StateDict], density: float, lam: float = 1.0,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE: theta_0 + sum_t lam * drop(tau_t) / density, entries kept with probability density (peft dare_linear)."""
    return _in_memory(base, vectors, _Merge("dare_linear", lam, density), seed)


def dare_ties(base: StateDict, vectors: Sequence[StateDict], density: float, lam: float = 1.0,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE then TIES' sign election and disjoint mean (peft dare_ties)."""
    return _in_memory(base, vectors, _Merge("dare_ties", lam, density), seed)


def _lota_additive(base: StateDict, src):
    """theta_0 + delta_1 + delta_2 + ..., added in stage order (as lota_additive)."""
    for k in src.keys:
        out = None
        for d in src.stages(k):
            if d is not None:
                out = (_f32(base[k]).clone() if out is None else out).add_(d.view(base[k].shape))
        if out is not None:
            yield k, out


BLOCK = 1 << 22  # entries per column block of the elementwise steps (16 MB of float32 per stage)


def _stack(src, k, prune=None) -> torch.Tensor:
    """The T stages' tau_t[k] as one (T, n) float32 tensor, zeros where vector t has no delta for
    k, each passed through prune(t, tau) as it is read: T tensors of this key, not 2 T."""
    ref = src.base[k]
    out = torch.zeros((src.T, ref.numel()), dtype=torch.float32, device=ref.device)
    for t, d in enumerate(src.stages(k)):
        d = d.reshape(-1) if d is not None else out[t]
        out[t] = d if prune is None else prune(t, d)
    return out


def _blocks(stacked: torch.Tensor):
    for i in range(0, stacked.shape[1], BLOCK):
        yield stacked[:, i:i + BLOCK]


def _key_seed(seed: int, key: str) -> int:
    """DARE's generator seed for one key, from the (method, seed)'s seed and the key's name (stable
    across runs); 32 bits, all that torch's CPU generator (mt19937) takes of a seed."""
    return zlib.crc32(f"{int(seed)}:{key}".encode())


def _global_thresholds(src, density) -> list[torch.Tensor]:
    """Per task vector, the int(density * n)-th largest |entry| over all keys (n entries: every
    key's, zeros where the vector has none; +inf when that is 0 entries): one vector's |values|
    in memory at a time. Written here: peft trims one tensor at a time only."""
    n = sum(src.base[k].numel() for k in src.keys)
    k_keep = min(n, int(density * n))
    taus = []
    for t in range(src.T):
        if k_keep == 0:
            taus.append(torch.tensor(float("inf")))
            continue
        parts = []
        for k in src.keys:
            d = src.stage(k, t)
            parts.append(d.reshape(-1).abs() if d is not None else torch.zeros(src.base[k].numel(), device=src.base[k].device))
        flat = torch.cat(parts)
        del parts
        taus.append(torch.kthvalue(flat, n - k_keep + 1).values)
        del flat
    return taus


def _elect_and_merge(block: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """peft's ties / dare_ties after their prune: elect sign ("total"), weight, disjoint merge."""
    mask = merge_utils.calculate_majority_sign_mask(block, method="total")
    return merge_utils.disjoint_merge(block * merge_utils.reshape_weight_task_tensors(block, weights), mask)


def _weighted_sum(block: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """peft's task_arithmetic / dare_linear after their prune."""
    return merge_utils.task_arithmetic(list(block), weights)


def _merged(base: StateDict, src, spec, seed: int = 0):
    """(key, merged float32 tensor) for each key some task vector changes, one key at a time
    (spec checked by the caller).

    peft's ties(ts, w, density) is prune(t) for each t, stack, then sign mask, weighting and
    disjoint merge, all entrywise over dim 0; dare_* the same with the random prune;
    task_arithmetic the weighted sum. Here those same functions run with each stage pruned as
    it is read into one preallocated stack, and the entrywise steps on column blocks, which
    gives peft's result (the same draws, in the same order, for DARE) with about T + 3 tensors
    of the key in memory instead of peft's ~5 T."""
    if spec.how == "lota_additive":
        yield from _lota_additive(base, src)
        return
    if not src.keys or not src.T:
        return
    how, density = spec.how, spec.density
    taus = _global_thresholds(src, density) if how == "ties" and spec.scope == "global" else None
    if how == "task_arithmetic":
        prune = None
    elif taus is not None:  # the whole-model trim (written here: peft trims one tensor at a time)
        prune = lambda t, d: torch.where(d.abs() >= taus[t], d, 0.0)  # noqa: E731
    else:
        method = "magnitude" if how == "ties" else "random"
        prune = lambda t, d: merge_utils.prune(d, density, method, rescale=True)  # noqa: E731 (rescale: random only)
    combine = _elect_and_merge if how in ("ties", "dare_ties") else _weighted_sum
    w = torch.full((src.T,), float(spec.lam), dtype=torch.float32)
    for k in src.keys:
        with warnings.catch_warnings():  # peft's prune warns at density 1 that it keeps everything: meant here
            warnings.filterwarnings("ignore", message="The density .* no pruning", category=UserWarning)
            ref = base[k]
            cuda = [ref.device] if ref.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # peft's random prune draws from torch's generator
                torch.manual_seed(_key_seed(seed, k))
                stacked = _stack(src, k, prune)
        wk = w.to(stacked.device)
        merged = torch.cat([combine(b, wk) for b in _blocks(stacked)]).view(ref.shape)
        del stacked
        yield k, _f32(ref) + merged


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


# --- merging inside a run (clbench.run.loop): task vectors from the stages' saved weights -------------


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


@torch.no_grad()
def merged_model(base_model: torch.nn.Module, diffs: Sequence, spec, cumulative: bool, seed: int = 0) -> torch.nn.Module:
    """A copy of the base model holding the merge `spec` of the stages' task vectors, computed
    key by key from their saved diffs (DiffVectors) and cast to each parameter's dtype: memory is
    the base model, the copy and one key's stacked stages (module docstring). seed: DARE's."""
    import copy

    _check(spec)
    base = base_model.state_dict()
    src = DiffVectors(base, diffs, cumulative)
    model = copy.deepcopy(base_model)
    target = model.state_dict()  # shares storage with the copy's parameters and buffers
    for k, v in _merged(base, src, spec, seed):
        target[k].copy_(v)
        del v
    return model

