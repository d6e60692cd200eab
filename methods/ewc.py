"""EWC, elastic weight consolidation (Kirkpatrick et al. 2017, arXiv 1612.00796), online form.

Online EWC as in Schwarz et al. 2018 (arXiv 1805.06370) and Chaudhry et al. 2018 (EWC++,
arXiv 1801.10112): one accumulated Fisher and one anchor instead of one penalty per task.

Idea: full fine-tuning plus a quadratic penalty that anchors each parameter to its value
after the previous stage, weighted by how much the earlier tasks' likelihood depends on it
(the diagonal of the Fisher information):

    loss = task loss + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2        (stages >= 2)
    F <- gamma * F + F_t after stage t;  theta* = the weights at the end of stage t

How it runs here (no loop change needed):
- Where the Fisher's data comes from (option fisher_source): "sample" (default) draws
  fisher_batches x train.batch_size examples uniformly without replacement from the stage's
  whole training set (seeded from the run seed and the stage, the same on every rank), in
  micro-batches of train.batch_size; "last_batches" keeps, through the `batch` hook, the last
  fisher_batches micro-batches the loop trained on (this file's earlier default). Both are
  then collated as the loop does, and at `stage_end` EWC runs its own forward/backward passes
  over them AT the final weights theta*, with torch.autograd.grad (no .grad is touched, no
  optimizer state). This is the empirical Fisher (labels from the data, not sampled from the
  model) on the stage's training data. Why "sample": the last micro-batches are the ones the
  optimizer has just descended on, so their gradients, and the Fisher, are biased low; a draw
  over the whole training set (seen early, late, or not at all in a step-budgeted stage)
  estimates the task's Fisher at theta*, which is what Kirkpatrick et al. compute.
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
  ewc_lambda 1000.0  (lambda above) no source fixes it for LMs: papers on LLMs sweep it over
                 orders of magnitude (1e2-1e6 on a mean Fisher). 1 (this file's earlier default,
                 the Laplace-approximation value when both losses are per-example means and the
                 tasks are equally large) made the penalty ~1e-5 of the task loss: EWC was full
                 fine-tuning. Chosen by measuring the penalty's share, method_stats.penalty_ratio
                 (the mean over a stage's micro-batches of penalty / task CE), at several lambdas
                 from the same stage-1 state (per-example Fisher of 64 examples drawn from stage
                 1's training set):
                   SmolLM2-135M-Instruct, configs/demo.yaml (cls3_gen; lr 1e-4 constant, batch 8),
                   stage 2 (sms_spam_gen) after stage 1 (trec_gen), 20 steps (a demo stage):
                     lambda 1e3: 0.22 | 1e4: 1.4 (the penalty outweighs the task loss)
                   the first 8 steps: 1: 2.7e-5, 1e2: 2.3e-3, 1e3: 0.018, 1e4: 0.16
                   (.venv/bin/python bench/ewc_lambda.py --steps 20 --lambdas 1e3,1e4, and
                   --steps 8 --lambdas 1,1e2,1e3,1e4; stage 1 about 90 s, a lambda 30-70 s on an
                   idle 2-core CPU). A mean of per-micro-batch ratios: late in a stage the task CE
                   is small (0.05 here) and the ratio large, so it weighs the stage's end.
                   the tiny model, configs/tiny.yaml (20 steps a stage, lr 3e-3), stages 2 / 3:
                     1: 8e-4 / 6e-4 | 1e2: 0.016 / 0.015 | 1e4: 0.073 / 0.098 | 1e5: 0.48 / 0.84 |
                     1e6: 3.1 / 6.9   (clbench run configs/tiny.yaml --set 'methods=[{name: ewc,
                     options: {ewc_lambda: L}}]', results.json stages[i].method_stats)
                 1e3 makes the penalty about a fifth of the loss over a demo-length stage of the
                 real model (the share grows as the weights leave theta*: 0.018 over the first 8
                 steps), a regulariser that acts without dominating. It is a starting point on
                 this scale, not a tuned value: the share depends on the model, the lr, the stage
                 length and the Fisher's scale (normalize: max changes it entirely); tune lambda
                 (clbench tune) and read penalty_ratio in results.json.
  gamma 1.0      online decay of earlier Fishers (1 = sum over tasks, Schwarz et al.'s gamma;
                 Kirkpatrick's original keeps one penalty per task with its own anchor,
                 which online EWC replaces by one anchor at the latest weights)
  fisher_batches 8      micro-batches (of train.batch_size examples) the Fisher is estimated on:
                 with per-example Fisher, 8 x batch_size backward passes at the stage end.
                 Unconfirmed.
  fisher_source sample  see above; "last_batches" for the last fisher_batches trained on
                 (fewer if the stage is shorter).
  fisher_mode example   see above
  normalize none        see above
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.data.examples import IGNORE, collate
from clbench.distributed import collectives
from clbench.method import MethodError, Method, StageMeans, register
from clbench.method.lm import lm_loss
from clbench.method.masking import derive_seed, gather_rows, reshard, local_rows, own_rows


SALT_FISHER = 51  # the seeded draw of the Fisher's examples


class EwcOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ewc_lambda: float = Field(1000.0, ge=0, description="penalty weight (lambda / 2) * sum F (theta - theta*)^2 "
                                                        "(chosen by its measured share of the loss: see the docstring)")
    gamma: float = Field(1.0, ge=0, le=1, description="online EWC: F <- gamma * F + F_t")
    fisher_batches: int = Field(8, gt=0, description="micro-batches of a stage's training data its Fisher is estimated on")
    fisher_source: Literal["sample", "last_batches"] = Field(
        "sample", description="sample: a seeded draw from the stage's training set; last_batches: the last micro-batches trained on")
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
        self._sharded = dict(model.named_parameters()) if reshard(model) else None
        if self.fisher:  # theta* = the weights at the end of the previous stage (see docstring)
            params = dict(model.named_parameters())
            missing = sorted(set(self.fisher) - set(params))
            if missing:
                raise MethodError(f"ewc: the Fisher names parameters the model lacks: {missing[:5]}")
            self.fisher = {n: own_rows(f, params[n]).to(local_rows(params[n])[0].device) for n, f in self.fisher.items()}
            self.anchor = {n: local_rows(params[n].detach())[0].float().clone() for n in self.fisher}
        return model

    def batch(self, examples, stage):
        if self.options.fisher_source == "last_batches":
            self.batches.append(list(examples))
        return None

    def fisher_examples(self, stage) -> list[list]:
        """The micro-batches (lists of examples) the stage's Fisher is estimated on."""
        if self.options.fisher_source == "last_batches":
            return [list(b) for b in self.batches]
        examples = list(stage.examples)
        bs = max(1, int(getattr(stage.train_config, "batch_size", 8) or 8))
        n = min(len(examples), self.options.fisher_batches * bs)
        gen = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, SALT_FISHER))
        chosen = [examples[i] for i in torch.randperm(len(examples), generator=gen)[:n].tolist()]
        return [chosen[i:i + bs] for i in range(0, n, bs)]

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
        return value * collectives.world_size() if sharded else value

    def stage_end(self, model, stage):
        head_only = getattr(getattr(stage, "train_config", None), "head_only_targets", True)
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in collate(b, self.pad_id).items()} for b in self.fisher_examples(stage)]
        f_t, n = self.compute_fisher(model, batches, head_only)
        self.batches.clear()
        if n == 0:
            raise MethodError(f"ewc stage {stage.stage}: no training batch with a target token to estimate the Fisher from")
        mine = (sum(f.numel() for f in f_t.values()), float(sum(f.sum() for f in f_t.values())),
                max((float(f.max()) for f in f_t.values() if f.numel()), default=0.0))
        parts = collectives.gather(mine) if self._sharded is not None else [mine]  # fsdp: over every rank's rows
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
        sharded = reshard(model)
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
            out = [None if p.grad is None else local_rows(p.grad)[0] / collectives.world_size() for p in params]
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
