"""What the peft adapter methods (lora, adalora, miss) share: the continual variants; and the
dropout every method's training forward uses (`keyed`, below: the same masks at any number of processes).

  seq  one adapter carried through all stages;
  inc  after each stage the adapter is merged into the weights and a fresh one starts.
"""

from __future__ import annotations

import contextlib

import torch

from clbench.runtime import derive_seed


def attach(model, config):
    """Wrap `model` with a new peft adapter built from `config`."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def for_stage(model, config, stage, variant: str):
    """The model to train in `stage`: with `inc`, merge the last adapter and attach a fresh one."""
    if variant == "inc" and stage.stage > 1:
        return attach(model.merge_and_unload(), config)
    return model


def fsdp_refusal(variant: str) -> str | None:
    """Under FSDP every parameter must exist before sharding: `inc` creates a new adapter per stage."""
    if variant == "inc":
        return ("variant inc creates a fresh adapter after each stage, and a parameter created after sharding is "
                "not managed by FSDP (the ranks' copies would drift apart); use variant seq")
    return None


# --- dropout that does not depend on the number of processes -------------------------------
#
# nn.Dropout draws its mask from the process's RNG over the whole local batch, so with several
# processes each rank draws other masks for its share than one process draws for the whole batch
# (LoRA's adapter dropout: a 2-process tiny run ended 0.35 against 0.50 on a task). Written here
# because no library keys a dropout mask by the example: inside the loop's forward (`keyed`), the
# mask of example i of the global batch comes from a generator seeded by (stage seed, step,
# micro-batch, i, the module, its call), drawn at the run's full sequence length and cut to the
# batch's, so it is the same whichever rank holds the example and however the batch is padded.
# Outside that forward (a method's own passes over other batches), and on an input that is not
# one row per example (an adapter on the LM head, which sees only the target positions), it is
# torch's dropout.

_KEYS: dict | None = None  # the loop's current micro-batch: seed, row keys, max length, call counts


class KeyedDropout(torch.nn.Dropout):
    """nn.Dropout with per-example masks keyed by the global example inside `keyed` (see above)."""

    def __init__(self, p: float, index: int):
        super().__init__(p)
        self.index = index  # the module's position in the model: its own masks

    def forward(self, x):
        keys = _KEYS
        if not self.training or self.p == 0 or keys is None:
            return super().forward(x)
        rows = keys["rows"]
        if x.ndim < 2 or x.shape[0] != len(rows) or (x.ndim > 2 and x.shape[1] > keys["max_length"]):
            return super().forward(x)  # not one row per example (an adapter on the head): torch's dropout
        call = keys["calls"][self.index] = keys["calls"].get(self.index, -1) + 1
        shape = (keys["max_length"], *x.shape[2:]) if x.ndim > 2 else tuple(x.shape[1:])
        keep = []
        for r in rows:
            g = torch.Generator().manual_seed(derive_seed(keys["seed"], r, self.index * 1009 + call + 1))
            m = torch.rand(shape, generator=g) >= self.p
            keep.append(m[:x.shape[1]] if x.ndim > 2 else m)
        keep = torch.stack(keep).to(x.device)
        return x * keep.to(x.dtype) / (1 - self.p)


def _install(model) -> None:
    """Every nn.Dropout of `model` with p > 0 becomes a KeyedDropout (once; no parameters move)."""
    index = 1 + max((m.index for m in model.modules() if isinstance(m, KeyedDropout)), default=-1)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                new = KeyedDropout(child.p, index)
                new.train(child.training)
                setattr(parent, name, new)
                index += 1


@contextlib.contextmanager
def keyed(model, seed: int, rows: list[int], max_length: int):
    """Inside: `model`'s dropouts draw example r's mask from (seed, r), for the global example
    index r of each local row (`rows`; `seed` names the stage, step and micro-batch)."""
    global _KEYS
    _install(model)
    _KEYS = {"seed": seed, "rows": list(rows), "max_length": max_length, "calls": {}}
    try:
        yield
    finally:
        _KEYS = None
