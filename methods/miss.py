"""MiSS (formerly Bone): matrix shard sharing (arXiv 2409.15371), via peft MissConfig.

Idea. Instead of LoRA's two low-rank factors, each adapted linear layer W (out x in) gets ONE
small trainable block D of shape (r, out) shared across shards of the input: the input x is
cut into in/r shards of width r, the shards are summed, and the sum is multiplied by D
(y = W x + (sum_j x_j) D). D starts at zero, so training starts from the base model exactly.
peft's variants: the default "balance" (above), "bat" (block-affine transformation from the Bone paper,
non-linear across shards, needs in and out divisible by r) and "mini" (a D of shape (r, mini_r)
repeated along out_features). `BoneConfig` was removed in peft 0.19; MissConfig replaces it,
so `bone` is an alias of this method.

Continual variants (as the lora baseline here):
  seq  one adapter carried through all stages (default);
  inc  after each stage the adapter is merged into the weights and a fresh one starts the next.

Options (defaults and their source):
  r 64                  peft's default (unconfirmed against the paper); peft requires r <= in_features
  init_weights "balance" peft's default (True); "bat" and "mini" select the other variants
  mini_r 1              peft's default, used only by "mini"
  dropout 0.0           peft's default
  target_modules all-linear  every linear layer of the decoder (unconfirmed: the paper adapts
                        the attention and MLP projections of LLaMA; peft's built-in default for
                        llama would be q_proj and v_proj only)
  variant seq
Base weights, embeddings, norms and the LM head are frozen (peft's default for MiSS, bias "none").
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from clbench.method import Method, register
from clbench.method import adapters


class MissOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(64, gt=0, description="shard width along in_features (rows of the trainable block)")
    init_weights: Literal["balance", "bat", "mini"] = Field("balance", description="MiSS variant (peft init_weights)")
    mini_r: int = Field(1, gt=0, description="columns of the block for init_weights=mini")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    variant: Literal["seq", "inc"] = Field("seq", description="seq = one adapter for all stages; inc = merge after each stage, fresh adapter")


@register("miss", "bone")
class MiSS(Method):
    Options = MissOptions

    def __init__(self, options: MissOptions):
        self.options = options

    def _config(self):
        from peft import MissConfig

        o = self.options
        init = True if o.init_weights == "balance" else o.init_weights
        return MissConfig(r=o.r, miss_dropout=o.dropout, mini_r=o.mini_r, init_weights=init,
                          target_modules=o.target_modules, task_type="CAUSAL_LM")

    def setup(self, model, run):
        return adapters.attach(model, self._config())

    def stage_start(self, model, stage):
        return adapters.for_stage(model, self._config(), stage, self.options.variant)

    def fsdp_refusal(self):
        return adapters.fsdp_refusal(self.options.variant)
