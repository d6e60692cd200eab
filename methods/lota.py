"""LoTA, Lottery Ticket Adaptation (Panda et al. 2024, arXiv 2406.16797), and LoTTO.

LoTTO is LoTA for sequential tasks (same paper).

Idea: a short dense calibration run finds which weights a task wants to move; only the
largest-moving entries (a sparse "lottery ticket" mask) are then trained, from the original
weights. With LoTTO each new task gets a mask disjoint from the earlier tasks' masks, so
training a later task cannot overwrite what an earlier one learned, and the sparse task
vectors add up without interference.

Each stage (stage_start, then the loop's training with the mask):
  1. theta_0 = a copy of every parameter (the state before calibration).
  2. Calibration: dense training of all parameters with the loop's own training loop
     (stage.calibrate) -> theta_c.
  3. Task vector delta = theta_c - theta_0 in float32 on the candidate matrices: the
     attention and MLP projections q,k,v,o,gate,up,down. Embeddings, lm_head and norms
     are frozen.
  4. ONE global threshold over all candidates: k = round((1 - sparsity) * N) entries with the
     largest |delta| are trainable. Ties at the threshold: exactly k entries, the ties at the
     lowest positions (candidate order, then row-major), found by clbench.method.masking.topk_masks
     without gathering the scores, so the mask is the same for sharded parameters
     (distributed.strategy fsdp) at any number of processes. The authors' code keeps
     |delta| >= tau, which can keep a few more than k on ties; the k-th largest |delta| must be
     > 0 (as they assert).
  5. LoTTO (option lotto): |delta| = 0 on the union of earlier stages' trainable entries before
     the top-k, so the stages' masks are pairwise disjoint.
  6. Reset EVERY parameter to theta_0 (calibration moved all of them), then train only the
     mask (clbench.method.masking.MaskedUpdate keeps frozen entries bit-identical under AdamW with
     weight decay; the authors use RMSprop without weight decay, any optimizer keeps the
     invariant).
At stage_end the stage's sparse task vector (final - start on the mask) is kept;
under fsdp masks and task vectors are of this rank's shards;
`lota_additive_merge(theta_0, method.task_vectors)` returns theta_0 + sum_t delta_t.

Options:
  sparsity           0.9: fraction of candidate entries frozen (paper default; the authors'
                     continual-learning example uses 0.99).
  calibration_steps  null = the stage's own steps (the authors reuse a full fine-tuning run;
                     a third-party reimplementation uses 100 AdamW steps). Calibration thus
                     doubles the training cost of a stage.
  calibration_lr     null = the stage's lr (unconfirmed: the authors reuse the full-FT lr).
  lotto              true: disjoint masks across stages (LoTTO). false: plain LoTA per stage.
  targets            the candidate module names (paper: attention and MLP projections).

Optimizer and lr: the authors' continual-learning script (rlaif/scripts/continual_learning.sh)
trains full FT and LoTA with the same script and optimizer (RMSprop, gradient-norm clip 1) and
gives LoTA's sparse phase 20x full FT's lr (1e-5 against 5e-7). LoTA names no optimizer here
(the loop's AdamW, as the full FT it is compared with; `train.optimizer: rmsprop` runs the
authors' one), and its lr is the config's: a sparse method at a dense method's lr learns less,
so compare it at its own tuned lr (configs/tune/study-seeds.yaml searches up to 20x full FT's).

Unconfirmed: the calibration length and lr for this benchmark's budget; weight decay during
sparse training (the loop's weight_decay, applied to trainable entries only).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.method.masking import (MaskedMethod, MaskedUpdate, copy_params, gather_rows, reshard, local_rows, own_rows, pack_mask,
                             restore, sum_over_ranks, topk_masks, unpack_mask)
from clbench.method import MethodError, register

CANDIDATES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LotaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sparsity: float = Field(0.9, ge=0, lt=1, description="fraction of candidate entries frozen")
    calibration_steps: Optional[int] = Field(None, gt=0, description="dense calibration steps (null = the stage's steps)")
    calibration_lr: Optional[float] = Field(None, gt=0, description="calibration lr (null = the stage's lr)")
    lotto: bool = Field(True, description="LoTTO: each stage's mask avoids every earlier stage's mask")
    targets: list[str] = Field(default_factory=lambda: list(CANDIDATES), min_length=1, description="candidate module names")


def candidate_names(model: torch.nn.Module, targets) -> list[str]:
    pat = re.compile(r"(?:^|\.)(" + "|".join(map(re.escape, targets)) + r")\.weight$")
    return [n for n, p in model.named_parameters() if p.ndim == 2 and pat.search(n)]


def lota_additive_merge(base_state: Mapping[str, torch.Tensor], deltas) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t delta_t. `deltas`: one dict per stage, name -> (bool mask, values on the
    mask) as in LoTA.task_vectors. Tensors of base_state without a delta are copied."""
    out = {n: v.detach().clone() for n, v in base_state.items()}
    for d in deltas:
        for n, (mask, values) in d.items():
            t = out[n]
            mask = mask.to(t.device)
            t[mask] = t[mask] + values.to(device=t.device, dtype=t.dtype)
    return out


@register("lota")
class LoTA(MaskedMethod):
    Options = LotaOptions

    def __init__(self, options: LotaOptions):
        self.options = options
        self.update: MaskedUpdate | None = None
        self.candidates: list[str] = []
        self.masks: list[dict[str, torch.Tensor]] = []  # per stage: name -> bool mask (True = trained)
        self.task_vectors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # per stage: name -> (mask, final - start on the mask)
        self.used: dict[str, torch.Tensor] = {}  # union of earlier stages' masks (LoTTO)
        self.calibration_stats: list[dict] = []
        self._start: dict[str, torch.Tensor] = {}
        self._sharded = False  # fsdp: masks and task vectors of this rank's rows

    def setup(self, model, run):
        self.candidates = candidate_names(model, self.options.targets)
        if not self.candidates:
            raise MethodError(f"lota: no parameter matches the targets {self.options.targets}")
        return model

    def stage_start(self, model, stage):
        o = self.options
        sharded = self._sharded = reshard(model)  # fsdp: this rank's rows of every parameter
        if sharded:
            self._own_rows(model)
        theta0 = copy_params(model)  # every parameter: calibration moves them all
        self.update = None
        for p in model.parameters():
            p.requires_grad_(True)
        stats = stage.calibrate(model, steps=o.calibration_steps, lr=o.calibration_lr)
        self.calibration_stats.append({k: v for k, v in (stats or {}).items() if k != "losses"})

        reshard(model)
        params = dict(model.named_parameters())
        scores = {}
        with torch.no_grad():
            for n in self.candidates:  # this rank's rows under fsdp
                s = (local_rows(params[n].detach())[0].float() - local_rows(theta0[n])[0].float()).abs_()
                if o.lotto and n in self.used:
                    s.masked_fill_(self.used[n].to(s.device), 0.0)  # restored masks come back on the CPU
                scores[n] = s
            counts = torch.tensor([sum(s.numel() for s in scores.values()), sum(int((s > 0).sum()) for s in scores.values())])
            if sharded:
                sum_over_ranks(counts)
        N, moved = counts.tolist()
        k = round((1 - o.sparsity) * N)
        if not 0 < k <= moved:
            raise MethodError(
                f"lota stage {stage.stage}: the {k}-th largest calibration change is 0 (only {moved} candidate entries "
                f"moved{' outside earlier stages masks' if o.lotto else ''}); raise sparsity or calibration_steps")
        masks = topk_masks(scores, [self.candidates], [k], sharded=sharded)
        del scores

        restore(model, theta0)
        self._start = {n: local_rows(theta0[n])[0][m] for n, m in masks.items()}
        del theta0
        if o.lotto:
            for n, m in masks.items():
                self.used[n] = self.used[n].to(m.device) | m if n in self.used else m.clone()
        self.masks.append(masks)
        self.update = MaskedUpdate(masks, sharded=sharded)
        return self.update.apply(model)

    @torch.no_grad()
    def stage_end(self, model, stage):
        params = dict(model.named_parameters())
        masks = self.masks[-1]
        self.task_vectors.append({n: (m, local_rows(params[n].detach())[0][m] - self._start[n]) for n, m in masks.items()})
        self._start = {}
        return model

    def fsdp_refusal(self):
        return None  # scores, masks and task vectors of this rank's rows; one exact threshold over all shards

    def _own_rows(self, model):
        """fsdp: masks and task vectors restored from a checkpoint are whole; keep this rank's rows
        (the values on a mask are in row-major order, so a rank's are one contiguous run)."""
        params = dict(model.named_parameters())
        for t, masks in enumerate(self.masks):
            for n, m in list(masks.items()):
                mine = own_rows(m, params[n])
                if mine.shape != m.shape:
                    first = local_rows(params[n])[1]
                    start = int(m[:first].sum())
                    masks[n] = mine
                    if t < len(self.task_vectors):
                        self.task_vectors[t][n] = (mine, self.task_vectors[t][n][1][start:start + int(mine.sum())])
        self.used = {n: own_rows(m, params[n]) for n, m in self.used.items()}

    def state_dict(self):
        """Masks packed as bits (a 10% mask of SmolLM2-135M's 106M candidate entries: 13 MB
        packed, 106 MB as bool); task-vector values as float32 on the mask. Under fsdp both are
        gathered from every rank's rows (a collective), so the state is one process's."""
        whole = gather_rows if self._sharded else (lambda t: t)
        return {"masks": [{n: pack_mask(whole(m)) for n, m in masks.items()} for masks in self.masks],
                "values": [{n: whole(v) for n, (_, v) in tv.items()} for tv in self.task_vectors],
                "calibration_stats": self.calibration_stats}

    def load_state_dict(self, state):
        self.masks = [{n: unpack_mask(m) for n, m in masks.items()} for masks in state["masks"]]
        self.task_vectors = [{n: (masks[n], v) for n, v in values.items()} for masks, values in zip(self.masks, state["values"])]
        self.used = {}
        if self.options.lotto:
            for masks in self.masks:
                for n, m in masks.items():
                    self.used[n] = self.used[n] | m if n in self.used else m.clone()
        self.calibration_stats = state.get("calibration_stats", [])
