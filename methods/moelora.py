"""MoELoRA: a token-level router over several LoRA experts on every adapted linear layer, in the
formulation the continual-learning peer suites ship: CoIN's MoE-LoRA (Chen et al., NeurIPS 2024
D&B, arXiv 2403.08350; zackschen/CoIN `CoIN/peft/tuners/coinmoelora.py`), which EasyCL ships as
its MoE-LoRA (ECNU-ICALK/EasyCL `src/easycl/cl/moe/peft/tuners/coinmoelora.py`) and Continual-NExT
as its MoELoRA tuner (ECNU-SII/Continual-NExT `peft/tuners/moelora/layer.py`, read from its
stored copy `.ipynb_checkpoints/layer-checkpoint.py`; doc `assets/tuners/MoELoRA.md`). It descends from MOELoRA (Liu et al. 2023, arXiv 2310.18339;
liuqidong07/MOELoRA-peft `src/MLoRA/peft/tuners/mmoelora.py`), whose gate reads a learned
embedding of the task id instead of the token.

    h = W x + (alpha / r) sum_{e=1..E} g_e(x) B_e A_e dropout(x),   g(x) = softmax(W_g x)

per token x at the layer's input; A_e is (r/E) x d_in, B_e is d_out x (r/E), W_g is E x d_in (no
bias); the base W stays frozen. The gate is dense (every expert, softmax weights summing to 1), as
in all four codes; none of them adds a load-balancing or router loss, so neither does this file.

Task identity. MOELoRA's gate needs the task id of every example, at training and at test.
clbench evaluates one model in memory on every task after each stage with no task id, so the
original task-embedding gate cannot run here; this file uses the token-level router of CoIN /
EasyCL / Continual-NExT, which needs no task id (documented deviation from Liu et al.).

How it maps onto clbench's hooks:
- setup: every target nn.Linear of the decoder (not the LM head) is replaced in place by a
  `MoELoRALinear` holding the frozen original layer, the experts and the router; every other
  parameter is frozen. All parameters exist from setup, so stage checkpoints (diffs against the
  post-setup model) restore exactly on resume; the initial draws come from a generator seeded by
  the (method, seed)'s seed.
- stage_start: only resets the stage's diagnostics; param_groups: the default (one set of
  experts and one router carried through the stream, as the peers run it: CoIN trains the same
  MoE-LoRA task after task, each script loading the previous one's adapter).
- extra_loss: no term (returns None); it only reads the gates of the forward just run for the
  diagnostics below.
- stage_stats: `router_entropy` (mean over the stage's micro-batches, adapted layers and positions,
  padding included, of -sum_e g_e log g_e, in nats; log E = uniform) and `max_expert_share` (mean
  over micro-batches and layers of the largest per-expert mean gate: 1/E = balanced, 1 = collapsed).
- state_dict: nothing beyond the weights (the experts and routers live in the model).

Hand-written, because no maintained library has it: the expert layer and its router
(`MoELoRALinear`). peft 0.21's LoRA layer sums its active adapters with fixed scalings and has
no router; its X-LoRA scales adapters by a classifier over a first pass's hidden states (a
second forward per step, not a per-layer token gate), so neither expresses this layer. The
layer computes the experts batched (einsum over stacked A and B), the same numbers as the
authors' loop over experts up to summation order.

Options (defaults and sources):
  experts 4        Continual-NExT MoELoRA.md (expert_num 4), EasyCL CoINMOELoraConfig and CL-MoE
                   train_MOE.py (expert_num 4); CoIN's LLaVA scripts use 8 (Train_MOE/*.sh)
  r 8              the total rank, split evenly: r / experts per expert (all four codes assert
                   r % experts == 0). Continual-NExT default lora_rank 8, EasyCL moe
                   train_config.json lora_rank 8; CoIN scripts 128, MOELoRA 16
  alpha 16         scale alpha / r = 2, r the TOTAL rank (all codes: scaling = lora_alpha / r):
                   CoIN scripts 256 / 128, MOELoRA 32 / 16, EasyCL train_config 16 / 8 all give 2;
                   Continual-NExT's doc default 32 / 8 gives 4
  dropout 0.05     on the experts' input only (the router reads x undropped, as in the codes);
                   CoIN / CL-MoE train_MOE.py lora_dropout 0.05, Continual-NExT 0.05; EasyCL 0
  target_modules "all-linear"   every nn.Linear of the decoder, not the LM head: CoIN and CL-MoE
                   find_all_linear_names (drops lm_head), EasyCL train_config q,k,v,o,gate,up,down
Initialisation (all codes): A_e ~ N(0, 0.01^2), B_e = 0 (the model starts as the base), W_g as
torch's nn.Linear default (kaiming-uniform, a = sqrt(5)).

The authors compute the softmax in the adapters' dtype (bf16 in their runs); here it is float32.
Not confirmed by a source: the statistics include padding positions (the layer does not see
the attention mask). The experts and router train in float32 (the base layer's input is cast to
it and the update cast back), as peft keeps adapters in float32.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.method import Method, MethodError, StageMeans, register
from clbench.runtime import derive_seed

_INIT_SALT = 613  # the experts' and routers' initial draws: a generator of their own


class ExpertGroup(torch.nn.Module):
    """E LoRA experts of rank k and their router rows (E x d_in), one block of a MoELoRALinear."""

    def __init__(self, d_in: int, d_out: int, experts: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.empty(experts, rank, d_in))
        self.lora_B = torch.nn.Parameter(torch.zeros(experts, d_out, rank))
        self.lora_router = torch.nn.Parameter(torch.empty(experts, d_in))
        with torch.no_grad():
            torch.nn.init.normal_(self.lora_A, mean=0.0, std=0.01, generator=generator)
            torch.nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5), generator=generator)  # nn.Linear's default


class MoELoRALinear(torch.nn.Module):
    """base(x) + (alpha / r) sum_e g_e(x) B_e A_e dropout(x), g = softmax over the router logits of
    the experts of the active groups (`active`, indices into `groups`); `base` is the original layer, frozen."""

    def __init__(self, base: torch.nn.Linear, groups: list[ExpertGroup], scaling: float, dropout: float):
        super().__init__()
        self.base = base
        self.groups = torch.nn.ModuleList(groups)
        self.scaling = float(scaling)
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.active = list(range(len(groups)))  # the groups in the forward, in gate order
        self.record = False  # keep the last training forward's gate statistics (diagnostics)
        self.last_stats = None

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """softmax over the active experts' router logits, float32, shape x.shape[:-1] + (experts,)."""
        groups = [self.groups[i] for i in self.active]
        w = torch.cat([g.lora_router for g in groups]) if len(groups) > 1 else groups[0].lora_router
        logits = x.to(w.dtype) @ w.T
        return torch.softmax(logits.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.active:
            return out
        groups = [self.groups[i] for i in self.active]
        dtype = groups[0].lora_A.dtype
        xin = x.to(dtype)
        g = self.gates(xin)  # (..., E): the router reads x itself, the experts its dropout
        xd = self.lora_dropout(xin)
        delta, start = None, 0
        for grp in groups:
            e = grp.lora_A.shape[0]
            h = torch.einsum("...i,eki->...ek", xd, grp.lora_A)  # every expert's rank-k code
            h = h * g[..., start:start + e, None].to(h.dtype)
            d = torch.einsum("...ek,eok->...o", h, grp.lora_B)
            delta = d if delta is None else delta + d
            start += e
        if self.record and self.training:
            with torch.no_grad():
                flat = g.detach().reshape(-1, g.shape[-1])
                ent = -(flat * flat.clamp_min(1e-30).log()).sum(-1).mean()
                self.last_stats = (ent, flat.mean(0))
        return out + (delta * self.scaling).to(out.dtype)


def moe_layers(model) -> list[tuple[str, MoELoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]


def _decoder(model):
    get_dec = getattr(model, "get_decoder", None)
    dec = get_dec() if get_dec is not None else None
    return dec if dec is not None else model


def replace_linears(model, target_modules, make) -> int:
    """Every nn.Linear of the model's decoder (not the LM head) whose name ends with one of
    `target_modules` ("all-linear": every one) becomes make(name, linear); the count replaced."""
    dec = _decoder(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
             and (target_modules == "all-linear" or any(n == t or n.endswith("." + t) for t in target_modules))]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = dec.get_submodule(parent_name) if parent_name else dec
        setattr(parent, child, make(n, getattr(parent, child)))
    return len(names)


class MoELoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experts: int = Field(4, gt=0, description="LoRA experts per adapted layer (CoIN/EasyCL/Continual-NExT: 4)")
    r: int = Field(8, gt=0, description="total rank, r / experts per expert (Continual-NExT, EasyCL: 8)")
    alpha: float = Field(16, gt=0, description="scale alpha / r with r the total rank (the codes' scale 2)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout of the experts' input (CoIN: 0.05)")
    target_modules: Union[Literal["all-linear"], list[str]] = Field("all-linear", description="adapted decoder linears")


@register("moelora")
class MoELoRA(Method):
    Options = MoELoraOptions

    def __init__(self, options: MoELoraOptions):
        self.options = options
        self._means = StageMeans()

    def _groups_per_layer(self, run) -> int:
        return 1

    def _check(self):
        o = self.options
        if o.r % o.experts:
            raise MethodError(f"{self.name}: r ({o.r}) must be a multiple of experts ({o.experts}): each expert "
                              "has rank r / experts (as every source asserts)")

    def setup(self, model, run):
        self._check()
        o = self.options
        for p in model.parameters():
            p.requires_grad_(False)
        n_groups = self._groups_per_layer(run)
        g = torch.Generator().manual_seed(derive_seed(run.seed, 0, _INIT_SALT))

        def make(name, lin):
            groups = [ExpertGroup(lin.in_features, lin.out_features, o.experts, o.r // o.experts, g)
                      for _ in range(n_groups)]
            layer = MoELoRALinear(lin, groups, o.alpha / o.r, o.dropout)
            return layer.to(lin.weight.device)

        if replace_linears(model, o.target_modules, make) == 0:
            raise MethodError(f"{self.name}: no nn.Linear of the decoder matches target_modules {o.target_modules!r}")
        self._after_setup(model)
        return model

    def _after_setup(self, model) -> None:
        for _, m in moe_layers(model):
            m.record = True
            for p in m.groups.parameters():
                p.requires_grad_(True)

    def stage_start(self, model, stage):
        self._means.reset()
        return model

    def fsdp_refusal(self):
        # every expert and router exists from setup, inside its decoder layer's FSDP unit
        # (tests/distributed/test_fsdp_methods.py); the router statistics are each rank's own micro-batches'
        return None

    def extra_loss(self, model, batch, stage, out):
        ents, shares = [], []
        for _, m in moe_layers(model):
            if m.last_stats is not None:
                ent, mean_gate = m.last_stats
                ents.append(ent)
                shares.append(mean_gate)
                m.last_stats = None
        if ents:
            self._means.add("router_entropy", torch.stack(ents).mean())
            self._means.add("max_expert_share", torch.stack([s.max() for s in shares]).mean())
            self._more_stats(shares)
        return None

    def _more_stats(self, shares) -> None:
        return None

    def stage_stats(self, stage):
        """router_entropy (nats; log E = uniform) and max_expert_share (1/E balanced, 1 collapsed):
        means over the stage's micro-batches, adapted layers and positions (padding included)."""
        return self._means.means()
