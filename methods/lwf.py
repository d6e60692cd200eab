"""LwF, Learning without Forgetting (Li & Hoiem 2016/2017, arXiv 1606.09282), for causal LMs.

Idea: no data of the earlier tasks is kept. Instead the model as it was before the new task
(the teacher) is asked what it would answer on the NEW task's inputs, and the model being
trained (the student) is pulled towards those answers while it learns the new targets:

    loss = CE(new targets) + lambda * KL_rows( softmax(z_teacher / T) || softmax(z_student / T) )

KL_rows is the KL divergence over the vocabulary at each position that predicts a target token,
averaged over those positions (the rows of `clbench.method.lm.Forward.logits`, the same rows the
task loss averages over). Stage 1 is plain fine-tuning: there is no earlier model to keep.

How it runs here:
- stage_start (stage >= 2): the teacher is `clbench.method.frozen_copy` of the model as the
  previous stage left it (taken before a base method's own stage_start, so whatever that base
  does at a stage start, the teacher is the model the previous stage ended with). It is frozen,
  in eval mode, and rebuilt from the weights at every stage start, so it is never part of a
  checkpoint: after a resume the loop restores the weights before stage_start copies them.
  stage_end drops it. Cost: one extra copy of the model (for a peft base, of the whole
  wrapped model) and one extra no-grad forward per micro-batch.
- extra_loss: the teacher runs on the loop's collated micro-batch under stage.autocast() and
  no_grad, through `clbench.method.lm.target_logits` with the stage's head_only_targets, so its
  rows line up one for one with the student's `out.logits`; the divergence is computed in
  float32. With several processes each rank distils its own rows and weighs their sum by the
  global batch's row count (one all-reduce of the counts), so the term is the mean over the
  whole batch's target rows at any number of processes (the loop divides an extra loss by the
  number of ranks, and the weight carries it back). Sharded (distributed.strategy fsdp), FSDP2
  cannot deep-copy the student, so setup copies the model before the loop shards it, the first
  stage start shards that copy like the student (1/N of the model per rank) and every later one
  copies each rank's shards of the student's weights into it; its forwards run in step with the
  student's, one per micro-batch on every rank.
- At the first step of a stage student and teacher are the same function, so the KD term
  and its gradient are 0 (the tests check this); it grows as the student moves.
- base (optional): wrap another method (e.g. `base: lora`, `base_options: {r: 8}`): every hook
  is delegated to it, LwF adds its term to the base's extra_loss. Without a base every
  parameter trains (as full_ft). With a peft base, the adapter-disabled model would be a
  cheaper teacher, but it is the pretrained model, not the previous stage's (a `seq` LoRA
  carries its adapter across stages), so LwF copies the wrapped model instead.

Options (defaults and sources):
  temperature 2.0   T; the paper's T = 2 (after Hinton et al. 2015), also EasyCL
                    (src/easycl/cl/lwf/lwf.py, temperature=2.0) and TRACE (model/Regular/LwF.py).
  kd_lambda 1.0     lambda; the paper's lambda_o = 1 "for most experiments" (recalled, not
                    re-read: unconfirmed) and TRACE's weight 1. EasyCL mixes
                    (1 - alpha) CE + alpha KD with alpha 0.5 on top of the model's own CE.
  kl forward        `forward` = KL(teacher || student), whose gradient is the paper's
                    cross-entropy against the teacher's softened outputs (they differ by the
                    teacher's entropy, a constant) and EasyCL's kl_div(log p_student, p_teacher);
                    `reverse` = KL(student || teacher), what TRACE's
                    kl_div(log p_teacher, p_student) computes.
  t_squared false   no T^2 factor: the paper's L_old (a cross-entropy against the teacher's
                    softened outputs, weighted by lambda_o) has none, nor has TRACE. `true`
                    multiplies by T^2 (Hinton et al.'s convention, which keeps the gradient scale
                    independent of T; EasyCL does it): with T = 2 a 4x heavier distillation.
  base, base_options  none: full fine-tuning.

Choices no source confirms: distillation only at the positions that predict target tokens
(EasyCL's labelled positions; TRACE sums over every position, prompt and padding included, and
divides by the batch size), averaged per position; the teacher is a full copy rather than
cached logits (TRACE caches per-step logits and reads them back in another order).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clbench.method import MethodError, frozen_copy
from clbench.distributed import collectives
from clbench.distributed import fsdp
from clbench.method import StageMeans, register
from clbench.method.lm import target_logits
from clbench.method.masking import local_rows, reshard
from clbench.method.wrapping import BASE_FIELD, BASE_OPTIONS_FIELD, BaseName, BaseOptions, Wrapping


class LwfOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of teacher and student")
    kd_lambda: float = Field(1.0, ge=0, description="weight of the distillation term")
    kl: Literal["forward", "reverse"] = Field("forward", description="forward = KL(teacher || student), "
                                              "reverse = KL(student || teacher)")
    t_squared: bool = Field(False, description="multiply the divergence by T^2 (Hinton et al.; the paper's L_old has no T^2)")
    base: BaseName = BASE_FIELD
    base_options: BaseOptions = BASE_OPTIONS_FIELD


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kl: str = "forward",
                 t_squared: bool = True) -> torch.Tensor:
    """Mean over rows of KL between the tempered softmaxes of `teacher` and `student` logits
    (rows x vocabulary), in float32, times T^2 with t_squared."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kl == "forward":
        div = (t.exp() * (t - s)).sum(-1)
    else:
        div = (s.exp() * (s - t)).sum(-1)
    scale = temperature * temperature if t_squared else 1.0
    return div.mean() * scale


@register("lwf")
class LwF(Wrapping):
    Options = LwfOptions

    def __init__(self, options: LwfOptions):
        super().__init__(options)  # the base method, if any (clbench.method.wrapping)
        self.teacher: torch.nn.Module | None = None
        self._means = StageMeans()  # the stage's distillation term / task loss (stage_stats)
        self._template: torch.nn.Module | None = None  # sharded runs: the teacher's module, unsharded until stage 1
        self._sharded_teacher: torch.nn.Module | None = None  # sharded runs: the teacher's module, sharded
        self._device = None

    def setup(self, model, run):
        model = super().setup(model, run)
        if run.sharded:
            # FSDP2 cannot deep-copy a sharded model, so the teacher's module is copied now, before the
            # loop shards the student, and sharded like it at the first stage start (1/N per rank)
            self._template, self._device = frozen_copy(model), run.device
        return model

    # --- stages ---------------------------------------------------------------------------

    def _teacher(self, model, stage) -> torch.nn.Module | None:
        """The model as the previous stage left it, frozen: a deep copy, or (sharded) the teacher's
        sharded module with each rank's shards of the student's weights copied into it."""
        if self._template is None and self._sharded_teacher is None:
            return frozen_copy(model) if stage.stage > 1 else None
        if self._sharded_teacher is None:
            self._sharded_teacher = fsdp.shard(self._template, self._device)  # a collective: every rank is here
            self._template = None
        if stage.stage == 1:
            return None
        reshard(model)  # the student's parameters as their shards, not the root's gathered copy
        reshard(self._sharded_teacher)
        mine, theirs = dict(model.named_parameters()), dict(self._sharded_teacher.named_parameters())
        if mine.keys() != theirs.keys():
            raise MethodError("lwf: the student's parameters are not the teacher's (a base method that adds "
                                "parameters after setup cannot be distilled sharded)")
        with torch.no_grad():
            for name, p in mine.items():
                local_rows(theirs[name])[0].copy_(local_rows(p.detach())[0])
        return self._sharded_teacher.eval()

    def stage_start(self, model, stage):
        self.teacher = self._teacher(model, stage)
        self._means.reset()
        return self._inner("stage_start", model, stage, default=model)

    def extra_loss(self, model, batch, stage, out):
        inner = self._inner("extra_loss", model, batch, stage, out)
        if self.teacher is None or self.options.kd_lambda == 0:
            return inner
        # the divergence's mean over the GLOBAL batch's target rows: each rank's sum over its rows over
        # the global row count, times the number of ranks (the loop divides an extra loss by it), so a
        # row weighs the same however the rows split over the processes (every rank joins the sum)
        rows = out.logits.shape[0]
        weight = 1.0
        if collectives.enabled():
            total = collectives.all_reduce_sum(torch.tensor(float(rows), device=out.logits.device)).item()
            weight = rows * collectives.world_size() / max(total, 1.0)
        if rows == 0:
            return inner
        kd = self.options.kd_lambda * self.kd(batch, stage, out.logits) * weight
        self._means.add("kd_ratio", StageMeans.share(kd, out.loss))  # weighted KD / task CE, per micro-batch
        return kd if inner is None else inner + kd

    def stage_stats(self, stage):
        """kd_ratio: mean over the stage's micro-batches of kd_lambda * KD / task CE (a base method's
        own stats alongside)."""
        mine = self._means.means() or {}
        return {**(self._inner("stage_stats", stage) or {}), **mine} or None

    def kd(self, batch, stage, student_rows: torch.Tensor) -> torch.Tensor:
        """The distillation term (without kd_lambda) of the student's target rows on `batch`."""
        head_only = getattr(stage.train_config, "head_only_targets", True)
        with torch.no_grad(), stage.autocast():
            teacher_rows, _ = target_logits(self.teacher, batch, head_only)
        o = self.options
        return distillation(student_rows, teacher_rows, o.temperature, o.kl, o.t_squared)

    def fsdp_refusal(self):
        # the teacher is sharded like the student (setup's copy, sharded at the first stage start) and
        # runs its FSDP forwards in step with the student's, one per micro-batch on every rank
        # (tests/distributed/test_fsdp_methods.py); a base method's own answer stands
        return self._inner("fsdp_refusal")

    def world_size_dependent(self):
        return self._inner("world_size_dependent")  # the divergence weighs rows over the global batch

    def stage_end(self, model, stage):
        self.teacher = None
        return self._inner("stage_end", model, stage, default=model)

    # --- resume ---------------------------------------------------------------------------

    def state_dict(self):
        return {"base": self._base_state()}

    def load_state_dict(self, state):
        self._load_base_state((state or {}).get("base"))
