"""HFT, Half Fine-Tuning (Hui et al. 2024, arXiv 2404.18466).

Idea: at the start of EACH stage freeze about half of the parameters, chosen at the category
level per layer and redrawn every stage; the frozen half keeps the old knowledge (less
forgetting than full fine-tuning), and frozen matrices skip their weight-gradient GEMM and
the optimizer (the paper reports about 30% less training time).

The draw per layer (paper, rule `count`):
  attention  freeze 2 of {q, k, v, o};
  MLP        in a random half of the layers freeze 2 of {gate, up, down}, in the other half 1
             (with an odd number of layers, floor(L/2) layers freeze 2);
  norms      freeze 1 of {input_layernorm, post_attention_layernorm}.
Frozen matrices get requires_grad=False (whole tensors, clbench.method.masking.MaskedUpdate): autograd
skips their weight-gradient GEMMs and the optimizer never holds them. Under autocast a frozen
nn.Linear also keeps one cast copy of its weight for the stage instead of casting the float32
weight at every forward (the weight cannot change while frozen; the copy is checked against
the weight's version counter and dropped at stage_end): the same values, so the same results.

Rule `params` (ours, for grouped-query attention, where k and v are smaller than q and o so
"2 of 4" is not half the attention): MLP and norms as above; the attention subset (at least
one matrix frozen and at least one trained, so attention stays half-tuned at category level)
is the one that brings the layer's frozen parameter count closest to half of the layer's
parameters; ties are drawn at random. Per layer the frozen count is then within one matrix
of half (for SmolLM2-135M and the tiny model it is half within one k/v matrix, and exactly half
summed over each pair of MLP-2/MLP-1 layers).

Randomness: a torch.Generator seeded from (run seed, stage) (clbench.method.masking.derive_seed), so the
same seed gives the same draw and every stage a new one; the loop's batch RNG is untouched.

Embeddings and LM head (option `embeddings`): the paper's rule (its Figure 2 and Section 3,
as far as read here) is stated for the decoder layers' categories; what it does with the input
embedding and the LM head is not stated in anything read for this file, and no authors' code
is public. Unconfirmed, so an option:
  draw   (default) one more category, drawn per stage with the others: untied, freeze 1 of
         {embed_tokens, lm_head} (as the norms); tied (SmolLM2: one 28M tensor), freeze it in a
         random half of the stages. This keeps "half of the parameters frozen" true of the
         whole model on average and protects the head in some stages. Keeping them always
         trainable (the previous default) makes 81M of SmolLM2-135M's 134M weights train at
         every stage (60%, not half) and never protects the tied embedding/head.
  train  always trainable (the previous behaviour).
  freeze always frozen.
The draw comes after the layers' draw from the same generator, so the layers' choice for a
(seed, stage) is the same under every setting.

Options:
  rule              "count" (paper) or "params".
  embeddings        "draw" (see above), "train" or "freeze".
  train_final_norm  true: the final norm always trains (unconfirmed: the paper states the
                    per-layer rule only).
  salt              0: mixed into the seed (draw a different family of masks).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

import types

from clbench.method import MethodError, register
from clbench.method.masking import MaskedMethod, MaskedUpdate, derive_seed

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
NORMS = ["input_layernorm", "post_attention_layernorm"]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.|mlp\.)?(" + "|".join(ATTN + MLP + NORMS) + r")\.weight$")


class HftOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rule: Literal["count", "params"] = Field("count", description="count = the paper's 2-of-4 / 2-or-1-of-3 / 1-of-2; params = closest to half the layer's parameters")
    embeddings: Literal["draw", "train", "freeze"] = Field(
        "draw", description="input embeddings and lm_head: a category drawn per stage like the others (untied: "
                            "freeze 1 of 2; tied: frozen in half of the stages), always trained, or always frozen")
    train_final_norm: bool = Field(True, description="the final norm always trains (unconfirmed)")
    salt: int = Field(0, description="mixed into the stage seed")


def layer_params(model: torch.nn.Module) -> dict[int, dict[str, tuple[str, int]]]:
    """layer index -> category member (q_proj, ..., input_layernorm) -> (parameter name, numel)."""
    layers: dict[int, dict[str, tuple[str, int]]] = {}
    for n, p in model.named_parameters():
        m = _LAYER.search(n)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = (n, p.numel())
    for i, members in layers.items():
        missing = [c for c in ATTN + MLP + NORMS if c not in members]
        if missing:
            raise MethodError(f"hft: layer {i} lacks {missing}; HFT needs a Llama-style decoder")
    return dict(sorted(layers.items()))


def _pick(items: list[str], k: int, gen: torch.Generator) -> list[str]:
    return [items[i] for i in sorted(torch.randperm(len(items), generator=gen)[:k].tolist())]


def draw_frozen(layers: dict[int, dict[str, tuple[str, int]]], rule: str, gen: torch.Generator) -> dict[int, list[str]]:
    """layer -> the frozen members of that layer."""
    idx = list(layers)
    mlp2 = set(_pick(idx, len(idx) // 2, gen))
    frozen = {}
    for i in idx:
        size = {c: layers[i][c][1] for c in ATTN + MLP + NORMS}
        mlp = _pick(MLP, 2 if i in mlp2 else 1, gen)
        norm = _pick(NORMS, 1, gen)
        if rule == "count":
            attn = _pick(ATTN, 2, gen)
        else:
            half = sum(size.values()) / 2
            rest = sum(size[c] for c in mlp + norm)
            subsets = [[ATTN[j] for j in range(4) if bits >> j & 1] for bits in range(1, 15)]  # 1..3 of 4
            gaps = [abs(rest + sum(size[c] for c in s) - half) for s in subsets]
            best = [s for s, g in zip(subsets, gaps) if g == min(gaps)]
            attn = best[int(torch.randint(len(best), (1,), generator=gen))]
        frozen[i] = attn + mlp + norm
    return frozen


def _frozen_linear_forward(module, x):
    """nn.Linear's forward with the autocast copy of its frozen weight kept across steps."""
    dev = x.device.type
    w = module.weight
    if not torch.is_autocast_enabled(dev) or w.requires_grad:
        return torch.nn.functional.linear(x, w, module.bias)
    dt = torch.get_autocast_dtype(dev)
    c = module.__dict__.get("_hft_cast")
    if c is None or c[0] != w._version or c[1] != dt:
        with torch.no_grad():
            c = (w._version, dt, w.to(dt))
        module.__dict__["_hft_cast"] = c
    return torch.nn.functional.linear(x, c[2], module.bias)


@register("hft")
class HFT(MaskedMethod):
    Options = HftOptions

    def __init__(self, options: HftOptions):
        self.options = options
        self.update: MaskedUpdate | None = None
        self.frozen: list[dict[int, list[str]]] = []  # per stage: layer -> frozen members
        self.frozen_embeddings: list[list[str]] = []  # per stage: the frozen embedding / head parameter names

    def setup(self, model, run):
        self.layers = layer_params(model)
        return model

    @staticmethod
    def embedding_names(model) -> list[str]:
        """The input embedding's and the LM head's parameter names (one when they are tied)."""
        mods = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        return [n for n, p in model.named_parameters() if any(p is m.weight for m in mods)]

    def draw_embeddings(self, model, gen: torch.Generator) -> list[str]:
        """The embedding / head parameters frozen this stage (option `embeddings`)."""
        names = self.embedding_names(model)
        mode = self.options.embeddings
        if mode == "train" or not names:
            return []
        if mode == "freeze":
            return names
        if len(names) == 1:  # tied: one tensor, frozen in half of the stages
            return names if bool(torch.randint(2, (1,), generator=gen)) else []
        return _pick(names, len(names) // 2, gen)

    def trainable_names(self, model, frozen: dict[int, list[str]], frozen_embeddings=()) -> list[str]:
        o = self.options
        frozen_names = {self.layers[i][c][0] for i, cs in frozen.items() for c in cs} | set(frozen_embeddings)
        in_layers = {n for members in self.layers.values() for n, _ in members.values()}
        emb = set(self.embedding_names(model))
        names = []
        for n, _ in model.named_parameters():
            if n in in_layers or n in emb:
                ok = n not in frozen_names
            else:  # the final norm (and anything else outside the layers)
                ok = o.train_final_norm
            if ok:
                names.append(n)
        return names

    def stage_start(self, model, stage):
        gen = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, self.options.salt))
        frozen = draw_frozen(self.layers, self.options.rule, gen)
        frozen_emb = self.draw_embeddings(model, gen)
        self.frozen.append(frozen)
        self.frozen_embeddings.append(frozen_emb)
        self.update = MaskedUpdate.whole(self.trainable_names(model, frozen, frozen_emb))
        model = self.update.apply(model)
        self._uncache()
        for mod in model.modules():
            if type(mod) is torch.nn.Linear and not mod.weight.requires_grad:
                mod.forward = types.MethodType(_frozen_linear_forward, mod)
                self._cached.append(mod)
        return model

    def stage_end(self, model, stage):
        self._uncache()
        return model

    def _uncache(self):
        for mod in getattr(self, "_cached", []):
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("_hft_cast", None)
        self._cached = []

    def fsdp_refusal(self):
        return None  # whole tensors frozen; the seeded draw is the same on every rank

    def state_dict(self):
        return {"frozen": self.frozen, "frozen_embeddings": self.frozen_embeddings}

    def load_state_dict(self, state):
        self.frozen = state["frozen"]
        self.frozen_embeddings = list(state.get("frozen_embeddings", []))
