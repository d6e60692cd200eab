"""O-LoRA, orthogonal subspace learning (Wang et al. 2023, arXiv 2310.14152).

Code: cmnfriend/O-LoRA (src/uie_trainer_lora.py: the loss; src/peft/tuners/lora.py: the layer).

Idea: every task gets its own LoRA adapter. Earlier tasks' adapters stay in the forward
pass, frozen; the new task's adapter is pushed into a subspace orthogonal to theirs by a
penalty on the overlap of the A (down-projection) matrices, so learning the new task
disturbs the directions the old ones use as little as possible.

    h = W x + sum_{s <= t} (alpha / r) B_s A_s x          (stage t; only A_t, B_t train)
    loss = task loss + lambda1 * sum_modules sum_{s < t} sum_ij |(A_s A_t^T)_ij|
                     + lambda2 * sum_{P in {A_t, B_t}, modules} ||P||_F

How it runs here (peft multi-adapter, no merging):
- setup wraps the model with peft and creates ONE adapter per stage of the stream up front
  (`stage1`, `stage2`, ...; LoraConfig each, A kaiming-uniform as peft initialises it, B = 0).
  Creating them all at setup keeps the parameter set fixed for the whole run, so stage
  checkpoints (diffs against the post-setup model) restore exactly on resume.
- stage_start(t): `base_model.set_adapter([...the trained adapters..., "stage<t>"])` makes the
  adapters of the stages this run has trained (1..t-1 in the stream; none in mode single,
  where every stage is a fresh run from the base model) and adapter t active: peft's LoRA layer sums the outputs of every active adapter, each with its own
  scaling alpha / r, which is what O-LoRA's modified layer computes (it keeps the earlier
  adapters concatenated as one rank-r_sum lora_A/lora_B and adds loranew_B loranew_A with the
  same scaling). Then requires_grad is True on adapter t only: the earlier adapters (and the
  base weights) get no gradient and never reach the optimizer, so they stay bit-identical.
  Adapters of later stages exist but are inactive (not in the forward) and frozen.
- extra_loss: the penalty above, computed in float32 outside autocast; the loop adds it to
  each micro-batch's loss before dividing by grad_accum, so per optimizer step it acts once
  with weight lambda1, as in the authors' runs: their trainer (src/uie_trainer_lora.py
  training_step) divides only the task loss by gradient_accumulation_steps when DeepSpeed is
  off, but every script runs under DeepSpeed (scripts/*.sh, --deepspeed), whose backward divides
  the whole loss, penalty included, by the accumulation steps (their T5 scripts accumulate 1).
  Their code takes the abs-sum of A_prev A_t^T with A_prev the row-wise concatenation of all
  earlier A's; that equals the sum over earlier adapters s of the abs-sums of A_s A_t^T,
  which is what is computed here.
  The penalty runs over trained adapters only: stage 1, and every stage in mode single, has
  none (an untrained adapter's random A would only push the single-task reference away from
  plain LoRA); no penalty then, unless lambda2 > 0.
- The reported stage losses include the penalty.

Options (defaults and sources):
  r 8                    O-LoRA code (hard-coded r=8)
  alpha 32               O-LoRA code (src/run_uie_lora.py:381 and :394, lora_alpha=32 hard-coded;
                         scale alpha / r = 4). The lora baseline here uses 16.
  dropout 0.1            O-LoRA code (the same LoraConfig, lora_dropout=0.1). peft gives every
                         adapter its own dropout module, O-LoRA shares one dropout of x
                         between old and new adapters (same values in eval; in training the
                         frozen adapters see a different dropout mask). Unconfirmed equivalence.
  target_modules [q_proj, v_proj]   O-LoRA's code builds its LoraConfig without target
                         modules, so peft's defaults apply: attention q and v (T5: q, v;
                         LLaMA: q_proj, v_proj)
  lambda1 0.5            O-LoRA scripts (--lamda_1 0.5)
  lambda2 0.0            O-LoRA scripts (--lamda_2 0): L2 term sum of Frobenius norms (not
                         squared, as their code) of the current adapter's A and B

Memory: T adapters (one per stage) exist from setup; only the current one has gradients
and optimizer state. trainable_params reports the current adapter's entries.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.distributed.fsdp import full
from clbench.method import MethodError, Method, StageMeans, register


class OLoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="rank of each stage's adapter")
    alpha: float = Field(32, gt=0, description="scaling numerator (scale = alpha / r); O-LoRA's code: 32")
    dropout: float = Field(0.1, ge=0, lt=1, description="adapter dropout (O-LoRA's code: 0.1)")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                                                   description="adapted modules (O-LoRA: q and v)")
    lambda1: float = Field(0.5, ge=0, description="weight of the orthogonality penalty sum |A_prev A_t^T|")
    lambda2: float = Field(0.0, ge=0, description="weight of the L2 term on the current adapter (Frobenius norms)")


def adapter_name(stage: int) -> str:
    return f"stage{stage}"


def lora_layers(model):
    """peft LoRA layers (modules holding lora_A/lora_B ModuleDicts)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _no_autocast(model):
    return torch.autocast(next(model.parameters()).device.type, enabled=False)


def orthogonality_penalty(model, current: str, previous: list[str]) -> torch.Tensor | None:
    """sum over LoRA layers and earlier adapters s of sum |A_s A_current^T|, float32."""
    total = None
    with _no_autocast(model):
        for layer in lora_layers(model):
            if current not in layer.lora_A:
                continue
            a_t = full(layer.lora_A[current].weight).float()  # whole matrices also when sharded (clbench.distributed.fsdp)
            for s in previous:
                if s in layer.lora_A:
                    term = (full(layer.lora_A[s].weight).float() @ a_t.T).abs().sum()
                    total = term if total is None else total + term
    return total


def l2_penalty(model, current: str) -> torch.Tensor | None:
    total = None
    with _no_autocast(model):
        for layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                if current in d:
                    term = torch.linalg.norm(full(d[current].weight).float())
                    total = term if total is None else total + term
    return total


@register("olora")
class OLoRA(Method):
    Options = OLoraOptions

    def __init__(self, options: OLoraOptions):
        self.options = options
        self.n_stages = 0
        self.stage = 0
        self.trained: list[int] = []  # stages whose adapter this run has trained (in order)
        self._means = StageMeans()  # the stage's penalty / task loss (stage_stats)

    def _config(self):
        from peft import LoraConfig

        o = self.options
        return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules, task_type="CAUSAL_LM")

    def setup(self, model, run):
        from peft import get_peft_model

        self.n_stages = len(run.tasks)
        if self.n_stages < 1:
            raise MethodError("olora: the stream has no tasks")
        model = get_peft_model(model, self._config(), adapter_name=adapter_name(1))
        for t in range(2, self.n_stages + 1):
            model.add_adapter(adapter_name(t), self._config())
        self._activate(model, 1)
        return model

    def _activate(self, model, t: int) -> None:
        # the trained adapters and the current one: in mode single a fresh run trains only
        # stage t's adapter, and the never-trained adapters of other stages stay out of it
        names = [adapter_name(s) for s in self.trained if s != t] + [adapter_name(t)]
        model.base_model.set_adapter(names)  # the forward sums every active adapter
        current = f".{adapter_name(t)}."
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n and current in n)

    def stage_start(self, model, stage):
        t = stage.stage
        if not 1 <= t <= self.n_stages:
            raise MethodError(f"olora: stage {t} outside the {self.n_stages} adapters created at setup")
        self.stage = t
        self._activate(model, t)
        self._means.reset()
        return model

    def extra_loss(self, model, batch, stage, out):
        o = self.options
        t = stage.stage if stage is not None else self.stage
        current = adapter_name(t)
        total = None
        previous = [adapter_name(s) for s in self.trained if s != t]
        if o.lambda1 > 0 and previous:
            ortho = orthogonality_penalty(model, current, previous)
            if ortho is not None:
                total = o.lambda1 * ortho
        if o.lambda2 > 0:
            l2 = l2_penalty(model, current)
            if l2 is not None:
                total = o.lambda2 * l2 if total is None else total + o.lambda2 * l2
        if total is not None and out is not None:
            self._means.add("penalty_ratio", StageMeans.share(total, out.loss))
        return total

    def stage_stats(self, stage):
        """penalty_ratio: mean over the stage's micro-batches of the regulariser (lambda1 * orthogonality
        + lambda2 * L2; N-LoRA: lambda1 * l1) / the task CE. None where no penalty applied (stage 1)."""
        return self._means.means()

    def stage_end(self, model, stage):
        if stage.stage not in self.trained:
            self.trained.append(stage.stage)
        return model

    def state_dict(self):
        # the adapters live in the model (checkpointed as diffs); which ones are active and
        # trainable follows from the trained stages, set again by the next stage_start
        return {"stage": self.stage, "trained": list(self.trained)}

    def fsdp_refusal(self):
        # every adapter exists from setup; the penalty reads whole matrices through clbench.distributed.fsdp.full.
        # Methods extending this class (N-LoRA, InfLoRA) are not verified sharded by this.
        return None if type(self) is OLoRA else super().fsdp_refusal()

    def load_state_dict(self, state):
        self.stage = int(state.get("stage", 0))
        # a checkpoint of the sequential stream before `trained` was kept: stages 1..stage
        self.trained = [int(s) for s in state.get("trained", range(1, self.stage + 1))]
