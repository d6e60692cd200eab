"""MoELoRA with expert expansion: every stage adds its own LoRA experts and router rows to each
adapted layer; the experts and router rows of earlier stages stay in the forward, frozen.

The layer is methods/moelora.py's (CoIN's MoE-LoRA, the formulation EasyCL and Continual-NExT
ship: a dense softmax token router over LoRA experts); the continual rule is the expansion of
Lifelong-MoE (Chen et al., ICML 2023, arXiv 2305.12281: for each new data distribution, add
experts and the matching gating dimensions, freeze the old experts and the old gating dimensions).
At stage t of T, in every adapted layer:

    h = W x + (alpha / r) sum_{s in S_t} sum_{e in E_s} g_e(x) B_e A_e dropout(x),
    g(x) = softmax over the experts of S_t of (W_g,s x)_e,     S_t = trained stages + {t}

only A_e, B_e, W_g,e of stage t's experts train; those of earlier stages and the base weights get
no gradient and are bit-identical after the stage (tested).

Why this and not CL-MoE (Huai et al., CVPR 2025, arXiv 2503.00413). CL-MoE is the continual MoE-LoRA
the peers ship (EasyCL `src/easycl/cl/clmoe/`), but neither the authors' code
(ECNU-ICALK/CL-MoE `CLMoE/peft/tuners/clitmoelora.py`, `llava/train/train_MOE.py`) nor EasyCL's
port contains its two mechanisms: the forward trains the plain CoIN MoE-LoRA; the dual router's
test-time mix (beta G^I(x) + (1 - beta) G^T(t)) is a commented-out line whose task-level weights
`arr = []` were to be filled by hand from top-2 expert counts the layer appends to text files
(it reads the task name from a hard-coded path); the momentum merge of the experts
(theta_t = lambda o theta_{t-1} + (1 - lambda) o phi_t, lambda by each expert's role) appears in no
training file. A CL-MoE here would be moelora under another name, or the paper's equations
with the expert-role rule and the task router's construction guessed. The expansion rule below
is fully specified by its paper and needs no task id at test.

Task identity at test: none is used. The router is token-level and learned; after stage t every
trained stage's experts compete in one softmax, so a test input of an earlier task is routed by
the same router rows that routed it when its stage ended, plus the later stages' rows
(documented deviation from task-id routing; Lifelong-MoE's gate is likewise task-agnostic).
Adding a stage's experts renormalises the softmax: at the start of stage t (B_t = 0, so the new
experts output 0) the earlier experts' weights shrink by the new rows' gate share, and the new
rows can learn to take over earlier tasks' tokens; Lifelong-MoE counters that with an
output-distillation term on the old data distribution's outputs, which is not implemented here
(it needs the previous model's outputs: a teacher forward per micro-batch; not in this file).

How it maps onto clbench's hooks (the adapter bookkeeping is O-LoRA's, methods/olora.py):
- setup: moelora's layer replacement with T expert groups per layer (one per stage of the
  stream, each `experts` experts of rank r / experts and its router rows), all created at setup
  so the parameter set never changes and stage checkpoints restore exactly; group 1 active.
- stage_start(t): the active groups are the trained stages' and stage t's (in mode single, where
  every stage is a fresh run, only stage t's); requires_grad on stage t's group only.
- stage_end(t): t joins the trained stages.
- extra_loss: no term; reads the gates for stage_stats, which adds to moelora's
  `router_entropy` and `max_expert_share` the `new_expert_share`: the mean gate mass on the
  current stage's experts (at stage 1, 1).
- state_dict: the trained stages (the experts live in the model).

Options (defaults and sources): experts 4, r 8, alpha 16, dropout 0.05, target_modules all-linear
per stage, as moelora (see methods/moelora.py for each source); each stage's group is a full
MoELoRA of its own, so stage t runs t x 4 experts. Lifelong-MoE expands a top-2 gated MoE FFN of
a pretrained MoE model; the dense softmax router over LoRA experts is CoIN's, not Lifelong-MoE's.
Not confirmed by a source: the number of experts each stage adds (Lifelong-MoE adds a fixed
number per distribution; 4 = the MoE-LoRA default), and a new group's router rows initialised as
a fresh nn.Linear (kaiming-uniform) rather than from the old rows.
Memory: T groups exist from setup; only the current one has gradients and optimizer state.
"""

from __future__ import annotations

from clbench.method import MethodError, register
from clbench_builtin.methods import moelora as _moelora  # MoELoRA's experts and router


@register("moelora_expand")
class MoELoRAExpand(_moelora.MoELoRA):
    Options = _moelora.MoELoraOptions

    def __init__(self, options):
        super().__init__(options)
        self.n_stages = 0
        self.stage = 0
        self.trained: list[int] = []  # stages whose experts this run has trained (in order)

    def _groups_per_layer(self, run) -> int:
        self.n_stages = len(run.tasks)
        if self.n_stages < 1:
            raise MethodError("moelora_expand: the stream has no tasks")
        return self.n_stages

    def _after_setup(self, model) -> None:
        for _, m in _moelora.moe_layers(model):
            m.record = True
        self._activate(model, 1)

    def _activate(self, model, t: int) -> None:
        active = [s - 1 for s in self.trained if s != t] + [t - 1]
        for _, m in _moelora.moe_layers(model):
            m.active = list(active)
            for i, grp in enumerate(m.groups):
                for p in grp.parameters():
                    p.requires_grad_(i == t - 1)

    def stage_start(self, model, stage):
        t = stage.stage
        if not 1 <= t <= self.n_stages:
            raise MethodError(f"moelora_expand: stage {t} outside the {self.n_stages} expert groups created at setup")
        self.stage = t
        self._activate(model, t)
        return super().stage_start(model, stage)

    def _more_stats(self, shares) -> None:
        e = self.options.experts
        self._means.add("new_expert_share", sum(s[-e:].sum() for s in shares) / len(shares))

    def stage_stats(self, stage):
        """moelora's router_entropy and max_expert_share, and new_expert_share: the mean gate mass on
        the current stage's experts (1 at stage 1)."""
        return self._means.means()

    def stage_end(self, model, stage):
        if stage.stage not in self.trained:
            self.trained.append(stage.stage)
        return model

    def state_dict(self):
        return {"stage": self.stage, "trained": list(self.trained)}

    def load_state_dict(self, state):
        self.stage = int(state.get("stage", 0))
        self.trained = [int(s) for s in state.get("trained", [])]
