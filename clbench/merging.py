"""Model merging over state dicts: task arithmetic, TIES, LoTA's additive merge.

Pure functions: inputs are never modified; every result tensor is float32 (a floating-point
tensor is upcast before any arithmetic; a non-floating tensor, e.g. an integer buffer, is
copied from the base unchanged). A key missing from a task vector counts as a zero delta.

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
  - scope "tensor" (default, as the project brief specifies): the top-k is taken per tensor
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


def task_arithmetic(base: StateDict, vectors: Sequence[StateDict], lam: float) -> dict[str, torch.Tensor]:
    """theta_0 + lam * sum_t tau_t."""
    _check_keys(base, vectors)
    out = _start(base)
    for k in out:
        ds = [_f32(tv[k]) for tv in vectors if k in tv]
        if ds:
            out[k] = out[k] + lam * torch.stack(ds).sum(0)
    return out


def _trim(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) largest |values| of a 1-D tensor (ties kept), zero the rest."""
    n = flat.numel()
    if n == 0:
        return flat.clone()
    k = min(n, max(1, round(density * n)))
    mag = flat.abs()
    tau = torch.topk(mag, k, sorted=False).values.min()
    return torch.where(mag >= tau, flat, torch.zeros_like(flat))


def _elect_and_mean(trimmed: torch.Tensor) -> torch.Tensor:
    """trimmed: (T, n). Sign election (zero sums -> majority sign) and disjoint mean."""
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    sign = torch.where(sign == 0, majority, sign)
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    count = agree.sum(0).clamp(min=1)
    return selected.sum(0) / count


def ties(base: StateDict, vectors: Sequence[StateDict], density: float, lam: float = 1.0,
         scope: Literal["tensor", "global"] = "tensor") -> dict[str, torch.Tensor]:
    """TIES-Merging: theta_0 + lam * disjoint_mean(elect_sign(trim(tau_t, density)))."""
    if not 0 < density <= 1:
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    if scope not in ("tensor", "global"):
        raise ValueError(f"ties: scope must be 'tensor' or 'global', got {scope!r}")
    _check_keys(base, vectors)
    out = _start(base)
    keys = [k for k in out if _is_float(base[k]) and any(k in tv for tv in vectors)]
    if not keys or not vectors:
        return out

    def stacked(k):  # (T, numel) of task vector entries, zeros where a vector lacks k
        return torch.stack([_f32(tv[k]).reshape(-1) if k in tv else torch.zeros(base[k].numel()) for tv in vectors])

    if scope == "tensor":
        for k in keys:
            trimmed = torch.stack([_trim(row, density) for row in stacked(k)])
            out[k] = out[k] + lam * _elect_and_mean(trimmed).view(base[k].shape)
        return out
    flat = torch.cat([stacked(k) for k in keys], dim=1)
    trimmed = torch.stack([_trim(row, density) for row in flat])
    merged = _elect_and_mean(trimmed)
    off = 0
    for k in keys:
        n = base[k].numel()
        out[k] = out[k] + lam * merged[off:off + n].view(base[k].shape)
        off += n
    return out


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
            t[mask] = t[mask] + _f32(values)
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


def vectors_from_diffs(base: StateDict, diffs: Sequence[dict], cumulative: bool) -> list[dict[str, torch.Tensor]]:
    """Task vectors from the stages' weights (clbench.checkpoint.state_diff against `base`).

    cumulative=False (mode single, every stage trained from the base): tau_t = theta_t - theta_0.
    cumulative=True (the sequential stream): tau_t = theta_t - theta_{t-1}, the stage's own change,
    so that theta_0 + sum_t tau_t is the final model. Tied aliases are left out (one key per tensor)."""
    from .checkpoint import diff_value

    aliases = tied_aliases(base)
    out = []
    for t, d in enumerate(diffs):
        keys = {k for k, e in d.items() if e[0] != "alias"}
        if cumulative and t > 0:
            keys |= {k for k, e in diffs[t - 1].items() if e[0] != "alias"}
        tv = {}
        for k in sorted(keys - aliases):
            if not _is_float(base[k]):
                continue
            prev = diff_value(base, diffs[t - 1], k) if cumulative and t > 0 else base[k]
            delta = _f32(diff_value(base, d, k)) - _f32(prev)
            if bool(delta.any()):
                tv[k] = delta
        out.append(tv)
    return out


def merge(base: StateDict, vectors: Sequence[StateDict], spec) -> dict[str, torch.Tensor]:
    """One merged state for a config.MergeSpec (how, lam, density, scope); tied aliases left out."""
    aliases = tied_aliases(base)
    base = {k: v for k, v in base.items() if k not in aliases}
    if spec.how == "task_arithmetic":
        return task_arithmetic(base, vectors, spec.lam)
    if spec.how == "ties":
        return ties(base, vectors, spec.density, spec.lam, spec.scope)
    if spec.how == "lota_additive":
        return lota_additive(base, vectors)
    raise ValueError(f"unknown merge {spec.how!r}")


def load_merged(base_model: torch.nn.Module, state: StateDict) -> torch.nn.Module:
    """A copy of the base model holding the merged weights (cast to each parameter's dtype)."""
    import copy

    model = copy.deepcopy(base_model)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if unexpected:
        raise RuntimeError(f"merged state does not fit the model: unexpected keys {unexpected[:5]}")
    return model
