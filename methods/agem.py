"""A-GEM, averaged gradient episodic memory (Chaudhry et al., ICLR 2019, arXiv 1812.00420).

Idea: keep a small episodic memory of every finished task. At each optimizer step of a later
task, compute the gradient g_ref of the loss on a batch drawn from the memory; if the new
task's gradient g points against it (g . g_ref < 0, the step would increase the memory's
loss to first order), replace g by its projection onto the half-space g . g_ref >= 0:

    g <- g - (g . g_ref / g_ref . g_ref) g_ref      if g . g_ref < 0;  g unchanged otherwise

(one dot product over all trainable parameters: the authors' model/model.py,
create_stochastic_gem_ops, flattens every trainable variable's gradient into one vector), so
the step never increases the average episodic loss to first order.

How it runs here:
- Memory: at stage_end of stage t, m examples of the stage's training set (`stage.examples`)
  are sampled without replacement with a generator seeded from the run seed and the stage
  (every process draws the same); a stage with fewer examples stores them all. Stage t
  projects against the memories of tasks < t only; stage 1 has an empty memory and is
  exactly full fine-tuning (the hook returns before touching anything or drawing a number).
  A uniform sample of the task's training set is a choice: the authors fill the memory with
  a fixed number of the finished task's examples per class, which a generative LM task has
  no analogue of.
- Reference batch: at every optimizer step, ref_batch_size examples drawn without replacement
  from the pooled memory of all finished tasks (a generator seeded from the run seed and the
  stage, the same on every process); the whole memory when it holds fewer (the authors use all
  of it when it is smaller than their reference batch).
- after_backward (gradients accumulated over the micro-batches and, with several processes,
  already summed over the ranks, before clipping): g_ref = torch.autograd.grad of the loop's
  lm_loss (token mean of the target NLL, the stage's head_only_targets) on the reference
  batch under stage.autocast(), in the model's training mode (the authors feed the memory
  batch with train_phase True); .grad is not touched by it.
  The dot products are per-tensor (torch.dot on views of each gradient) summed into float64
  scalars: no flat copy of the parameters. The projection is applied in place to .grad.
- Several processes: each rank computes its share (examples rank, rank + N, ...) of the same
  reference batch, weighted by its share of the batch's target tokens as the loop weights the
  task loss, and the shares are summed over the ranks: every rank holds the same g_ref (the
  all-reduce gives each rank the same sum, where N separate full computations could differ
  in their last bits), so every rank takes the same decision and the same projected step.
- Sharded (distributed.strategy fsdp, clbench/distributed/fsdp.py): torch.autograd.grad cannot reach an FSDP2
  shard (the forward computes with the all-gathered copy), so the task gradient in .grad is set
  aside, each rank's weighted share of the reference loss is backpropagated as the loop's loss is
  (FSDP's reduce-scatter sums the shares into each rank's rows), the new .grad shards are g_ref and
  the task gradient is put back. Every dot product is a sum of per-shard partial dots (float64),
  all-reduced once per step (`shard_sums`), so every rank takes the same decision and applies the
  same coefficient to its own rows. Memory: g_ref is sharded too (1/N of the gradient per rank).
  Tested (tests/distributed/test_fsdp_methods.py): 2 sharded processes against 1, on a run where stages 2 and 3
  project: the same matrix and projected steps, losses within 1e-5.
- Every parameter trains (as full_ft). The optimizer is the loop's AdamW: A-GEM constrains
  the gradient it is given, not Adam's per-coordinate update (the authors use plain SGD). AdamW
  stays the default so that a paired difference against full FT measures the projection, not the
  optimizer; `train: {optimizer: sgd}` on the method runs the authors' optimizer, recorded per
  stage in results.json.
- Cost: one extra forward and backward of ref_batch_size examples per optimizer step, and
  one gradient-sized set of tensors (g_ref) while the hook runs.

Options (defaults and sources):
  m 50              examples kept per finished task. Unconfirmed for LMs: the authors keep 65
                    per task on Split CIFAR (13 per class, conv_split_cifar.py) and 250 on
                    Permuted MNIST (fc_permute_mnist.py); 50 as methods/replay.py.
  ref_batch_size    none = the stage's train.batch_size (one more micro-batch of work per
                    step). Unconfirmed for LMs: the authors draw 256 memory examples, or all
                    when fewer (conv_split_cifar.py).

State: the memory (token ids) and per-stage counts of projected steps; checkpointed with
state_dict, so a resumed run projects against the same memory.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.tensor import DTensor

from clbench.data.examples import IGNORE, Example, collate
from clbench.distributed import collectives
from clbench.method import MethodError, Method, StageMeans, register
from clbench.method.lm import lm_loss
from clbench.method.masking import derive_seed

SALT_MEMORY, SALT_DRAW = 21, 22


class AgemOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    m: int = Field(50, gt=0, description="examples kept per finished task")
    ref_batch_size: Optional[int] = Field(None, gt=0, description="memory examples per reference gradient "
                                          "(none = train.batch_size; all of the memory when it holds fewer)")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def sharded(params) -> bool:
    """Whether `params` are FSDP2 shards (distributed.strategy fsdp, clbench/distributed/fsdp.py)."""
    return any(isinstance(p, DTensor) for p in params)


def shard_sums(values: np.ndarray, params) -> np.ndarray:
    """Per-shard partial dot products summed over the ranks (float64, one all-reduce) when `params`
    are sharded: every rank then holds the whole products; unchanged otherwise (whole tensors)."""
    if not sharded(params) or not collectives.enabled():
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(params[0].device)
    return collectives.all_reduce_sum(t).cpu().numpy().reshape(values.shape)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _local(a), _local(b)
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        return torch.dot(a.reshape(-1), b.reshape(-1)).double()
    return torch.dot(a.reshape(-1).float(), b.reshape(-1).float()).double()


@register("agem")
class AGEM(Method):
    Options = AgemOptions

    def __init__(self, options: AgemOptions):
        self.options = options
        self.memory: dict[str, list[Example]] = {}  # finished tasks, in stream order
        self.stats: list[dict] = []  # per stage: optimizer steps, projected steps
        self.last: dict = {}  # the latest step's dot products (inspection, tests)
        self.pad_id = 0
        self._draw: torch.Generator | None = None
        self._steps = self._projected = 0
        self._means = StageMeans()  # per step: violated, projected_fraction (stage_stats)

    def setup(self, model, run):
        tok = getattr(run, "tokenizer", None)
        if tok is not None and tok.pad_token_id is not None:
            self.pad_id = tok.pad_token_id
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def stage_start(self, model, stage):
        self._draw = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, SALT_DRAW))
        self._steps = self._projected = 0
        self._means.reset()
        return model

    def pool(self) -> list[Example]:
        return [ex for exs in self.memory.values() for ex in exs]

    def reference_examples(self, stage) -> list[Example]:
        """The memory examples of this step's reference gradient (the same on every rank)."""
        pool = self.pool()
        k = self.options.ref_batch_size or stage.train_config.batch_size
        if k >= len(pool):
            return pool
        idx = torch.randperm(len(pool), generator=self._draw)[:k].tolist()
        return [pool[i] for i in idx]

    def _reference_share(self, examples, params):
        """This rank's share of the reference batch (examples rank, rank + N, ...), collated on the
        parameters' device, with its target-token count and the whole batch's."""
        multi = collectives.enabled()
        if multi:
            n = collectives.world_size()
            if len(examples) < n:
                raise MethodError(f"agem: a reference batch of {len(examples)} memory examples cannot be split over "
                                  f"{n} processes: raise m or ref_batch_size to at least {n}")
            examples = collectives.shard(examples)
        batch = {k: v.to(params[0].device) for k, v in collate(examples, self.pad_id).items()}
        n_local = (batch["labels"][:, 1:] != IGNORE).sum().to(torch.float32)
        return batch, n_local, (collectives.all_reduce_sum(n_local.clone()) if multi else n_local)

    def reference_gradient(self, model, params, examples, stage) -> list[torch.Tensor | None]:
        """Gradient of the loop's lm_loss on `examples` w.r.t. `params`, .grad untouched; with
        several processes each rank takes its share and the shares are summed over the ranks."""
        if sharded(params):
            return self._sharded_reference_gradient(model, params, examples, stage)
        multi = collectives.enabled()
        batch, n_local, n_global = self._reference_share(examples, params)
        if float(n_global) == 0:
            return [None] * len(params)
        head_only = getattr(stage.train_config, "head_only_targets", True)
        if float(n_local) > 0:
            with stage.autocast():
                loss = lm_loss(model, batch, head_only)
            if multi:
                loss = loss * (n_local / n_global)
            grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        else:
            grads = [None] * len(params)
        if multi:  # the same set of tensors on every rank for the all-reduce
            grads = [collectives.all_reduce_sum(torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)]
        return grads

    def _sharded_reference_gradient(self, model, params, examples, stage) -> list[torch.Tensor | None]:
        """reference_gradient on FSDP2 shards: torch.autograd.grad cannot reach a sharded parameter
        (the forward computes with the all-gathered copy; FSDP's post-backward hook reduce-scatters its
        gradient into the shard's .grad), so the task gradient is set aside, the share's weighted loss
        is backpropagated as the loop's is (FSDP sums the ranks' shares into each rank's rows), the
        new .grad shards are taken as g_ref and the task gradient is put back. Every rank runs the
        forward and backward, even one whose share has no target token (its loss is 0 times its
        logits): FSDP's collectives need every rank."""
        batch, n_local, n_global = self._reference_share(examples, params)
        if float(n_global) == 0:
            return [None] * len(params)
        head_only = getattr(stage.train_config, "head_only_targets", True)
        task = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with stage.autocast():
                out = lm_loss(model, batch, head_only, return_forward=True)
            loss = out.loss * (n_local / n_global) if float(n_local) > 0 else out.logits.sum() * 0.0
            loss.backward()
            return [p.grad for p in params]
        finally:
            for p, g in zip(params, task):
                p.grad = g

    def after_backward(self, model, stage):
        if not self.memory:
            return
        self._steps += 1
        params = [p for p in model.parameters() if p.requires_grad]
        refs = self.reference_gradient(model, params, self.reference_examples(stage), stage)
        device = params[0].device
        dot = torch.zeros((), dtype=torch.float64, device=device)
        ref2 = torch.zeros((), dtype=torch.float64, device=device)
        g2 = torch.zeros((), dtype=torch.float64, device=device)
        for p, r in zip(params, refs):
            if p.grad is not None:
                g2 += _dot(p.grad, p.grad)
            if r is None:
                continue
            ref2 += _dot(r, r)
            if p.grad is not None:
                dot += _dot(p.grad, r)
        dot, ref2, g2 = shard_sums(np.array([float(dot), float(ref2), float(g2)]), params).tolist()
        projected = dot < 0 and ref2 > 0
        self.last = {"dot": dot, "ref_norm2": ref2, "projected": projected}
        # |g - g~| / |g| = |g.g_ref| / (|g_ref| |g|) when projected, else 0
        self._means.add("violated", float(projected))
        self._means.add("projected_fraction", abs(dot) / math.sqrt(ref2 * g2) if projected and g2 > 0 else 0.0)
        if not projected:
            return
        self._projected += 1
        coef = dot / ref2
        for p, r in zip(params, refs):
            if r is None:
                continue
            if p.grad is None:  # a parameter the task loss did not reach: its part of g is 0
                p.grad = (r * -coef).to(p.dtype)
            else:
                p.grad.add_(r.to(p.grad.dtype), alpha=-coef)

    def fsdp_refusal(self):
        return None  # sharded gradients: per-shard partial dot products summed over the ranks (shard_sums)

    def stage_stats(self, stage):
        """violated: the fraction of the stage's optimizer steps where g.g_ref < 0 (projected);
        projected_fraction: the mean over its steps of |g - g~| / |g|, the share of the gradient's
        norm the projection removed (0 on steps without a violation). None in stage 1 (no memory)."""
        return self._means.means()

    def stage_end(self, model, stage):
        if self.memory:
            self.stats.append({"stage": stage.stage, "steps": self._steps, "projected": self._projected})
        examples = list(stage.examples)
        rng = random.Random(derive_seed(stage.seed, stage.stage, SALT_MEMORY))
        self.memory[stage.task] = rng.sample(examples, min(self.options.m, len(examples)))
        return model

    def state_dict(self):
        return {"memory": {t: [(list(ex.input_ids), ex.n_prompt) for ex in exs] for t, exs in self.memory.items()},
                "stats": [dict(s) for s in self.stats]}

    def load_state_dict(self, state):
        self.memory = {t: [Example(list(ids), int(n)) for ids, n in exs] for t, exs in state.get("memory", {}).items()}
        self.stats = [dict(s) for s in state.get("stats", [])]
