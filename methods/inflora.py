"""InfLoRA, interference-free low-rank adaptation (Liang & Li, CVPR 2024, arXiv 2404.00228).

Code: liangyanshuo/InfLoRA (class-incremental ViT: methods/inflora.py, models/vit_inflora.py) and
its LLM adaptation in liangyanshuo/gainlora (src/cl_trainer_inflora.py, src/run_t5.py,
src/t5_inflora.py), which this port follows.

Idea: every task gets its own LoRA, Delta W_t = B_t A_t, on top of the earlier ones (frozen,
summed). A_t is designed before training and then frozen; only B_t trains (from 0). A_t's rows
are orthogonal to M, an orthonormal basis (per module input) of the inputs earlier tasks fed
that module, kept by gradient projection memory (GPM): so B_t A_t x = 0 for every x in span(M)
and the new task cannot move the outputs old inputs produce, in the directions M captured.

    h = W x + sum_{s <= t} (alpha / r) B_s A_s x,   A_t M = 0,   only B_t trains

How it maps onto clbench's hooks (the adapter structure is O-LoRA's, methods/olora.py, whose
class this one extends: one peft adapter per stage created at setup, adapters of the trained
stages and the current one active and summed by peft, everything but the current adapter
frozen):
- stage_start(t): O-LoRA's activation, then A_t is set and frozen (requires_grad False; only
  lora_B of adapter t reaches the optimizer, as GainLoRA's run_t5.py trains only lora_B):
    init random (GainLoRA, cl_trainer_inflora.py `get_reg_matrix`): peft's kaiming-uniform A_t
      (GainLoRA's LoRALayer uses the same init) projected, A_t <- A_t (I - M M^T), each row then
      rescaled to norm 1/sqrt(3); at the first stage (M empty) A_t is left as initialised.
    init svd (the ViT paper's design, methods/inflora.py:122-157): H_t = the mean of x x^T of
      the module's input over the new stage's examples, H_t <- H_t - M M^T H_t, A_t = (top-r left
      singular vectors of H_t)^T / sqrt(3).
  Both project A_t against M twice more in float64 (rounding) and give a row that the
  projection leaves at zero (M spanning everything) zero instead of rescaled noise.
- stage_end(t): H_t again, with the trained model, and the GPM update of M with the energy
  threshold eps_t = eps + (1 - eps) (t - 1) / T (T: the stream's stages; ViT
  methods/inflora.py:322, GainLoRA :212 with T hard-coded to 15), by the authors' rule
  (ViT :330-366, GainLoRA `get_repsentation`): with S the singular values of H_t,
    M empty: M = the top max(r, 1) left singular vectors, r = #{i: cumsum(S^2)_i / sum S^2 < eps_t};
    else:    with S' those of H' = (I - M M^T) H_t, the captured energy starts at
             (sum S^2 - sum S'^2) / sum S^2 and the top singular vectors of H' are appended
             while it is below eps_t (none: M unchanged); at most d columns.
  The appended vectors are re-orthogonalised against M (QR) so M^T M = I holds to rounding.
  Energies are squared singular values of H = mean x x^T, as both codes compute them (GPM on
  the representation matrix R, H ~ R R^T, would use S(R)^2 = S(H)).
- H: a no_grad pass of the decoder (no LM head) over the stage's training examples in order, in
  batches of the train batch size, under the loop's autocast, with forward pre-hooks on the
  adapted modules summing x x^T in float64 over non-padding positions only (GainLoRA's
  t5_inflora.py counts padding). Modules fed the same tensor (q_proj and v_proj read the same
  normed hidden state) share one H and one M, as the ViT code keeps one per attention input.
- state_dict: O-LoRA's plus M per module (float32, CPU); the adapters live in the model.
  In mode single every stage is a fresh run: M is empty and A_t is designed as at stage 1.

Options (defaults and sources):
  r 4, alpha 32, dropout 0.0, target_modules [q_proj, v_proj]
                     GainLoRA's InfLoRA scripts (gen_script_superni_order1_t5_inflora.sh:
                     --lora_r 4 --lora_alpha 32 --lora_dropout 0.0; q and v of every
                     attention); the ViT code: r 10, k and v
  eps 0.995          GainLoRA's scripts (--threshold 0.995); ViT: 0.95 (CIFAR-100), 0.98
                     (ImageNet-R), configs/*_inflora.json `lamb`
  init random        GainLoRA (random projected); svd: the ViT code's design from H
  max_batches None   all of the stage's examples in each pass (the ViT code); an int: a seeded
                     random subset of that many batches (the same in both passes of a stage).
                     GainLoRA stops after its first 1001 batches (cl_trainer_inflora.py:189).
                     A pass is a forward per batch: over a large training set and a short stage
                     it costs more than the training itself

Not confirmed by a source: the passes run in eval mode (no adapter dropout in H; neither
code sets a mode for its passes). H is taken on the stage's training examples, as both codes
take it on their train loader.
Memory: H is d x d float64 per distinct module input during a pass (SmolLM2-135M, q/v: 30 of
576 x 576, 80 MB); M is d x k float32.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.data.examples import collate
from clbench.distributed import fsdp
from clbench.method import MethodError, register
from clbench.method.masking import derive_seed, local_rows, own_rows
from clbench_builtin.methods import olora as _olora_mod  # its class is the structure InfLoRA extends

_SUBSET_SALT = 401  # the examples of a capped H pass: a draw of its own, apart from the batch order

adapter_name, lora_layers = _olora_mod.adapter_name, _olora_mod.lora_layers


class InfLoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(4, gt=0, description="rank of each stage's adapter (GainLoRA: 4)")
    alpha: float = Field(32, gt=0, description="scaling numerator, scale = alpha / r (GainLoRA: 32)")
    dropout: float = Field(0.0, ge=0, lt=1, description="adapter dropout (GainLoRA: 0)")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                                                   description="adapted modules (GainLoRA: q and v)")
    eps: float = Field(0.995, gt=0, lt=1, description="GPM energy threshold at stage 1; eps_t rises toward 1 over the stream")
    init: Literal["random", "svd"] = Field("random", description="A_t: random projected (GainLoRA) or from H's top "
                                                                 "singular vectors (the ViT paper)")
    max_batches: Optional[int] = Field(None, gt=0, description="batches per H pass (None: all the stage's examples)")


def threshold(eps: float, t: int, n_stages: int) -> float:
    """eps_t = eps + (1 - eps) (t - 1) / T."""
    return eps + (1.0 - eps) * (t - 1) / n_stages


def gpm_update(m: torch.Tensor | None, h: torch.Tensor, thr: float) -> torch.Tensor | None:
    """The GPM basis after a task with input second-moment matrix h (d x d), by the authors'
    rule (see the module docstring); float64 in and out. None: an empty basis."""
    h = h.double()
    d = h.shape[0]
    u1, s1, _ = torch.linalg.svd(h)
    total = (s1 ** 2).sum()
    if total <= 0:
        return m
    if m is None or m.shape[1] == 0:
        r = int((torch.cumsum(s1 ** 2 / total, 0) < thr).sum())
        return u1[:, :max(r, 1)].contiguous()
    act = h - m @ (m.T @ h)
    u, s, _ = torch.linalg.svd(act)
    ratio = s ** 2 / total
    acc = float((total - (s ** 2).sum()) / total)
    r = 0
    for v in ratio.tolist():
        if acc >= thr:
            break
        acc += v
        r += 1
    r = min(r, d - m.shape[1])
    if r == 0:
        return m
    new = u[:, :r]
    new = new - m @ (m.T @ new)
    q, _ = torch.linalg.qr(new)
    return torch.cat([m, q], 1)


def project_rows(a: torch.Tensor, m: torch.Tensor | None, rescale: bool) -> torch.Tensor:
    """a (I - M M^T) in float64 (three times: rounding), rows rescaled to norm 1/sqrt(3) if
    `rescale`; a row the projection leaves at (numerically) zero becomes zero."""
    a = a.detach().double().cpu()  # M lives on the CPU
    if m is None or m.shape[1] == 0:
        return a
    before = a.norm(dim=1, keepdim=True)
    for _ in range(3):
        a = a - (a @ m) @ m.T
    norm = a.norm(dim=1, keepdim=True)
    alive = norm > 1e-6 * before.clamp(min=1e-30)
    if rescale:
        a = torch.where(alive, a / (math.sqrt(3) * norm.clamp(min=1e-30)), torch.zeros_like(a))
    else:
        a = torch.where(alive, a, torch.zeros_like(a))
    return a


@torch.no_grad()
def input_moments(model, examples, batch_size: int, pad_id: int, autocast):
    """{module name: (mean x x^T over the non-padding positions, float64 CPU; the group leader)}:
    one no_grad pass of the decoder over `examples` with pre-hooks on the LoRA layers. Modules
    fed the same tensor in a forward share the leader's matrix."""
    wanted = set(lora_layers(model))
    layers = {n: mod for n, mod in model.named_modules() if mod in wanted}
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    leader: dict[str, str] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # this batch: id(input) -> (first module, input kept alive)
    mask_box: list[torch.Tensor] = []

    def hook(name):
        def pre(module, args):
            x = args[0]
            first = seen.get(id(x))
            if first is not None and first[1] is x:
                leader.setdefault(name, first[0])
                return None
            seen[id(x)] = (name, x)
            leader.setdefault(name, name)
            if leader[name] != name:
                raise MethodError(f"inflora: module {name} shared its input with {leader[name]} in one batch, not in another")
            sel = x[mask_box[0]].double()
            with torch.autocast(device.type, enabled=False):
                g = sel.T @ sel
            sums[name] = sums[name] + g if name in sums else g
            counts[name] = counts.get(name, 0) + sel.shape[0]
            return None
        return pre

    handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in layers.items()]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    run = decoder if decoder is not None and decoder is not base else base
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(list(examples[i:i + batch_size]), pad_id)
            mask_box[:] = [batch["attention_mask"].to(device).bool()]
            seen.clear()
            with autocast():
                run(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        seen.clear()
        for h in handles:
            h.remove()
        model.train(was_training)
    means = {n: (s / max(counts[n], 1)).cpu() for n, s in sums.items()}
    return {n: (means[leader[n]], leader[n]) for n in layers if n in leader}


_OLoRA = _olora_mod.OLoRA


@register("inflora")
class InfLoRA(_OLoRA):
    Options = InfLoraOptions

    def __init__(self, options: InfLoraOptions):
        super().__init__(options)
        self.M: dict[str, torch.Tensor] = {}  # module name -> orthonormal basis (d x k, float32, CPU)

    def _pass(self, model, stage):
        """H of every LoRA layer on the stage's examples: all of them, or with max_batches a
        seeded random subset of that many batches (the same subset in both passes of a stage)."""
        o = self.options
        tok = stage.run.tokenizer if stage.run is not None else None
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        examples, bs = list(stage.examples), stage.train_config.batch_size
        if o.max_batches is not None and o.max_batches * bs < len(examples):
            gen = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, _SUBSET_SALT))
            examples = [examples[i] for i in torch.randperm(len(examples), generator=gen)[:o.max_batches * bs].tolist()]
        with fsdp.unsharded(model):  # sharded: every rank gathers the model and passes over every example
            return input_moments(model, examples, bs, pad, stage.autocast)

    def _basis(self, name: str):
        m = self.M.get(name)
        return None if m is None else m.double()

    def stage_start(self, model, stage):
        model = super().stage_start(model, stage)  # adapters active, only adapter t trainable
        o, t = self.options, stage.stage
        current = adapter_name(t)
        moments = self._pass(model, stage) if o.init == "svd" else {}
        names = {mod: n for n, mod in model.named_modules()}
        with torch.no_grad():
            for layer in lora_layers(model):
                if current not in layer.lora_A:
                    continue
                name, w = names[layer], layer.lora_A[current].weight
                m = self._basis(name)
                if o.init == "svd":
                    if name not in moments:
                        raise MethodError(f"inflora: module {name} saw no input in the pass over stage {t}'s examples")
                    h = moments[name][0].double()
                    if m is not None:
                        h = h - m @ (m.T @ h)
                    if o.r > h.shape[0]:
                        raise MethodError(f"inflora: r={o.r} exceeds the input size {h.shape[0]} of {name}")
                    u = torch.linalg.svd(h)[0]
                    a = project_rows(u[:, :o.r].T / math.sqrt(3), m, rescale=m is not None)
                else:
                    a = project_rows(fsdp.full(w.detach()), m, rescale=True)
                local_rows(w)[0].copy_(own_rows(a, w).to(w.dtype))  # sharded: this rank's rows of A_t
                w.requires_grad_(False)
        return model

    def extra_loss(self, model, batch, stage, out):
        return None  # A_t is fixed orthogonal to M: no penalty (O-LoRA's is not part of InfLoRA)

    def fsdp_refusal(self):
        # every adapter exists from setup (O-LoRA's structure); the passes gather the model
        # (fsdp.unsharded) on every rank, so every rank computes the same bases, and each writes its
        # own rows of A_t (tests/distributed/test_fsdp_methods.py)
        return None

    def stage_end(self, model, stage):
        model = super().stage_end(model, stage)
        thr = threshold(self.options.eps, stage.stage, self.n_stages)
        moments = self._pass(model, stage)
        new: dict[str, torch.Tensor] = {}
        for name, (h, lead) in moments.items():
            if lead not in new:
                m = gpm_update(self._basis(lead), h, thr)
                new[lead] = None if m is None else m.float().contiguous()
            if new[lead] is not None:
                self.M[name] = new[lead]
        return model

    def state_dict(self):
        state = dict(super().state_dict() or {})
        state["M"] = dict(self.M)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.M = {n: m.float().cpu() for n, m in (state.get("M") or {}).items()}
