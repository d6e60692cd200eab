"""KS-Lottery (Yuan et al. 2024, arXiv 2402.02801): find the few token embeddings that matter.

Idea: fine-tune only the token-embedding matrix once, then ask per token row whether its
values moved in distribution (a two-sample Kolmogorov-Smirnov test between the row before and
after); only the rows that did (a "winning ticket" of a handful of tokens) are then tuned,
starting again from the original embeddings. The paper finds that tuning a few dozen token
embeddings of LLaMA matches full fine-tuning on translation.

Each stage (stage_start, then the loop's training):
  1. E = a copy of the input embedding matrix.
  2. First pass: train ONLY the embedding, densely, weight decay 0 (stage.calibrate, the loop's
     own training loop) -> E'.
  3. Per row j: KS test between the d values of E_j and E'_j (two-sided, as
     scipy.stats.ks_2samp(E_j, E'_j) with its default method). Rows with p < alpha are
     selected (or the n rows with the largest statistic, option n).
     Speed: only rows that changed are tested (unchanged rows have D = 0, p = 1). The
     statistic D is computed for all changed rows at once in torch (sorted rows +
     searchsorted, exactly scipy's definition, ties included); with equal sample sizes
     d, D = k/d, and the p-value depends only on (D, d, d), so scipy is called once per
     distinct k (at most d + 1 calls) on two samples with that statistic.
     Under fsdp (rows split over the ranks) each rank tests its own rows; the top-n and the
     min_rows top-up are exact over all rows (clbench.method.masking.topk_masks), so the selected
     rows are those of one process.
  4. Reset E, then train only the selected rows (a row mask on the embedding,
     clbench.method.masking.MaskedUpdate; everything else frozen).

Tied embeddings: SmolLM2 and the tiny model tie the input embedding to the output head;
named_parameters() lists the tied weight once (as the embedding), so the first pass also
trains it in its role as the output head (which moves every row; option rows below), and
the row mask then also applies to the head's rows: with tied weights "tuning the token
embeddings" means tuning those tokens' input and output vectors. Untied models: only the
input embedding is considered.

Options:
  alpha              0.05: significance level (unconfirmed: the paper's alpha; 0.05 is typical).
  n                  null: select the n rows with the largest KS statistic instead of p < alpha
                     (ties broken by lower token id).
  min_rows           1: if fewer rows pass the test, top up with the largest-statistic rows
                     (ours: a stage with nothing to train cannot run in the loop).
  calibration_steps  null = the stage's steps (unconfirmed: the paper's first pass trains to
                     convergence on the task).
  calibration_lr     null = the stage's lr (unconfirmed).
  rows               seen: test only the rows of tokens that occur in the stage's training
                     examples; all: every row that moved. Ours. In the paper's setting (LLaMA,
                     untied embeddings, Adam, no weight decay) only those rows get a gradient, so
                     both give the same candidates. With tied weights every row gets a gradient
                     through the head and Adam moves each by about lr per coordinate, so "all"
                     tests rows the paper never could. Measured on SmolLM2-135M, trec, 5 steps at
                     lr 1e-2: 3,300 seen rows were tested, max D 0.068, min p 0.14, so no row passes
                     alpha 0.05.
Learning at a short budget (measured; no default makes it learn there). The earlier cls4 study's
tuning (a tune file since removed) on SmolLM2-135M-Instruct, 5 steps of 8 examples, trec's validation
split (40 examples, base model 0.300): lr 1e-2 with n 100 / 1000 scored 0.125 / 0.300, lr 3e-2
0.275 / 0.325 (the winner, used by the study). A wider probe (same protocol, --select-only): lr 1e-1
0.325 / 0.225 and lr 3e-1 0.350 / 0.350 with n 1000 / 3000, the training loss rising (11.2 -> 29
at 1e-1, -> 48 and 81 at 3e-1): a few embedding rows of a tied-embedding model, trained for 5
steps, do not move the task's score beyond noise, and larger steps diverge. The study's test runs
were flagged "did not learn" (the earlier study at that budget, docs/study.md). The paper trains its embedding pass to
convergence on translation data; this benchmark's budget is far shorter.
The sparse stage uses the loop's optimizer settings (weight decay only on the selected rows).
Not implemented: the paper's "partial transfer" (copy the selected rows of E' instead of
retraining them).
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.distributed import collectives
from clbench.method import MethodError, register
from clbench.method.masking import MaskedMethod, MaskedUpdate, reshard, local_rows, sum_over_ranks, topk_masks


class KsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.05, gt=0, lt=1, description="select rows with KS p-value < alpha")
    n: Optional[int] = Field(None, gt=0, description="select the n rows with the largest KS statistic instead")
    min_rows: int = Field(1, ge=1, description="select at least this many rows (largest statistic first)")
    calibration_steps: Optional[int] = Field(None, gt=0, description="steps of the embedding-only pass (null = the stage's steps)")
    calibration_lr: Optional[float] = Field(None, gt=0, description="lr of the embedding-only pass (null = the stage's lr)")
    rows: Literal["seen", "all"] = Field(
        "seen", description="seen: test only the rows of tokens in the stage's training data; all: every row that moved")


def ks_counts(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Row-wise two-sample KS statistic of equal-length rows, as integers k = D * d."""
    out = []
    for i in range(0, a.shape[0], chunk):
        sa = torch.sort(a[i:i + chunk].float(), dim=1).values
        sb = torch.sort(b[i:i + chunk].float(), dim=1).values
        both = torch.cat([sa, sb], dim=1)
        ca = torch.searchsorted(sa, both, right=True)
        cb = torch.searchsorted(sb, both, right=True)
        out.append((ca - cb).abs().amax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=a.device)


def ks_pvalues(k: torch.Tensor, d: int) -> torch.Tensor:
    """p-value of scipy.stats.ks_2samp for statistic k/d with two samples of size d."""
    from scipy.stats import ks_2samp

    x = np.arange(d, dtype=np.float64)
    table = {int(u): float(ks_2samp(x, x + int(u)).pvalue) for u in torch.unique(k).tolist()}
    return torch.tensor([table[int(u)] for u in k.tolist()], dtype=torch.float64)


def ks_rows(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(statistic D, p-value) per row and the number of rows tested: only changed rows are
    tested (unchanged rows: D=0, p=1)."""
    rows, d = before.shape
    D = torch.zeros(rows, dtype=torch.float64, device=before.device)
    p = torch.ones(rows, dtype=torch.float64, device=before.device)
    changed = (before != after).any(dim=1).nonzero().flatten()
    if changed.numel():
        k = ks_counts(before[changed], after[changed])
        D[changed] = k.double() / d
        p[changed] = ks_pvalues(k, d).to(p.device)  # scipy's p-values come back on the CPU
    return D, p, changed.numel()


def seen_tokens(examples) -> set[int]:
    """The token ids of a stage's training examples (prompt and target: every position is an input)."""
    out: set[int] = set()
    for ex in examples:
        out.update(ex.input_ids)
    return out


def select_rows(D: torch.Tensor, p: torch.Tensor, alpha: float, n: Optional[int], min_rows: int, d: int,
                sharded: bool = False, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The selected rows of this rank's rows (all rows unless `sharded`): p < alpha, or the n of
    largest statistic, topped up to min_rows by the largest statistic; ties to the lower token
    id. The top-n over all shards is exact (clbench.method.masking.topk_masks on the integer statistic
    D * d, which float32 holds exactly), so the rows are the same at any number of processes."""
    score = (D * d).round().to(torch.float32)
    if candidates is not None:  # rows outside the candidates never pass the test and are never in the top n
        score = torch.where(candidates, score, torch.zeros_like(score))
        p = torch.where(candidates, p, torch.ones_like(p))

    def top(count):
        return topk_masks({"rows": score}, [["rows"]], [count], sharded=sharded)["rows"]

    sel = p < alpha if n is None else top(n) if candidates is None else top(n) & candidates & (score > 0)
    picked = torch.tensor([int(sel.sum())])
    if sharded:
        sum_over_ranks(picked)
    if int(picked) < min_rows:
        sel |= top(min_rows)
    return sel


@register("ks_lottery")
class KSLottery(MaskedMethod):
    Options = KsOptions

    def __init__(self, options: KsOptions):
        self.options = options
        self.update: MaskedUpdate | None = None
        self.selected: list[list[int]] = []  # per stage: the selected token ids
        self.stats: list[dict] = []

    def setup(self, model, run):
        emb = model.get_input_embeddings().weight
        names = [n for n, p in model.named_parameters() if p is emb]
        if not names:
            raise MethodError("ks_lottery: the input embedding is not among the model's parameters")
        self.emb_name = names[0]
        return model

    def stage_start(self, model, stage):
        o = self.options
        sharded = reshard(model)  # fsdp: this rank holds some rows of the embedding
        emb = dict(model.named_parameters())[self.emb_name]
        E0 = emb.detach().clone()
        self.update = None
        MaskedUpdate.whole([self.emb_name]).apply(model)
        # The paper's first pass has no weight decay.
        stage.calibrate(model, steps=o.calibration_steps, lr=o.calibration_lr, weight_decay=0.0)
        with torch.no_grad():
            (before, first), after = local_rows(E0), local_rows(emb.detach())[0]
            D, p, tested = ks_rows(before, after)
            if o.rows == "seen":
                keep = torch.zeros(before.shape[0], dtype=torch.bool, device=D.device)
                ids = torch.tensor(sorted(seen_tokens(stage.examples)), dtype=torch.long) - first
                ids = ids[(ids >= 0) & (ids < before.shape[0])]  # this rank's rows (all rows unless fsdp)
                keep[ids.to(D.device)] = True
                tested = int(((before != after).any(dim=1) & keep).sum())
                D, p = torch.where(keep, D, torch.zeros_like(D)), torch.where(keep, p, torch.ones_like(p))
            else:
                keep = None
            sel = select_rows(D, p, o.alpha, o.n, o.min_rows, before.shape[1], sharded, candidates=keep)
            emb.copy_(E0)
        del E0
        mine = (first, (sel.nonzero().flatten() + first).tolist(), tested, float(p.min()) if p.numel() else 1.0,
                float(D.max()) if D.numel() else 0.0)
        parts = sorted(collectives.gather(mine)) if sharded else [mine]  # rows in rank order: token ids ascending
        ids = [i for part in parts for i in part[1]]
        self.selected.append(ids)
        self.stats.append({"stage": stage.stage, "rows": len(ids), "tested": sum(part[2] for part in parts),
                           "min_p": min(part[3] for part in parts), "max_D": max(part[4] for part in parts)})
        self.update = MaskedUpdate({self.emb_name: sel.view(-1, 1)}, sharded=sharded)
        return self.update.apply(model)

    def fsdp_refusal(self):
        return None  # the test and selection run on this rank's rows; the top-n is exact over all shards

    def state_dict(self):
        return {"selected": self.selected, "stats": self.stats}

    def load_state_dict(self, state):
        self.selected = state["selected"]
        self.stats = state.get("stats", [])
