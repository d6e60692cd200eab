"""OSF, orthogonal subspace fine-tuning ("Sculpting Subspaces", Nayak et al. 2025, arXiv 2504.07097),
through peft's own OSFConfig / OSFModel (peft 0.21.2: peft/tuners/osf/).

Idea: every target matrix is split by its SVD, W = U S V^T (float32), into the top-k singular
triplets (U_high, S_high, V_high: frozen, the directions earlier tasks rely on) and the rest
(U_low, S_low, V_low: trainable). Gradients of U_low and V_low are projected away from the
frozen subspaces (dU <- (I - U_high U_high^T) dU, dV <- dV (I - V_high^T V_high); S_low is not
projected; peft layer.py `_attach_hooks`), and the layer computes
    W x + (U_low S_low V_low - U_low0 S_low0 V_low0) x          (peft layer.py `Linear.forward`)
so Delta W = U_low S_low V_low - U_low0 S_low0 V_low0 stays in the orthogonal complement of the
frozen directions on both sides: U_high^T Delta W = 0 and Delta W V_high^T = 0, hence
U_high^T W V_high^T stays diag(S_high). Continual use (peft docs, package_reference/osf.md,
"Sequential Task Learning"): after each task redo the SVD on the updated weights and freeze
more directions.

How it maps onto clbench's hooks:
- setup returns the plain model (OSF keeps no adapter between stages).
- stage_start(t) wraps the plain model with get_peft_model(OSFConfig(effective_rank=k_t)): the
  SVD of the current (merged) weights, the top k_t directions frozen. peft makes only the
  osf_svd_params (U_low, S_low, V_low) trainable; embeddings, norms and untargeted matrices
  are frozen.
- after_step (option `reproject`, off by default): U_low <- (I - U_high U_high^T) U_low and
  V_low <- V_low (I - V_high^T V_high) after every optimizer step. peft's gradient hooks
  constrain the gradient, and only plain SGD turns a projected gradient into a projected update:
  the loop's optimizer is AdamW, whose per-coordinate scaling (and weight decay on U_low/V_low)
  leaks the update into the frozen subspaces. Re-projecting the parameters themselves restores
  U_high^T Delta W = 0 to rounding under AdamW. This is a deviation from peft and from the
  authors' code (both train with AdamW and the gradient projection only), hence an option.
  The projectors are the ones peft's hooks use (U_high / V_high where peft stores them, else
  U_low0 U_low0^T, which equals I - U_high U_high^T when that factor is square).
- stage_end returns merge_and_unload(): W <- W + Delta W and the plain model again, so
  evaluation, checkpoints (diffs of the plain model's state) and resume see plain weights, as
  full fine-tuning. NOT unload(), which the peft docs and example use between tasks: in peft
  0.21.2 training never writes the base weight, so unload() returns W unchanged and discards the
  task.

Options (defaults and sources):
  ranks None           the frozen count k_t per stage: a list with one entry per stage of the
                       stream, each an int (number of frozen singular directions) or a float in
                       (0, 1] (fraction of min(out, in), peft model.py `_resolve_rank`:
                       int(min_dim * fraction), clamped to [0, min_dim]). None: the peft docs'
                       budget allocation for a known sequence of n tasks ("Task 1: full
                       capacity ... Task n: freeze (n-1)/n"): stage t freezes the fraction
                       (t-1)/n. Two choices no source confirms: stage 1 freezes 1 direction,
                       not 0, because peft refuses effective_rank 0 (layer.py `update_layer`);
                       and the docs' code snippet under that text freezes t/n instead (with a
                       cap of 512 directions), which at stage n freezes every direction of a
                       matrix smaller than the cap and trains nothing, so the text's rule is
                       used. peft's example (examples/orthogonal_subspace_learning/
                       osf_continual_learning.py) uses 0.3, 0.5, 0.7 over three tasks; the
                       authors' T5 code (Red-Hat-AI-Innovation-Team/orthogonal-subspace-
                       learning) k = floor(scale * max(out, in)) capped at min(out, in)
                       (notebooks/finetune_svd.py:465), scale 0.07 + 0.07 per task
                       (notebooks/run_finetuning.sh). k_t = min(out, in) leaves a matrix
                       nothing to train.
  target_modules None  None: peft's OSF default for the model type (utils/constants.py
                       TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING; Llama: q, k, v, o,
                       gate, up, down projections); a list of module names or "all-linear".
  reproject False      the after_step re-projection above (a deviation; off = peft as is).
In mode single every stage is a fresh run from the base model with that stage's k_t.

Trainable entries per target matrix: (out + in + 1) * (min(out, in) - k_t); trainable_params
reports them for the last stage run (at the default k about as many as full fine-tuning of the
targets; at stage 1 of the default schedule, one frozen direction, about twice their entries).
Learning rate: the peft docs advise 1e-5 to 1e-4, the peft example 5e-6, the authors' code 1e-5
(AdamW after projecting the gradients, notebooks/finetune_svd.py:813, :830-831).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, confloat

from clbench.method import Method, MethodError, StageMeans, register

Rank = Union[PositiveInt, confloat(gt=0, le=1)]


class OSFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ranks: Optional[list[Rank]] = Field(None, description="frozen singular directions per stage (int count or fraction "
                                                          "of min(out, in)); None: stage t of n freezes (t-1)/n")
    target_modules: Optional[Union[Literal["all-linear"], list[str]]] = Field(
        None, description="None: peft's OSF default for the model type (Llama: q, k, v, o, gate, up, down)")
    reproject: bool = Field(False, description="re-project U_low, V_low off the frozen subspaces after every "
                                               "optimizer step (AdamW leaks; a deviation from peft)")


def resolve_rank(value, min_dim: int) -> int:
    """peft's reading of an effective_rank (model.py `_resolve_rank`): a float in (0, 1] is a
    fraction of min_dim, anything else a count; clamped to [0, min_dim]."""
    r = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, r), 0)


def osf_layers(model):
    from peft.tuners.osf.layer import OSFLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, OSFLayer)]


@register("osf")
class OSF(Method):
    Options = OSFOptions

    def __init__(self, options: OSFOptions):
        self.options = options
        self.n_stages = 0
        self.stage = 0
        self._means = StageMeans()  # per step: the gradient share peft's projection removes (stage_stats)
        self._sq: dict[str, torch.Tensor | None] = {"raw": None, "kept": None}
        self._handles: list = []

    def setup(self, model, run):
        self.n_stages = len(run.tasks)
        ranks = self.options.ranks
        if ranks is not None and len(ranks) < self.n_stages:
            raise MethodError(f"osf: ranks has {len(ranks)} entries for a stream of {self.n_stages} stages")
        return model

    def effective_rank(self, t: int):
        """The effective_rank given to OSFConfig at stage t (see the module docstring)."""
        if self.options.ranks is not None:
            return self.options.ranks[t - 1]
        return 1 if t == 1 else (t - 1) / self.n_stages

    def stage_start(self, model, stage):
        from peft import OSFConfig, get_peft_model

        t = stage.stage
        if not 1 <= t <= self.n_stages:
            raise MethodError(f"osf: stage {t} outside the stream's {self.n_stages} stages")
        self.stage = t
        cfg = OSFConfig(effective_rank=self.effective_rank(t), target_modules=self.options.target_modules)
        model = get_peft_model(model, cfg)
        self._means.reset()
        self._watch_projection(model)
        return model

    def _watch_projection(self, model) -> None:
        """Gradient hooks either side of peft's projection hooks on U_low and V_low (tensor hooks run
        in the order registered, each on the previous one's output): the first adds |dU|^2 before the
        projection, the last |P dU|^2 after it. peft's hooks are detached and attached again between
        ours (OSFLayer._detach_hooks / _attach_hooks); a peft without them gets no diagnostics."""
        self._handles = []
        self._sq = {"raw": None, "kept": None}

        def tally(which):
            def hook(grad):
                v = grad.detach().float().pow(2).sum()
                self._sq[which] = v if self._sq[which] is None else self._sq[which] + v
            return hook

        for _, layer in osf_layers(model):
            if not (hasattr(layer, "_detach_hooks") and hasattr(layer, "_attach_hooks")):
                continue
            layer._detach_hooks()
            tensors = [p[k] for p in layer.osf_svd_params.values() for k in ("U_low", "V_low")]
            self._handles += [t.register_hook(tally("raw")) for t in tensors]
            for a in list(layer.osf_svd_params):
                layer._attach_hooks(a)
            self._handles += [t.register_hook(tally("kept")) for t in tensors]

    def after_backward(self, model, stage):
        raw, kept = self._sq["raw"], self._sq["kept"]
        self._sq = {"raw": None, "kept": None}
        if raw is not None and kept is not None:  # |g - P g| / |g| = sqrt(|g|^2 - |P g|^2) / |g| (P a projector)
            self._means.add("projected_fraction", ((raw - kept).clamp_min(0) / raw.clamp_min(1e-30)).sqrt())

    def stage_stats(self, stage):
        """projected_fraction: the mean over the stage's optimizer steps of |g - P g| / |g| over the
        U_low and V_low gradients (S_low is not projected), summed over the step's micro-batches:
        the share of the gradient's norm that peft's projection removed."""
        return self._means.means()

    @torch.no_grad()
    def after_step(self, model, stage):
        if not self.options.reproject:
            return
        for _, layer in osf_layers(model):
            for a in layer.active_adapters:
                if a not in layer.osf_svd_params:
                    continue
                p = layer.osf_svd_params[a]
                p["U_low"].copy_(project_u(layer, a, p["U_low"]))
                p["V_low"].copy_(project_v(layer, a, p["V_low"]))

    def stage_end(self, model, stage):
        for h in self._handles:
            h.remove()
        self._handles = []
        return model.merge_and_unload()

    def fsdp_refusal(self):
        return ("peft's OSF replaces every target matrix by its SVD factors at each stage start, new parameters "
                "FSDP2 (which shards those present at setup) would not manage, and its SVDs and gradient "
                "projections (I - U_high U_high^T) dU mix the rows FSDP2 splits over the ranks; not implemented "
                "sharded")

    def trainable_params(self, model):
        """(out + in + 1) * (min(out, in) - k) over the target matrices at the last stage run."""
        t = self.stage or 1
        value, total = self.effective_rank(t), 0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for _, m in target_linears(base, self.options.target_modules):
            out_f, in_f = m.weight.shape
            mn = min(out_f, in_f)
            total += (out_f + in_f + 1) * (mn - resolve_rank(value, mn))
        return total

    def state_dict(self):
        # the weights are merged into the plain model at every stage end (checkpointed by the loop)
        return {"stage": self.stage}

    def load_state_dict(self, state):
        self.stage = int(state.get("stage", 0))


def project_u(layer, adapter: str, u: torch.Tensor) -> torch.Tensor:
    """(I - U_high U_high^T) u, as peft's gradient hook projects dU."""
    if adapter in layer._osf_U_high:
        uh = layer._osf_U_high[adapter]
        return u - uh @ (uh.T @ u)
    u0 = layer._osf_U_low_init[adapter]
    return u0 @ (u0.T @ u)


def project_v(layer, adapter: str, v: torch.Tensor) -> torch.Tensor:
    """v (I - V_high^T V_high), as peft's gradient hook projects dV."""
    if adapter in layer._osf_V_high:
        vh = layer._osf_V_high[adapter]
        return v - (v @ vh.T) @ vh
    v0 = layer._osf_V_low_init[adapter]
    return (v @ v0.T) @ v0


def target_linears(model, target_modules):
    """The Linear modules peft's OSF wraps: names matching a target (a list entry matches the name
    or its last components, as peft matches a list), "all-linear" every Linear but the output
    layer, None peft's OSF default for the model type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if target_modules is None:
        target_modules = TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING.get(model.config.model_type, "all-linear")
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m is head:
            continue
        name = name.removesuffix(".base_layer")  # inside a model peft has wrapped
        if target_modules == "all-linear" or any(name == t or name.endswith("." + t) for t in target_modules):
            out.append((name, m))
    return out
