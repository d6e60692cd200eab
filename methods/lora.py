"""LoRA (Hu et al. 2021, arXiv 2106.09685) through peft.

Two continual variants:
  seq  one adapter carried through all stages (the usual "sequential LoRA" baseline);
  inc  after each stage the adapter is merged into the weights and a fresh adapter starts
       the next stage (each stage learns a low-rank increment on top of the last).

Options (defaults: r=8, alpha=16, all linear layers of the decoder — the usual LoRA baseline
of continual-learning papers, not one paper's setting; dropout 0.05 is peft's common choice,
not confirmed by a source):
  r, alpha, dropout, target_modules ("all-linear" or a list of module names), variant.
"""

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from clbench.method import Method, register
from clbench.method import adapters


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    variant: Literal["seq", "inc"] = Field("seq", description="seq = one adapter for all stages; inc = merge after each stage, fresh adapter")


@register("lora")
class LoRA(Method):
    Options = LoraOptions

    def __init__(self, options: LoraOptions):
        self.options = options

    def _config(self):
        from peft import LoraConfig

        o = self.options
        return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules, task_type="CAUSAL_LM")

    def setup(self, model, run):
        return adapters.attach(model, self._config())

    def stage_start(self, model, stage):
        return adapters.for_stage(model, self._config(), stage, self.options.variant)

    def fsdp_refusal(self):
        return adapters.fsdp_refusal(self.options.variant)

    def step_resume_refusal(self):
        return None  # the adapters are weights of the model; stage_start redoes the same ones (tests/training/test_midstage.py)
