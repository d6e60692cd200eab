"""Masked updates: the one implementation every mask-based method uses (LoTA, HFT, SPAFIT,
KS-Lottery).

A mask is a bool tensor, True = trainable, keyed by a `named_parameters()` name (which lists a
tied weight once). A mask may be any shape that broadcasts to its parameter: a full-shape mask
for LoTA, a (rows, 1) row mask for KS-Lottery, a 0-d tensor (or a plain bool) for a whole
tensor (HFT, SPAFIT). Parameters without a mask are frozen.

How frozen entries stay bit-identical through the loop's training step
(AdamW, weight decay, gradient clipping, bf16 autocast, gradient accumulation):

  1. `apply`: requires_grad=False on every parameter with no trainable entry, so its weight
     gradient is never computed (HFT's speed-up) and it never reaches the optimizer.
  2. `after_backward` (called by the loop after the accumulated backward, before clipping):
     frozen entries of partially masked tensors get gradient 0 (masked_fill, so an inf
     gradient cannot turn into NaN). Clipping scales 0 to 0. The optimizer is fresh per
     stage, so a zero gradient gives zero Adam moments and a zero update (0 / (sqrt(0) + eps)),
     which leaves the weight bit-identical (checked with the fused AdamW the loop uses, see
     tests/method/test_methods_masked.py).
  3. `param_groups`: partially masked tensors sit in a weight_decay=0 group; their decoupled
     weight decay (p <- p * (1 - lr_t * wd), AdamW's rule) is applied in `after_backward` to
     the trainable entries only, with the learning rate of the step about to be taken, so the
     result equals AdamW's decay followed by its Adam update. Frozen entries are multiplied by
     exactly 1.0. Fully trainable tensors keep the loop's default groups (decay on matrices,
     none on 1-D tensors).
  4. `trainable_params`: the number of True entries (after broadcasting).

Sharded parameters (distributed.strategy fsdp, clbench/distributed/fsdp.py: DTensors split by rows over the
ranks): a mask is then of this rank's rows (`local_rows` gives a tensor's local rows and their
first global row), the update is built with sharded=True, and gradients and decay act on the
local shard. `topk_masks` selects the k largest scores exactly over all shards, with the same
code and the same tie rule at any number of processes, so the masks do not depend on it.
"""

from __future__ import annotations

import math
from typing import Mapping, Union

import torch

from clbench.method import Method, count_trainable
from clbench.checkpoint import pack_bits, unpack_bits
from clbench.distributed import collectives
from clbench.runtime import derive_seed  # noqa: F401  (methods' own seeded draws: clbench.runtime)

MaskLike = Union[torch.Tensor, bool]


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of `t`, the global index of the first): a DTensor sharded on dim 0 (as
    FSDP2 shards a parameter and its gradient) gives its local shard, a plain or replicated
    tensor the whole of it at offset 0. The local tensor shares storage with `t`."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return t, 0
    if all(isinstance(pl, Replicate) for pl in t.placements):
        return t.to_local(), 0
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"a tensor sharded as {t.placements}: clbench's masks need rows split over one mesh dimension (Shard(0))")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # torch has no public form

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[0]) if t.ndim else 0


def reshard(model: torch.nn.Module) -> bool:
    """Reshard every FSDP2 unit of `model`, so that its parameters are the sharded DTensors (FSDP
    keeps the root gathered after a forward, and a method that masks, copies or freezes a gathered
    parameter would act on a temporary); returns whether `model` is sharded at all."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.reshard()
    return bool(units)


is_sharded = reshard  # its former name (it reshards as it answers): method files written against it keep working


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every rank's rows (in rank order, as FSDP2 splits them): a sharded
    method state made the same on every rank, as one process holds it (a collective)."""
    parts = collectives.gather(local.detach().cpu())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def own_rows(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `whole` if it has the (possibly sharded) `param`'s global rows, else
    `whole` itself (already this rank's)."""
    local, first = local_rows(param.detach())
    if whole.ndim and whole.shape[0] == param.shape[0] != local.shape[0]:
        return whole[first:first + local.shape[0]]
    return whole


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks in place, on a device the process group's backend serves."""
    on = t
    if torch.cuda.is_available() and "nccl" in str(torch.distributed.get_backend()):
        on = t.to(torch.device("cuda", torch.cuda.current_device()))
    torch.distributed.all_reduce(on, op=torch.distributed.ReduceOp.SUM)
    if on is not t:
        t.copy_(on)
    return t


@torch.no_grad()
def topk_masks(scores: Mapping[str, torch.Tensor], groups: list[list[str]], ks: list[int], sharded: bool = False
               ) -> dict[str, torch.Tensor]:
    """Per group of names, exactly k True entries: the k largest scores over the group's tensors.
    Ties at the k-th value go to the lowest global position (the group's names in order, then
    row-major within a tensor), i.e. the first k of a stable descending sort of the
    concatenated scores (torch.topk breaks ties its own way, so it is not used).

    `scores`: name -> this rank's rows of a non-negative float score (of its local shard when
    `sharded`, rows in rank order, as FSDP2 splits them; else the whole tensor). Returns
    name -> bool mask of the same local shape.

    Written by hand (no library selects an exact top-k over sharded tensors): non-negative
    float32 values sort like their int32 bit patterns, so a bisection over the 31 value bits,
    with one all-reduced count per group and bit, finds the k-th largest value tau; then one
    all-reduce of every rank's count of ties at tau per tensor decides which ties each rank
    takes. No rank holds more than its own scores, and without `sharded` the same code runs
    with no collective, so the masks are the same at any number of processes."""
    names = [n for g in groups for n in g]
    gid = {n: i for i, g in enumerate(groups) for n in g}
    bits = {}
    for n in names:
        b = scores[n].detach().to(torch.float32).contiguous().view(torch.int32)
        if b.numel() and (bool((b < 0).any()) or bool((b > 0x7F800000).any())):
            raise ValueError(f"topk_masks: the scores of {n} have a negative, -0.0 or NaN entry")
        bits[n] = b
    k = torch.tensor(ks, dtype=torch.int64)
    reduce = sum_over_ranks if sharded else (lambda t: t)

    def count(op, at):
        c = torch.zeros(len(groups), dtype=torch.int64)
        for n in names:
            c[gid[n]] += int(op(bits[n], int(at[gid[n]])).sum())
        return reduce(c)

    total = count(torch.ge, torch.zeros_like(k))
    bad = [(i, int(k[i]), int(total[i])) for i in range(len(groups)) if not 0 < k[i] <= total[i]]
    if bad:
        raise ValueError(f"topk_masks: cannot select k of n entries (group, k, n): {bad[:5]}")
    lo, hi = torch.zeros_like(k), torch.full_like(k, 1 << 31)  # count(>= lo) >= k > count(>= hi)
    for _ in range(31):
        mid = (lo + hi) // 2
        ok = count(torch.ge, mid) >= k
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    need = k - count(torch.gt, lo)  # entries equal to tau (= lo) still to take, per group
    ties = torch.tensor([int((bits[n] == int(lo[gid[n]])).sum()) for n in names], dtype=torch.int64)
    if sharded and torch.distributed.get_world_size() > 1:  # (rank, tensor) counts: a sum of one-hot rows
        world, me = torch.distributed.get_world_size(), torch.distributed.get_rank()
        every = torch.zeros(world, len(names), dtype=torch.int64)
        every[me] = ties
        sum_over_ranks(every)
    else:
        every, me = ties.view(1, -1), 0
    out, before = {}, [0] * len(groups)
    for j, n in enumerate(names):
        i, b = gid[n], bits[n]
        m = b > int(lo[i])
        take = max(0, min(int(every[me, j]), int(need[i]) - before[i] - int(every[:me, j].sum())))
        if take:
            flat = m.view(-1)
            flat[(b.view(-1) == int(lo[i])).nonzero().view(-1)[:take]] = True
        out[n] = m
        before[i] += int(every[:, j].sum())
    return out


class MaskedUpdate:
    """Train only the True entries of `masks` (name -> bool mask broadcastable to the parameter).

    Hold one per stage; call `apply(model)` in stage_start and forward the hooks
    `param_groups`, `after_backward` and `trainable_params` to it."""

    def __init__(self, masks: Mapping[str, MaskLike], sharded: bool = False):
        """`sharded`: the masks are of this rank's shards (clbench.distributed.fsdp), so whether a parameter
        is trained whole, in part or not at all is decided over every rank's mask (a collective:
        every rank builds its update)."""
        masks = {n: torch.as_tensor(m, dtype=torch.bool) for n, m in masks.items()}
        names = list(masks)
        # per name: (True entries, entries) of the mask itself; all(), any() follow from them
        counts = torch.tensor([[int(masks[n].sum()), masks[n].numel()] for n in names], dtype=torch.int64).view(-1, 2)
        if sharded:
            sum_over_ranks(counts)
        self.full: set[str] = set()  # every entry trainable: the loop's default optimizer treatment
        self.partial: dict[str, torch.Tensor] = {}  # some entries trainable: masked grads and decay
        for name, (on, total) in zip(names, counts.tolist()):
            if on == total:
                self.full.add(name)
            elif on:
                self.partial[name] = masks[name]
        self.sharded = sharded
        self._count: int | None = None  # trainable entries, counted by apply

    @classmethod
    def whole(cls, names) -> "MaskedUpdate":
        """Whole tensors trainable (HFT, SPAFIT): only requires_grad flags, no entry masks."""
        return cls({n: True for n in names})

    @property
    def trainable_names(self) -> set[str]:
        return self.full | set(self.partial)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set requires_grad: True exactly on parameters with a trainable entry."""
        reshard(model)  # under fsdp: the sharded parameters, not a gathered root's
        names = dict(model.named_parameters())
        missing = sorted(self.trainable_names - set(names))
        if missing:
            raise KeyError(f"masks name parameters the model does not have: {missing[:5]}")
        count = torch.zeros((), dtype=torch.int64)
        for name, p in names.items():
            p.requires_grad_(name in self.full or name in self.partial)
            local = local_rows(p)[0]
            if name in self.partial:
                torch.broadcast_shapes(self.partial[name].shape, local.shape)  # fails early on a wrong shape
                self.partial[name] = self.partial[name].to(local.device)
                count += int(self.partial[name].expand(local.shape).sum())
            elif name in self.full:
                count += local.numel()
        if self.sharded:
            sum_over_ranks(count)
        self._count = int(count)
        return model

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        decay, no_decay, masked = [], [], []
        for name, p in model.named_parameters():
            if name in self.partial:
                masked.append(p)
            elif name in self.full:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
                  {"params": masked, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def after_backward(self, model: torch.nn.Module, stage) -> None:
        if not self.partial:
            return
        wd = stage.train_config.weight_decay
        factor = 1.0 - stage.lr * wd if wd else 1.0  # the lr of the step being taken
        for name, p in model.named_parameters():
            m = self.partial.get(name)
            if m is None:
                continue
            if p.grad is not None:
                local_rows(p.grad)[0].masked_fill_(~m, 0.0)
            if wd and p.ndim >= 2:  # the loop's default: no decay on 1-D tensors
                w = local_rows(p)[0]
                one = torch.ones((), dtype=w.dtype, device=w.device)
                w.mul_(torch.where(m, torch.full_like(one, factor), one))

    def trainable_params(self, model: torch.nn.Module) -> int:
        """The trainable entries over all shards (counted by `apply`)."""
        if self._count is None:
            raise RuntimeError("MaskedUpdate.trainable_params before apply(model)")
        return self._count


class MaskedMethod(Method):
    """Mixin for a method that holds `self.update: MaskedUpdate | None`; forwards the hooks."""

    update: MaskedUpdate | None = None

    def param_groups(self, model, stage):
        if self.update is None:
            return None
        return self.update.param_groups(model, stage.train_config.weight_decay)

    def after_backward(self, model, stage):
        if self.update is not None:
            self.update.after_backward(model, stage)

    def trainable_params(self, model):
        if self.update is None:
            return count_trainable(model)
        return self.update.trainable_params(model)


def copy_params(model: torch.nn.Module, names=None) -> dict[str, torch.Tensor]:
    """Detached clones of the named parameters (all of them by default)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if names is None or n in names}


@torch.no_grad()
def restore(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` back into the model's parameters (bit-exact)."""
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)


def pack_mask(mask: torch.Tensor) -> dict:
    """A bool mask as bits (8 entries per byte, clbench.checkpoint.pack_bits): for method state and
    checkpoints."""
    return {"shape": tuple(mask.shape), "bits": pack_bits(mask.detach().cpu())}


def unpack_mask(packed: dict) -> torch.Tensor:
    shape = tuple(packed["shape"])
    return unpack_bits(packed["bits"], math.prod(shape)).view(shape)
