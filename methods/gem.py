"""GEM, gradient episodic memory (Lopez-Paz & Ranzato, NeurIPS 2017, arXiv 1706.08840).

Idea: keep an episodic memory of every finished task. At each optimizer step of a later task,
compute the gradient g_k of the loss on task k's memory for every finished task k. If the new
task's gradient g points against any of them (g . g_k < 0: the step would increase that task's
memory loss to first order), replace g by the closest vector that points against none:

    g~ = argmin_z 1/2 |g - z|^2   subject to   z . g_k >= 0 for every finished task k

solved through its dual, a quadratic program in one variable per finished task (the authors'
model/gem.py, project2cone2, with quadprog):

    v = argmin_v 1/2 v^T (M M^T) v + (M g)^T v   subject to   v >= margin,     g~ = M^T v + g

where the rows of M are the g_k. `margin` is the authors' `memory_strength` (0.5 in their
run_experiments.sh): it biases the projected step towards the memories. A-GEM (methods/agem.py)
replaces the t - 1 constraints by one, on the gradient of the pooled memory; with one finished
task, margin 0 and eps 0 the two take the same step (tests/method/test_method_gem.py).

How it runs here:
- Memory (as A-GEM's, methods/agem.py, whose class this extends): at stage_end of stage t, m
  examples of the stage's training set, sampled with a generator seeded from the run seed and
  the stage. Stage 1 has no memory and is exactly full fine-tuning. The authors keep the last
  n_memories examples seen (a ring buffer); a uniform sample is clbench's choice.
- Reference gradients: at every optimizer step, for each finished task in stream order,
  ref_batch_size examples drawn without replacement from its memory (one generator seeded from
  the run seed and the stage, the same on every process), the whole memory when it holds fewer;
  each gradient is A-GEM's reference_gradient (the loop's lm_loss under stage.autocast(), in
  training mode; several processes compute shares of it and sum them). The authors use a task's
  whole memory (256 examples) at every step: on a language model that is 256 extra forward and
  backward passes per finished task per step, so the default here draws a batch's worth
  (unconfirmed; ref_batch_size = m restores the authors' rule).
- The quadratic program: the Gram matrix M M^T and M g from per-tensor dot products in float64;
  checked first: when no g . g_k < 0, the gradient is left alone (the authors' test). Otherwise
  the dual is solved exactly as a non-negative least-squares problem (u = v - margin >= 0;
  M M^T + eps I = L L^T; scipy.optimize.nnls on L^T u + L^-1 b), eps 1e-3 added to the diagonal
  as the GEM ports do (the authors' quadprog call has none and fails on a singular Gram matrix,
  which t - 1 gradients of a model with 10^8 parameters are not in practice). Written by hand:
  peft and torch have no GEM; scipy supplies the solver.
- after_backward: gradients accumulated over the micro-batches and summed over the ranks, before
  clipping; the projected gradient is written in place into .grad. The optimizer is the loop's
  AdamW: GEM constrains the gradient it is given, not Adam's per-coordinate update (the authors
  use plain SGD at lr 0.1). AdamW stays the default so that a paired difference against full FT
  measures the projection, not the optimizer; `train: {optimizer: sgd}` on the method runs the
  authors' optimizer, recorded per stage in results.json.
- Cost: per optimizer step, t - 1 extra forward and backward passes of ref_batch_size examples,
  and t - 1 gradient-sized float32 buffers held while the hook runs (4 bytes per trained
  parameter each: 0.54 GB per finished task for SmolLM2-135M, 27 GB per finished task for a
  7B model, which is why the peer suites run GEM without sharding). `make bench` does not
  measure it yet.

Options (defaults and sources):
  m 256             examples kept per finished task: the authors' n_memories (run_experiments.sh).
  ref_batch_size    none = the stage's train.batch_size, per finished task (unconfirmed; the
                    authors use the whole memory of each task).
  margin 0.5        the authors' memory_strength (run_experiments.sh, all three benchmarks).
  eps 1e-3          ridge on the Gram matrix's diagonal (the GEM ports'; not in the authors' code).

State: the memory (token ids) and per-stage counts of projected steps, as A-GEM's.
Sharded (distributed.strategy fsdp): the reference gradients are A-GEM's sharded ones (each rank
holds its rows of every g_k, 1/N of the t - 1 buffers); the Gram matrix, M g and |g|^2 are sums of
per-shard partial dots, all-reduced once per step in float64, so every rank solves the same QP and
adds the same M^T v to its own rows. Tested against 1 process as A-GEM (tests/distributed/test_fsdp_methods.py).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import nnls

from clbench.method import register
from clbench_builtin.methods import agem as _agem  # the memory and reference gradients GEM shares


class GemOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    m: int = Field(256, gt=0, description="examples kept per finished task (the authors' n_memories)")
    ref_batch_size: Optional[int] = Field(None, gt=0, description="memory examples per finished task per step "
                                          "(none = train.batch_size; all of a task's memory when it holds fewer)")
    margin: float = Field(0.5, ge=0, description="lower bound of the dual variables (the authors' memory_strength)")
    eps: float = Field(1e-3, ge=0, description="added to the Gram matrix's diagonal (keeps the QP strictly convex)")


def solve_dual(gram: np.ndarray, gdot: np.ndarray, margin: float, eps: float) -> np.ndarray:
    """v = argmin 1/2 v^T (gram + eps I) v + gdot^T v subject to v >= margin (GEM's dual; gram =
    M M^T, gdot = M g). With u = v - margin >= 0 it is min_u>=0 1/2 u^T P u + b^T u, b = P margin +
    gdot, i.e. min_u>=0 |L^T u + L^-1 b|^2 with P = L L^T: non-negative least squares."""
    k = gram.shape[0]
    P = 0.5 * (gram + gram.T) + eps * np.eye(k)
    L = np.linalg.cholesky(P)
    b = P @ np.full(k, margin) + gdot
    y = -np.linalg.solve(L, b)
    u, _ = nnls(L.T, y)
    return u + margin


@register("gem")
class GEM(_agem.AGEM):
    Options = GemOptions

    def reference_sets(self, stage) -> list[list]:
        """Per finished task (stream order), the memory examples of this step's gradient."""
        k = self.options.ref_batch_size or stage.train_config.batch_size
        out = []
        for exs in self.memory.values():
            if k >= len(exs):
                out.append(list(exs))
            else:
                idx = torch.randperm(len(exs), generator=self._draw)[:k].tolist()
                out.append([exs[i] for i in idx])
        return out

    def after_backward(self, model, stage):
        if not self.memory:
            return
        self._steps += 1
        params = [p for p in model.parameters() if p.requires_grad]
        refs = [self.reference_gradient(model, params, exs, stage) for exs in self.reference_sets(stage)]
        n = len(refs)
        gram = np.zeros((n, n))
        gdot = np.zeros(n)
        g2 = 0.0
        for j, p in enumerate(params):
            g = p.grad
            if g is not None:
                g2 += float(_agem._dot(g, g))
            for a in range(n):
                ra = refs[a][j]
                if ra is None:
                    continue
                if g is not None:
                    gdot[a] += float(_agem._dot(g, ra))
                for b in range(a, n):
                    rb = refs[b][j]
                    if rb is not None:
                        gram[a, b] += float(_agem._dot(ra, rb))
        # sharded (fsdp): every rank summed its own rows' products; one all-reduce makes them whole
        sums = _agem.shard_sums(np.concatenate([gram.reshape(-1), gdot, [g2]]), params)
        gram, gdot, g2 = sums[:n * n].reshape(n, n), sums[n * n:n * n + n], float(sums[-1])
        gram = np.triu(gram) + np.triu(gram, 1).T
        violated = bool((gdot < 0).any())
        self.last = {"gdot": gdot.tolist(), "gram": gram.tolist(), "projected": violated}
        self._means.add("violated", float(violated))
        if not violated:
            self._means.add("projected_fraction", 0.0)
            return
        v = solve_dual(gram, gdot, self.options.margin, self.options.eps)
        self.last["v"] = v.tolist()
        self._projected += 1
        # |g~ - g| / |g| with g~ - g = M^T v: |M^T v|^2 = v^T gram v
        moved = math.sqrt(max(float(v @ gram @ v), 0.0))
        self._means.add("projected_fraction", moved / math.sqrt(g2) if g2 > 0 else 0.0)
        for j, p in enumerate(params):
            for a in range(n):
                r = refs[a][j]
                if r is None:
                    continue
                if p.grad is None:  # a parameter the task loss did not reach: its part of g is 0
                    p.grad = torch.zeros_like(p)
                p.grad.add_(r.to(p.grad.dtype), alpha=float(v[a]))

    def stage_stats(self, stage):
        """violated: the fraction of the stage's optimizer steps where some g . g_k < 0 (projected);
        projected_fraction: the mean over its steps of |g~ - g| / |g| (0 on steps left alone).
        None in stage 1 (no memory)."""
        return self._means.means()
