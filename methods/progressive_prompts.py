"""Progressive Prompts (Razdaibiedina et al., ICLR 2023, arXiv 2301.12314).

Code: arazd/ProgressivePrompts (T5_codebase/t5_continual.py: the prompts and their training;
T5_codebase/train_t5_cl.py: the options' defaults; README.md: the example run).

Idea: the base model stays frozen; every task gets a new soft prompt of L vectors in the input
embedding space, trained on that task while the prompts of the earlier tasks stay in front of
the input, frozen. After task k the input is [P_k; P_(k-1); ...; P_1; x]: the newest prompt
first, as the authors' code concatenates (`progress_previous_prompts`: cat([new, previous])).

How it runs here (hand-written, not peft): peft's PromptTuningConfig gives one trainable block
of virtual tokens per adapter and prepends it inside PeftModelForCausalLM.forward; it cannot put
frozen earlier prompts and a trainable new one in one prefix (one active prompt-learning adapter
at a time), and clbench's training (LM head at the target positions only), prefix-shared
evaluation and KV-cache generation call the decoder directly, which would skip peft's prompt.
So the prompts are a `clbench.method.prompting.PromptInjector` registered on the model (submodule
`clbench_prompt`, parameters `prompts.0` .. `prompts.(T-1)`, one (L, hidden) block per stage of
the stream) whose decoder forward prepends them in every path (see clbench/method/prompting.py).
- setup: every weight of the model frozen; T prompts created up front (the parameter set stays
  fixed, so stage checkpoints, diffs against the post-setup model, restore exactly on resume),
  each initialised from the input embeddings of L tokens drawn uniformly from the vocabulary
  (as `init_new_prompt`; seeded by the (method, seed)'s seed, not the global RNG).
- stage_start(t): the prefix becomes [P_t, then the prompts of the stages this run trained
  before, newest first]; only P_t requires grad (the optimizer sees L x hidden entries).
  In mode single (each task alone from the base model) a run trains one stage: its prefix is
  P_t alone.
- stage_end(t): P_t joins the trained prompts; it never trains again.

Task identity (the paper is task-aware: task k is tested with [P_k, ..., P_1]): clbench scores
every task after every stage on the one model in memory, with ALL prompts learned so far,
[P_t, ..., P_1] after stage t. That is the paper's rule for the newest task (the matrix's
diagonal, cell (t, t)) and for the authors' `test_eval_after_every_task` option
(t5_continual.py `train_continual`: every task tested with `previous_prompts`), but a deviation
for an earlier task j < t, which the paper scores with [P_j, ..., P_1] only: here it also sees
the prompts of the tasks learned after it. No method hook chooses the model per evaluated task.

Options (defaults and sources):
  length 10        prompt tokens per task: the authors' code (train_t5_cl.py `--prefix_len`
                   default 10; README's T5 and BERT runs use 10). The paper's per-model
                   lengths are not confirmed here.
  init vocab       `init_new_prompt`: each vector a random vocabulary token's embedding.
                   `uniform`: U(-0.5, 0.5), Lester et al. 2021's random-uniform initialisation
                   (not in the authors' code).
Not implemented: the paper's residual MLP reparameterisation of the prompt (the authors'
`--prefix_MLP`, default 'None' in train_t5_cl.py), replay (`--data_replay_freq`,
default off) and early stopping on a validation split (`--early_stopping` 1 in the authors'
runs; clbench trains a fixed number of steps and keeps the last prompt).
Training settings are the run's (train.lr, weight decay, optimizer: AdamW): the authors train
T5's prompts with AdamW at lr 0.3, weight decay 1e-5 (t5_continual.py defaults, README run);
prompt tuning needs a learning rate far above full fine-tuning's (configs/tune/study-adapters.yaml
searches it).

Memory and length: T x L prompt vectors (hidden size each); after stage t every sequence is
t x L positions longer than its tokens (the model's max_position_embeddings must take it).
ddp: the prompts are parameters of the model, their gradients summed as every other's.
fsdp: same as one process (tests/distributed/test_fsdp_methods.py): the prompts are a submodule of the root FSDP
unit, all created at setup.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.method import Method, MethodError, register
from clbench.method import prompting
from clbench.runtime import derive_seed


class ProgressivePromptsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    length: int = Field(10, gt=0, description="soft prompt tokens per task")
    init: Literal["vocab", "uniform"] = Field("vocab", description="vocab: embeddings of random vocabulary tokens")


class ProgressivePrompt(prompting.PromptInjector):
    """T prompts; the forward prepends the ones in `order` (indices into prompts), concatenated."""

    def __init__(self, n: int, length: int, init: torch.Tensor):
        super().__init__()
        self.prompts = torch.nn.ParameterList([torch.nn.Parameter(init[i].clone()) for i in range(n)])
        self.order: list[int] = []
        self.length_per = length

    def length(self) -> int:
        return len(self.order) * self.length_per

    def prefix(self) -> torch.Tensor:
        return torch.cat([self.prompts[i] for i in self.order], 0)

    def prompt_embeds(self, call):
        B = prompting._rows(call.kw)
        return self.prefix().unsqueeze(0).expand(B, -1, -1)


@register("progressive_prompts")
class ProgressivePrompts(Method):
    Options = ProgressivePromptsOptions

    def __init__(self, options):
        self.options = options
        self.trained: list[int] = []

    def setup(self, model, run):
        n = len(run.tasks)
        if n < 1:
            raise MethodError("progressive_prompts: the stream has no tasks")
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings().weight
        L = self.options.length
        g = torch.Generator().manual_seed(derive_seed(run.seed, 0, 2301))
        if self.options.init == "vocab":
            rows = torch.randint(emb.shape[0], (n, L), generator=g)
            init = emb.detach().cpu()[rows].to(emb.dtype)
        else:
            init = (torch.rand((n, L, emb.shape[1]), generator=g) - 0.5).to(emb.dtype)
        return prompting.attach(model, ProgressivePrompt(n, L, init.to(emb.device)))

    def stage_start(self, model, stage):
        inj = prompting.injector_of(model)
        t = stage.stage
        if not 1 <= t <= len(inj.prompts):
            raise MethodError(f"progressive_prompts: stage {t} outside the {len(inj.prompts)} prompts created at setup")
        inj.order = [t - 1] + [s - 1 for s in sorted(self.trained, reverse=True) if s != t]
        for i, p in enumerate(inj.prompts):
            p.requires_grad_(i == t - 1)
        return model

    def stage_end(self, model, stage):
        prompting.injector_of(model).prompts[stage.stage - 1].requires_grad_(False)
        if stage.stage not in self.trained:
            self.trained.append(stage.stage)
        return model

    def trainable_params(self, model):
        return self.options.length * model.get_input_embeddings().weight.shape[1]

    def state_dict(self):
        return {"trained": list(self.trained)}

    def load_state_dict(self, state):
        self.trained = list((state or {}).get("trained", []))

    def fsdp_refusal(self):
        # the prompt module is a submodule of the root FSDP unit, gathered before the decoder runs (the
        # prompt hook is inside the root's forward or its registered head-only forward); every prompt
        # exists from setup (tests/distributed/test_fsdp_methods.py)
        return None
