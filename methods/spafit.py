"""SPAFIT, Stratified Progressive Adaptation Fine-tuning (Arora & Wang 2024, arXiv 2405.00201).

Idea: lower layers hold general linguistic knowledge and should change least, higher layers
are more task-specific. The decoder layers are split by depth into three contiguous groups:
  lowest  frozen;
  middle  bias/norm terms only (BitFit-like; Llama has no biases, so the RMSNorm weights);
  top     LoRA, plus the norm terms (the middle group's terms, option top_norms).
The top group's LoRA is a peft adapter (LoraConfig with layers_to_transform = the top layers'
indices, target_modules = every linear module inside the decoder layers); one adapter is
carried through all stages (like LoRA "seq"). Embeddings, lm_head and the final norm are
frozen (option train_final_norm). Whole tensors train or not, so frozen weights never get a
gradient (clbench.method.masking.MaskedUpdate on requires_grad only).

Group boundaries: `splits` [a, b] are fractions of the depth; with L layers the lowest group
is layers [0, round(a*L)), the middle [round(a*L), round(b*L)), the top the rest. Default
thirds: SmolLM2-135M's 30 layers split 10/10/10; the tiny 2-layer model 1/0/1. The top group
must not be empty.

Options:
  splits            [1/3, 2/3] (unconfirmed: the paper's exact split per model is not in our sources).
  r, alpha, dropout LoRA of the top group; 8 / 16 / 0.05, the project's LoRA defaults (unconfirmed for SPAFIT).
  target_modules    "all-linear" (every linear module inside the decoder layers) or a list of
                    module names. A third-party summary of the paper (BERT-large on GLUE) says
                    group 3 puts LoRA on "selected attention components"; which ones is
                    unconfirmed, so the default follows the project's LoRA baseline.
  top_norms         true: the top group also trains its norms (the paper's third group combines
                    both methods; unconfirmed for norms in place of biases).
  train_final_norm  false (unconfirmed).
"""

from __future__ import annotations

import re
from typing import Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clbench.method import MethodError, register
from clbench.method.masking import MaskedMethod, MaskedUpdate

_IN_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.[\w.]*norm\.weight$")


class SpafitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    splits: list[float] = Field(default_factory=lambda: [1 / 3, 2 / 3], description="depth fractions ending the lowest and the middle group")
    r: int = Field(8, gt=0, description="LoRA rank (top group)")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = Field("all-linear", description="LoRA targets in the top group")
    top_norms: bool = Field(True, description="the top group also trains its norm weights")
    train_final_norm: bool = Field(False, description="train the final norm (unconfirmed)")

    @field_validator("splits")
    @classmethod
    def _two_fractions(cls, v):
        if len(v) != 2 or not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("splits must be two fractions 0 <= a <= b <= 1")
        return v


def layer_groups(n_layers: int, splits) -> tuple[list[int], list[int], list[int]]:
    a, b = round(splits[0] * n_layers), round(splits[1] * n_layers)
    return list(range(a)), list(range(a, b)), list(range(b, n_layers))


@register("spafit")
class SPAFIT(MaskedMethod):
    Options = SpafitOptions

    def __init__(self, options: SpafitOptions):
        self.options = options
        self.update: MaskedUpdate | None = None
        self.groups: tuple[list[int], list[int], list[int]] = ([], [], [])

    def setup(self, model, run):
        from peft import LoraConfig, get_peft_model

        o = self.options
        n_layers = model.config.num_hidden_layers
        low, mid, top = self.groups = layer_groups(n_layers, o.splits)
        if not top:
            raise MethodError(f"spafit: the top group is empty ({n_layers} layers, splits {o.splits})")
        linear = o.target_modules
        if linear == "all-linear":  # peft refuses layers_to_transform with the string form
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and _IN_LAYER.search(n)})
        model = get_peft_model(model, LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=linear,
                                                 layers_to_transform=top, task_type="CAUSAL_LM"))
        norm_layers = set(mid) | (set(top) if o.top_norms else set())
        names = []
        for n, _ in model.named_parameters():
            if "lora_" in n:
                names.append(n)
            elif (m := _NORM.search(n)) and int(m.group(1)) in norm_layers:
                names.append(n)
            elif o.train_final_norm and not _IN_LAYER.search(n) and n.endswith("norm.weight"):
                names.append(n)
        self.update = MaskedUpdate.whole(names)
        return self.update.apply(model)

    def stage_start(self, model, stage):
        return self.update.apply(model)  # the same trainable set every stage

    def fsdp_refusal(self):
        return None  # its adapter exists before sharding; whole tensors train

    def state_dict(self):
        return {"groups": self.groups}
