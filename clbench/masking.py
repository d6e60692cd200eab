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
     tests/test_methods_masked.py).
  3. `param_groups`: partially masked tensors sit in a weight_decay=0 group; their decoupled
     weight decay (p <- p * (1 - lr_t * wd), AdamW's rule) is applied in `after_backward` to
     the trainable entries only, with the learning rate of the step about to be taken, so the
     result equals AdamW's decay followed by its Adam update. Frozen entries are multiplied by
     exactly 1.0. Fully trainable tensors keep the loop's default groups (decay on matrices,
     none on 1-D tensors).
  4. `trainable_params`: the number of True entries (after broadcasting).
"""

from __future__ import annotations

from typing import Mapping, Union

import torch

from . import method as M
from .runtime import derive_seed  # noqa: F401  (methods' own seeded draws: clbench.runtime)

MaskLike = Union[torch.Tensor, bool]


class MaskedUpdate:
    """Train only the True entries of `masks` (name -> bool mask broadcastable to the parameter).

    Hold one per stage; call `apply(model)` in stage_start and forward the hooks
    `param_groups`, `after_backward` and `trainable_params` to it."""

    def __init__(self, masks: Mapping[str, MaskLike]):
        self.full: set[str] = set()  # every entry trainable: the loop's default optimizer treatment
        self.partial: dict[str, torch.Tensor] = {}  # some entries trainable: masked grads and decay
        for name, m in masks.items():
            m = torch.as_tensor(m, dtype=torch.bool)
            if bool(m.all()):
                self.full.add(name)
            elif bool(m.any()):
                self.partial[name] = m

    @classmethod
    def whole(cls, names) -> "MaskedUpdate":
        """Whole tensors trainable (HFT, SPAFIT): only requires_grad flags, no entry masks."""
        return cls({n: True for n in names})

    @property
    def trainable_names(self) -> set[str]:
        return self.full | set(self.partial)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set requires_grad: True exactly on parameters with a trainable entry."""
        names = dict(model.named_parameters())
        missing = sorted(self.trainable_names - set(names))
        if missing:
            raise KeyError(f"masks name parameters the model does not have: {missing[:5]}")
        for name, p in names.items():
            p.requires_grad_(name in self.full or name in self.partial)
            if name in self.partial:
                torch.broadcast_shapes(self.partial[name].shape, p.shape)  # fails early on a wrong shape
                self.partial[name] = self.partial[name].to(p.device)
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
                p.grad.masked_fill_(~m, 0.0)
            if wd and p.ndim >= 2:  # the loop's default: no decay on 1-D tensors
                one = torch.ones((), dtype=p.dtype, device=p.device)
                p.mul_(torch.where(m, torch.full_like(one, factor), one))

    def trainable_params(self, model: torch.nn.Module) -> int:
        n = 0
        for name, p in model.named_parameters():
            if name in self.full:
                n += p.numel()
            elif name in self.partial:
                n += int(self.partial[name].expand(p.shape).sum())
        return n


class MaskedMethod(M.Method):
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
            return M.count_trainable(model)
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
    """A bool mask as bits (8 entries per byte): for method state and checkpoints."""
    import numpy as np

    return {"shape": tuple(mask.shape), "bits": torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))}


def unpack_mask(packed: dict) -> torch.Tensor:
    import numpy as np

    shape = tuple(packed["shape"])
    n = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed["bits"].numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).view(shape)
