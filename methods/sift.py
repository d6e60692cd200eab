"""SIFT: Sparse Increment Fine-Tuning (Song et al. 2023, arXiv 2312.11875; code song-wx/SIFT).

Idea. Only a small, gradient-selected set of entries of each weight matrix trains. For every
target matrix W (q, k, v, o, gate, up, down projections) the method keeps a dense vector
delta in R^k and a fixed index set idx of k flat positions of W:

  1. selection: at the first backward of a stage, idx = top-k entries of |grad W| (per matrix;
     ties to the lowest flat positions, clbench.method.masking.topk_masks); the indices stay fixed for
     the stage (a new selection at every stage of the stream);
  2. the sparse gradient: each target nn.Linear runs, for the rest of the stage, through a
     custom autograd function (`_SparseGradLinear`) whose backward computes grad_input as usual
     and, per matrix, the dense weight gradient grad_out^T @ input only transiently (one matrix
     at a time, in the autocast dtype), returning just its k entries at idx as the gradient of
     delta (autograd sums them over gradient-accumulation micro-batches into delta.grad). W
     itself has requires_grad=False after the selection step: no dense float32 gradient, no
     AccumulateGrad, and the optimizer never sees W. (A target that is not a plain nn.Linear
     falls back to a gradient hook on W: `register_post_accumulate_grad_hook` gathers
     grad W[idx] into delta.grad and sets W.grad = None at once.)
  3. the optimizer (AdamW, built by the loop from `param_groups`) holds state for the deltas
     ONLY: 2 x k floats per matrix instead of 2 x numel;
  4. after each optimizer step: W.view(-1)[idx] += delta; delta = 0 (`after_step`); the stage
     end flushes once more (a no-op unless a step was interrupted).
  Entries of W outside idx, and every non-target parameter, are bit-identical through a stage.

Options (defaults and their source):
  rate               0.05   fraction of each matrix's entries; budget k = min(int(rate*numel)+1,
                            numel) as in the code. 0.05 is the paper's LLaMA instruction-tuning
                            rate (lr 2e-4); the paper uses 0.008 on GLUE with RoBERTa.
  target_modules     q_proj k_proj v_proj o_proj gate_proj up_proj down_proj  (the code's
                            `sift_targetmodules` default); a parameter is a target when its name
                            ends with "<module>.weight".
  selection_batches  1      optimizer steps whose |grad| is summed before selecting (the code
                            uses one batch; more is an option of this benchmark). With
                            gradient accumulation, one step's |grad| is |sum of its micro-batch
                            gradients|.
  train_selection_step False  the selection step's gradient is discarded: its optimizer step
                            finds no gradient and changes no weight, and training starts with
                            the next step (the stage keeps its step count; the selection step
                            is one of them). So does the code (song-wx/SIFT sift/sift.py,
                            get_sparse_grad: on the first gradient of a matrix it picks idx by
                            topk |grad|, sets the dense gradient to None and returns without
                            filling the sparse one). True: that step's gradient at idx becomes
                            delta.grad and the optimizer steps on it (this file's earlier
                            default). Earlier selection steps (when selection_batches > 1) never
                            train. Difference kept: the code selects from the first
                            micro-batch's gradient, this file from the selection step's (the
                            sum over its grad_accum micro-batches; the same with grad_accum 1).
  decay_selected     False  weight decay. In the code the sparse parameters are increments that
                            are zero before every step, so AdamW's decoupled decay (p *= 1-lr*wd)
                            on them is a no-op: SIFT effectively trains WITHOUT weight decay even
                            though its script passes 0.01. Default: the same (the deltas' group
                            has weight_decay 0, so the run's train.weight_decay is ignored).
                            True: decay the selected entries W[idx] exactly as AdamW decays a
                            dense parameter: before each step delta is loaded with W[idx], the
                            group gets train.weight_decay, and after the step W[idx] = delta.

Sharded (distributed.strategy fsdp): W's rows are split over the ranks, the forward and backward
see the gathered W (FSDP gathers it), so every rank holds all k entries of idx and delta; the
selection is exact over the shards (clbench.method.masking.topk_masks on each rank's rows of |grad W|),
each rank's delta.grad (its share of the batch) is summed over the ranks before the method's
masks and clipping, and each rank flushes its own run of idx into its rows of W. Targets must
then be plain nn.Linear weights.

Non-target parameters (embeddings, lm_head, norms) are frozen. The code trains only the sparse
entries plus an optional `exception` list of densely trained modules; its instruction-tuning
script passes no exceptions (so embeddings stay frozen there); the GLUE setup is not checked.
Unconfirmed choices: per-stage reselection in a stream
(the paper trains one task); selection by the summed |grad| of several steps.

Peak memory: the selection step necessarily holds dense gradients of the target matrices
(one step, and one |grad| buffer per matrix while selection_batches > 1); afterwards gradients
of W exist only transiently inside the backward, one matrix at a time, and the sparse linear
keeps no autocast copy of W for the backward (it recasts W there, one matrix at a time).
Optimizer state: 2 x k floats per matrix.
"""

from __future__ import annotations

import types

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.distributed import collectives
from clbench.method import MethodError, Method, register
from clbench.method.masking import gather_rows, reshard, local_rows, topk_masks

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SiftOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(0.05, gt=0, le=1, description="fraction of each target matrix that trains (k = int(rate*numel)+1)")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1,
                                      description="module names whose .weight is trained sparsely")
    selection_batches: int = Field(1, gt=0, description="optimizer steps whose |grad| is summed before selecting indices")
    train_selection_step: bool = Field(False, description="the last selection step also trains (the code discards it)")
    decay_selected: bool = Field(False, description="apply AdamW weight decay to the selected entries W[idx] (the code: none)")


def budget(numel: int, rate: float) -> int:
    return min(int(rate * numel) + 1, numel)


class _SparseGradLinear(torch.autograd.Function):
    """y = x @ W^T (+ b), differentiable in x and in delta, the increment of W at the flat
    indices idx (delta is 0 at every forward: after_step flushes it into W).

    d loss / d delta = (grad_out^T @ x).view(-1)[idx]: the dense product exists only inside this
    backward, for this one matrix. Under autocast, x and W are cast to the autocast dtype as
    F.linear does, but W's copy is not kept for the backward (recast there from the parameter),
    and consecutive calls on the same input (q, k, v; gate, up) share one cast copy of x.
    `holder` (the SIFT instance) keeps that one-entry cache."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx_t, holder):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and weight.is_floating_point() else weight.dtype
        c = holder._xcast
        if c is not None and c[0] is x and c[1] == x._version and c[2] == dt:
            xc = c[3]
        else:
            xc = x.to(dt)
            holder._xcast = (x, x._version, dt, xc) if xc is not x else None
        with torch.autocast(dev, enabled=False):
            y = torch.nn.functional.linear(xc, weight.to(dt), None if bias is None else bias.to(dt))
        ctx.save_for_backward(xc, weight, idx_t)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, weight, idx_t = ctx.saved_tensors
        gx = gd = None
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = g2.mm(weight.to(g2.dtype)).view(*gy.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            # (x^T @ grad_out) is W's gradient transposed, as autograd's own mm backward forms it;
            # idx_t are the selected flat positions of W mapped into that transposed layout
            gwt = xc.reshape(-1, xc.shape[-1]).t().mm(g2)
            gd = gwt.view(-1).index_select(0, idx_t).to(torch.float32)
            del gwt
        return gx, None, None, gd, None, None


def _sparse_forward(sift, name, module, x):
    return _SparseGradLinear.apply(x, module.weight, module.bias, sift.deltas[name], sift.idx_t[name], sift)


class _SparseGradSiluMLP(torch.autograd.Function):
    """A Llama-style MLP, down(silu(gate(x)) * up(x)), whose three matrices all train sparsely:
    as three _SparseGradLinear calls, but the backward recomputes silu(gate) and the product
    from the saved gate and up outputs instead of keeping them too (two fewer intermediate-wide
    tensors per layer held from forward to backward). Same operations, same dtypes."""

    @staticmethod
    def forward(ctx, x, wg, wu, wd, dg, du, dd, ig, iu, idd):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and wg.is_floating_point() else wg.dtype
        xc = x.to(dt)
        with torch.autocast(dev, enabled=False):
            g = torch.nn.functional.linear(xc, wg.to(dt))
            u = torch.nn.functional.linear(xc, wu.to(dt))
            y = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, wd.to(dt))
        ctx.save_for_backward(xc, g, u, wg, wu, wd, ig, iu, idd)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, g, u, wg, wu, wd, ig, iu, idd = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2, u2 = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        gy2 = gy.reshape(-1, gy.shape[-1])
        a = torch.nn.functional.silu(g2)
        gdd = (a * u2).t().mm(gy2).view(-1).index_select(0, idd).to(torch.float32) if need[6] else None
        gp = gy2.mm(wd.to(gy2.dtype))
        gu, ga = gp * a, gp * u2
        del a, gp
        gg = torch.ops.aten.silu_backward(ga, g2)
        del ga
        x2 = xc.reshape(-1, xc.shape[-1])
        gdg = x2.t().mm(gg).view(-1).index_select(0, ig).to(torch.float32) if need[4] else None
        gdu = x2.t().mm(gu).view(-1).index_select(0, iu).to(torch.float32) if need[5] else None
        gx = None
        if need[0]:
            gx = gg.mm(wg.to(gg.dtype)).to(ctx.x_dtype) + gu.mm(wu.to(gu.dtype)).to(ctx.x_dtype)
            gx = gx.view(*gy.shape[:-1], wg.shape[1])
        return gx, None, None, None, gdg, gdu, gdd, None, None, None


def _sparse_mlp_forward(sift, names, mlp, x):
    ng, nu, nd = names
    d, i = sift.deltas, sift.idx_t
    return _SparseGradSiluMLP.apply(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                    d[ng], d[nu], d[nd], i[ng], i[nu], i[nd])


@register("sift")
class SIFT(Method):
    Options = SiftOptions

    def __init__(self, options: SiftOptions):
        self.options = options
        self.targets: dict[str, torch.nn.Parameter] = {}
        self.linears: dict[str, torch.nn.Linear] = {}  # targets that are plain nn.Linear weights
        self.mlps: dict[str, tuple] = {}  # SiLU MLPs whose gate, up and down are all such targets
        self._reset_stage()

    def _reset_stage(self):
        self.idx: dict[str, torch.Tensor] = {}  # name -> flat indices (long), fixed for the stage
        self.idx_t: dict[str, torch.Tensor] = {}  # name -> the same positions in W^T's flat layout
        self.deltas: dict[str, torch.Tensor] = {}  # name -> dense vector of k, the only optimized tensors
        self._score: dict[str, torch.Tensor] = {}  # name -> summed |grad| while selecting
        self._handles = {}  # name -> gradient hook on W (selection, and non-Linear targets)
        self._sparse: set[str] = set()  # names whose nn.Linear runs through _SparseGradLinear
        self._xcast = None  # _SparseGradLinear's last (input, version, dtype, cast input)
        self._backwards = 0  # optimizer steps' backwards seen this stage
        self._active = False
        self._own: dict[str, tuple[int, int, int]] = {}  # name -> (first flat index of this rank's rows, its run of idx a:b)
        self._sharded = False

    # --- setup ------------------------------------------------------------------------

    def _is_target(self, name: str) -> bool:
        return any(name.endswith(f"{m}.weight") for m in self.options.target_modules)

    def setup(self, model, run):
        self.targets, self.linears = {}, {}
        for n, p in model.named_parameters():
            if self._is_target(n):
                if p.ndim < 2:
                    raise MethodError(f"sift: target {n} is not a matrix (shape {tuple(p.shape)})")
                self.targets[n] = p
                mod = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else None
                if type(mod) is torch.nn.Linear and mod.weight is p:
                    self.linears[n] = mod
                p.requires_grad_(True)  # W must produce a gradient for the selection step
            else:
                p.requires_grad_(False)
        self.mlps = {}
        for n in self.linears:
            if n.endswith(".gate_proj.weight"):
                pre = n[: -len(".gate_proj.weight")]
                names = tuple(f"{pre}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj"))
                mlp = model.get_submodule(pre)
                act = getattr(mlp, "act_fn", None)
                if all(x in self.linears for x in names) and type(act).__name__ in ("SiLU", "SiLUActivation") \
                        and type(mlp).forward is not torch.nn.Module.forward and self.linears[names[0]].bias is None \
                        and self.linears[names[1]].bias is None and self.linears[names[2]].bias is None:
                    self.mlps[pre] = (mlp, names)
        if not self.targets:
            raise MethodError(f"sift: no parameter matches target_modules {self.options.target_modules}")
        return model

    def trainable_params(self, model) -> int:
        return sum(budget(p.numel(), self.options.rate) for p in self.targets.values())

    # --- per stage ----------------------------------------------------------------------

    def stage_start(self, model, stage):
        self._remove_hooks()
        self._reset_stage()
        self._sharded = reshard(model)
        if self._sharded:  # fsdp: the sharded parameters replaced the ones setup saw
            params = dict(model.named_parameters())
            self.targets = {n: params[n] for n in self.targets}
            other = sorted(set(self.targets) - set(self.linears))
            if other:
                raise MethodError(f"sift under fsdp: targets {other[:3]} are not plain nn.Linear weights (their gradient "
                                  "hook does not see FSDP's sharded gradients); use distributed.strategy ddp")
        for n, p in self.targets.items():
            if not local_rows(p)[0].is_contiguous():
                raise MethodError(f"sift: target {n} is not contiguous")
            p.requires_grad_(True)  # the selection step needs W's dense gradient
            self.deltas[n] = torch.zeros(budget(p.numel(), self.options.rate), dtype=torch.float32, device=p.device,
                                         requires_grad=True)
            if not self._sharded:
                self._handles[n] = p.register_post_accumulate_grad_hook(self._make_hook(n))
        self._active = True
        return model

    def _go_sparse(self, n):
        """After selection: W stops requiring grad and its nn.Linear computes only delta's k
        gradient entries (`_SparseGradLinear`); other targets keep the gradient hook."""
        mod = self.linears.get(n)
        if mod is None:
            return
        p, idx = self.targets[n], self.idx[n]
        out_f, in_f = p.shape
        self.idx_t[n] = (idx % in_f) * out_f + idx // in_f
        p.requires_grad_(False)
        hook = self._handles.pop(n, None)
        if hook is not None:
            hook.remove()
        mod.forward = types.MethodType(lambda m, x, _n=n: _sparse_forward(self, _n, m, x), mod)
        self._sparse.add(n)
        for pre, (mlp, names) in self.mlps.items():
            if n in names and all(x in self._sparse for x in names):
                mlp.forward = types.MethodType(lambda m, x, _names=names: _sparse_mlp_forward(self, _names, m, x), mlp)

    def param_groups(self, model, stage):
        wd = stage.train_config.weight_decay if self.options.decay_selected else 0.0
        return [{"params": list(self.deltas.values()), "weight_decay": wd}]

    def _make_hook(self, name):
        def hook(p):
            # Runs once per micro-batch backward, right after p.grad was accumulated.
            if not self._active or name not in self.idx:
                return  # selecting: let the dense gradient accumulate over this step's micro-batches
            with torch.no_grad():
                g = p.grad.reshape(-1)[self.idx[name]].to(torch.float32)
                d = self.deltas[name]
                if d.grad is None:
                    d.grad = g
                else:
                    d.grad.add_(g)
            p.grad = None  # free the dense gradient at once

        return hook

    def _selected(self, n, local_flat: torch.Tensor) -> torch.Tensor:
        """The k entries at idx of a tensor of W's shape given by this rank's rows (flat): under
        fsdp each rank fills its own run of idx and the runs are summed over the ranks."""
        first, a, b = self._own[n]
        out = torch.zeros(self.deltas[n].numel(), dtype=torch.float32, device=local_flat.device)
        out[a:b] = local_flat[self.idx[n][a:b] - first].float()
        return collectives.all_reduce_sum(out) if self._sharded else out

    def after_backward(self, model, stage):
        if self.idx:
            with torch.no_grad():
                if self._sharded:  # each rank's deltas hold its share of the batch's gradient (FSDP sums only W's)
                    collectives.sum_gradients(list(self.deltas.values()))
                if self.options.decay_selected:
                    for n, p in self.targets.items():
                        self.deltas[n].copy_(self._selected(n, local_rows(p.detach())[0].reshape(-1)))
            return
        # still selecting: this step's dense gradients are in p.grad
        self._backwards += 1
        last = self._backwards >= self.options.selection_batches
        with torch.no_grad():
            for n, p in self.targets.items():
                local, first_row = local_rows(p.detach())
                g = None if p.grad is None else local_rows(p.grad)[0].detach().reshape(-1)  # fsdp: this rank's rows
                score = torch.zeros(local.numel(), dtype=torch.float32, device=local.device) if g is None else g.abs().float()
                if n in self._score:
                    score = self._score.pop(n).add_(score)
                if not last:
                    self._score[n] = score
                    p.grad = None
                    continue
                # exactly k, ties to the lowest positions: the same entries at any number of processes
                # (over every rank's rows under fsdp: rows are in rank order, so this is W's flat order)
                sel = topk_masks({n: score}, [[n]], [self.deltas[n].numel()], sharded=self._sharded)[n]
                first = first_row * (p.shape[1] if p.ndim > 1 else 1)
                mine = sel.nonzero().view(-1) + first
                self.idx[n] = gather_rows(mine).to(mine.device) if self._sharded else mine  # every rank: all k, sorted
                self._own[n] = (first, int(torch.searchsorted(self.idx[n], first)),
                                int(torch.searchsorted(self.idx[n], first + local.numel())))
                del score, sel
                if self.options.train_selection_step and g is not None:
                    self.deltas[n].grad = self._selected(n, g)
                    if self.options.decay_selected:
                        self.deltas[n].copy_(self._selected(n, local.reshape(-1)))
                p.grad = None
                self._go_sparse(n)

    def after_step(self, model, stage):
        self._xcast = None
        self._flush()

    def _flush(self):
        if not self.idx:
            return
        with torch.no_grad():
            for n, p in self.targets.items():
                d = self.deltas[n]
                flat = local_rows(p)[0].view(-1)  # fsdp: this rank's rows, and its run of idx
                first, a, b = self._own[n]
                at, mine = self.idx[n][a:b] - first, d[a:b].to(flat.dtype)
                if self.options.decay_selected:
                    if d.grad is not None:  # a step happened: d holds the new values of W[idx]
                        flat[at] = mine
                else:
                    flat.index_add_(0, at, mine)
                d.zero_()

    def stage_end(self, model, stage):
        if not self.options.decay_selected:
            self._flush()  # a no-op after a completed step: deltas are zero after every after_step
        with torch.no_grad():
            for d in self.deltas.values():
                d.zero_()
                d.grad = None
        for p in self.targets.values():
            p.grad = None
        self._remove_hooks()
        self._active = False
        return model

    def _remove_hooks(self):
        for h in self._handles.values():
            h.remove()
        self._handles = {}
        for n in self._sparse:  # back to nn.Linear's own forward; W trainable for the next selection
            self.linears[n].__dict__.pop("forward", None)
            self.targets[n].requires_grad_(True)
        for mlp, _ in self.mlps.values():
            mlp.__dict__.pop("forward", None)
        self._sparse = set()
        self._xcast = None

    def fsdp_refusal(self):
        """None: W's selection over its shards; the k-vectors replicated, their gradient summed over the ranks."""
        other = [m for m in self.options.target_modules if m not in DEFAULT_TARGETS]
        if other:
            return (f"target_modules {other} under fsdp: only the decoder's linear projections {DEFAULT_TARGETS} "
                    "(another target's gradient hook would not see FSDP's sharded gradients)")
        return None

    def state_dict(self):
        return {}  # indices are redrawn at every stage; nothing carries over

    def load_state_dict(self, state):
        pass
