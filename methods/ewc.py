"""EWC, elastic weight consolidation (Kirkpatrick et al. 2017, arXiv 1612.00796), online form.

Online EWC as in Schwarz et al. 2018 (arXiv 1805.06370) and Chaudhry et al. 2018 (EWC++,
arXiv 1801.10112): one accumulated Fisher and one anchor instead of one penalty per task.

Idea: full fine-tuning plus a quadratic penalty that anchors each parameter to its value
after the previous stage, weighted by how much the earlier tasks' likelihood depends on it
(the diagonal of the Fisher information):

    loss = task loss + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2        (stages >= 2)
    F <- gamma * F + F_t after stage t;  theta* = the weights at the end of stage t

How it runs here (no loop change needed):
- Where the Fisher's data comes from: the loop hands every training micro-batch's examples to
  the `batch` hook. EWC keeps the last `fisher_batches` of them (the loop draws batches from
  seeded shuffles of the whole training set, so these are a random sample of the stage's
  training data), collates them as the loop does, and at `stage_end` runs
  its own forward/backward passes over them AT the final weights theta*, with
  torch.autograd.grad (no .grad is touched, no optimizer state). This is the empirical
  Fisher (labels from the data, not sampled from the model) on the stage's training data.
  Rejected alternative: squaring the training gradients in after_backward. They are taken
  at moving weights before theta*, they contain the EWC penalty's own gradient from stage 2
  on, and they are mini-batch means (the square of a mean gradient is not a mean of squared
  per-example gradients, and near a minimum it is close to 0).
- fisher_mode "example" (default): F_t = mean over the sampled examples of (grad of that
  example's loss)^2, one backward per example (Kirkpatrick's per-sample definition). An
  example's loss is the loop's lm_loss on it alone: the mean NLL of its target tokens
  (= the log-likelihood of the answer for a one-token target). Examples without a target
  token are skipped. "batch": F_t = mean over the sampled batches of (grad of the batch
  loss)^2: cheaper, smaller, the choice of many implementations.
- The Fisher passes run in float32 without autocast, in eval mode (no dropout).
- normalize "none" (default) or "max": F_t / max(F_t) over all parameters before
  accumulation (F_t in [0, 1]: lambda no longer depends on the gradients' overall scale).
- theta* is snapshotted at the START of the next stage: the loop only evaluates between
  stage_end and the next stage_start, so these are exactly the weights at the end of the
  previous stage. Hence a checkpoint stores F only, and after a resume the restored model
  provides theta* (the loop restores the weights, then load_state_dict, then stage_start).
- The penalty is computed in float32 outside autocast in extra_loss, once per micro-batch
  (the loop divides each micro-batch's loss by grad_accum, so it acts once per step).
  The reported stage losses include it.
- Parameters: every parameter trains (as full_ft); F and theta* cover every trainable
  parameter by `named_parameters()` name (tied weights once).
- Several processes: the `batch` hook sees the whole micro-batch on every rank, so every rank
  keeps the examples one process would, and computes the same Fisher from them. Sharded
  (fsdp): F and theta* are of each rank's rows; every rank runs the same Fisher passes (the
  backward gives each rank its rows of the gradient), and the penalty is summed over each
  rank's rows.

Memory: two extra float32 copies of the trainable parameters (F and theta*): for
SmolLM2-135M about 2 x 0.54 GB. The penalty's gradient lambda F (theta - theta*) is formed in
its backward from the parameters (a small autograd.Function), so autograd keeps no third
copy; only one parameter-sized temporary exists at a time. Checkpoints hold F (0.54 GB).

Options (defaults and sources):
  ewc_lambda 1.0  (lambda above) unconfirmed: no source fixes it for LMs. 1 is the
                 Laplace-approximation value when both losses are per-example means and the
                 tasks are equally large (the penalty then stands in for the earlier tasks'
                 log-likelihood); in practice lambda is tuned, sweep it over orders of
                 magnitude for a given model and budget.
  gamma 1.0      online decay of earlier Fishers (1 = sum over tasks, Schwarz et al.'s gamma;
                 Kirkpatrick's original keeps one penalty per task with its own anchor,
                 which online EWC replaces by one anchor at the latest weights)
  fisher_batches 8      training micro-batches kept for the Fisher (the last 8 of the stage;
                 fewer if the stage is shorter). Unconfirmed.
  fisher_mode example   see above
  normalize none        see above
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench import distributed as dist
from clbench.masking import gather_rows, is_sharded, local_rows, own_rows
from clbench.method import MethodError, Method, StageMeans, register
from clbench.train import IGNORE, collate, lm_loss


class EwcOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ewc_lambda: float = Field(1.0, ge=0, description="penalty weight (lambda / 2) * sum F (theta - theta*)^2")
    gamma: float = Field(1.0, ge=0, le=1, description="online EWC: F <- gamma * F + F_t")
    fisher_batches: int = Field(8, gt=0, description="last training micro-batches of a stage used for its Fisher")
    fisher_mode: Literal["example", "batch"] = Field("example", description="squared per-example or per-batch gradients")
    normalize: Literal["none", "max"] = Field("none", description="divide each stage's Fisher by its maximum")


def _no_autocast(model):
    return torch.autocast(next(model.parameters()).device.type, enabled=False)


class _Penalty(torch.autograd.Function):
    """(lam / 2) sum F (p - anchor)^2 with the gradient lam F (p - anchor) computed in the
    backward from the parameters themselves: autograd keeps no parameter-sized tensor."""

    @staticmethod
    def forward(ctx, lam, fisher, anchor, *params):
        ctx.lam, ctx.fisher, ctx.anchor = lam, fisher, anchor
        ctx.save_for_backward(*params)
        total = torch.zeros((), dtype=torch.float32, device=params[0].device)
        for f, a, p in zip(fisher, anchor, params):
            total += (f * (p.detach().float() - a).pow_(2)).sum()
        return 0.5 * lam * total

    @staticmethod
    def backward(ctx, grad_out):
        params = ctx.saved_tensors
        grads = []
        for f, a, p in zip(ctx.fisher, ctx.anchor, params):
            if not ctx.needs_input_grad[3 + len(grads)]:
                grads.append(None)
                continue
            grads.append((grad_out * ctx.lam * f * (p.detach().float() - a)).to(p.dtype))
        return (None, None, None, *grads)


@register("ewc")
class EWC(Method):
    Options = EwcOptions

    def __init__(self, options: EwcOptions):
        self.options = options
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.batches: deque = deque(maxlen=options.fisher_batches)
        self.stats: list[dict] = []  # per stage: Fisher samples, mean/max of F_t
        self.pad_id = 0
        self._sharded: dict | None = None
        self._means = StageMeans()  # the stage's penalty / CE (stage_stats)

    def setup(self, model, run):
        self.pad_id = run.tokenizer.pad_token_id if run.tokenizer is not None and run.tokenizer.pad_token_id is not None else 0
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def stage_start(self, model, stage):
        self.batches.clear()
        self._means.reset()
        # fsdp: the sharded parameters (in the forward FSDP swaps in gathered ones), for the penalty
        self._sharded = dict(model.named_parameters()) if is_sharded(model) else None
        if self.fisher:  # theta* = the weights at the end of the previous stage (see docstring)
            params = dict(model.named_parameters())
            missing = sorted(set(self.fisher) - set(params))
            if missing:
                raise MethodError(f"ewc: the Fisher names parameters the model lacks: {missing[:5]}")
            self.fisher = {n: own_rows(f, params[n]).to(local_rows(params[n])[0].device) for n, f in self.fisher.items()}
            self.anchor = {n: local_rows(params[n].detach())[0].float().clone() for n in self.fisher}
        return model

    def batch(self, examples, stage):
        self.batches.append(list(examples))
        return None

    def extra_loss(self, model, batch, stage, out):
        if not self.fisher or self.options.ewc_lambda == 0:
            return None
        pen = self.penalty(model)
        if out is not None:  # per micro-batch, no host sync
            self._means.add("penalty_ratio", StageMeans.share(pen, out.loss))
            self._means.add("penalty", pen)
        return pen

    def stage_stats(self, stage):
        """penalty_ratio: the mean over the stage's micro-batches of penalty / task CE; penalty: its
        mean value (stage 1 has no Fisher yet, hence no penalty and no stats)."""
        return self._means.means()

    def penalty(self, model) -> torch.Tensor:
        """(lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 in float32 (0 before any Fisher).
        Sharded (fsdp): F and theta* are of this rank's rows, the sum is over them, and it is
        returned times the number of ranks: the loop divides an extra loss by it, and the ranks'
        shares add up to the whole penalty (in the logged loss, and in each row's gradient)."""
        sharded = self._sharded is not None
        params = self._sharded or dict(model.named_parameters())
        names = list(self.fisher)
        with _no_autocast(model):
            value = _Penalty.apply(self.options.ewc_lambda, [self.fisher[n] for n in names], [self.anchor[n] for n in names],
                                   *[local_rows(params[n])[0] if sharded else params[n] for n in names])
        return value * dist.world_size() if sharded else value

    def stage_end(self, model, stage):
        head_only = getattr(getattr(stage, "train_config", None), "head_only_targets", True)
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in collate(b, self.pad_id).items()} for b in self.batches]
        f_t, n = self.compute_fisher(model, batches, head_only)
        self.batches.clear()
        if n == 0:
            raise MethodError(f"ewc stage {stage.stage}: no training batch with a target token to estimate the Fisher from")
        mine = (sum(f.numel() for f in f_t.values()), float(sum(f.sum() for f in f_t.values())),
                max((float(f.max()) for f in f_t.values() if f.numel()), default=0.0))
        parts = dist.gather(mine) if self._sharded is not None else [mine]  # fsdp: over every rank's rows
        total, top = sum(x[0] for x in parts), max(x[2] for x in parts)
        self.stats.append({"stage": stage.stage, "samples": n,  # of the raw F_t, before normalisation
                           "mean": sum(x[1] for x in parts) / max(1, total), "max": top})
        if self.options.normalize == "max" and top > 0:
            f_t = {k: f / top for k, f in f_t.items()}
        g = self.options.gamma
        self.fisher = {k: (g * self.fisher[k] + f if k in self.fisher else f) for k, f in f_t.items()}
        return model

    def compute_fisher(self, model, batches, head_only_targets: bool = True) -> tuple[dict[str, torch.Tensor], int]:
        """Diagonal empirical Fisher at the current weights over `batches`: the mean of squared
        gradients per example ("example") or per batch ("batch"). Returns (F, samples used)."""
        sharded = is_sharded(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise MethodError("ewc: no trainable parameter to compute the Fisher for")
        names, params = zip(*named)
        fisher = {n: torch.zeros_like(local_rows(p.detach())[0], dtype=torch.float32) for n, p in named}
        was_training = model.training
        model.eval()
        count = 0

        def gradients(loss):
            if not sharded:
                return torch.autograd.grad(loss, params, allow_unused=True)
            # fsdp: every rank runs the same sample, the backward sums the ranks' gradients into each
            # rank's rows: divided by the number of ranks, the sample's gradient on this rank's rows
            loss.backward()
            out = [None if p.grad is None else local_rows(p.grad)[0] / dist.world_size() for p in params]
            for p in params:
                p.grad = None
            return out

        def accumulate(sub):
            nonlocal count
            if not bool((sub["labels"][:, 1:] != IGNORE).any()):
                return
            with _no_autocast(model):
                loss = lm_loss(model, sub, head_only_targets)
            for n, g in zip(names, gradients(loss)):
                if g is not None:
                    fisher[n].add_(g.detach().float().pow(2))
            count += 1

        try:
            for b in batches:
                if self.options.fisher_mode == "batch":
                    accumulate(b)
                    continue
                lengths = b["attention_mask"].sum(1).tolist()
                for i, L in enumerate(lengths):
                    accumulate({k: v[i:i + 1, :int(L)] for k, v in b.items()})
        finally:
            model.train(was_training)
        if count:
            for f in fisher.values():
                f.div_(count)
        return fisher, count

    def fsdp_refusal(self):
        return None  # F and theta* of this rank's rows; every rank runs the same Fisher samples

    def state_dict(self):
        """F; under fsdp gathered from every rank's rows (a collective), so the state is one process's."""
        whole = gather_rows if self._sharded is not None else (lambda t: t.cpu())
        return {"fisher": {k: whole(v) for k, v in self.fisher.items()}, "stats": list(self.stats)}

    def load_state_dict(self, state):
        self.fisher = dict(state.get("fisher", {}))
        self.stats = list(state.get("stats", []))
        self.anchor = {}  # taken from the restored weights at the next stage_start
