"""Sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters,
gradients and optimizer state are split over the ranks, so a model whose AdamW state does not
fit one device trains on several (docs/distributed.md: the design and a 7B recipe).

    torchrun --nproc_per_node N -m clbench run CONFIG --set distributed.strategy=fsdp
    accelerate launch (distributed_type FSDP, fsdp_version 2) -m clbench run CONFIG

What it does (the rest of the loop is the data-parallel one of clbench/distributed/collectives.py):
- `shard` runs after the method's setup (every parameter exists by then: one created later would
  not be managed, and the ranks' copies would silently drift): one FSDP unit per decoder layer,
  then the root (embeddings, final norm, LM head: a tied embedding and head stay one tensor in
  it), then one forward in eval mode so that FSDP's lazy initialisation is done before anything
  else touches the model. On CUDA with bf16 autocast a MixedPrecisionPolicy computes in bf16 and
  reduces gradients in float32; the sharded master weights and the optimizer stay float32.
- Gradients are SUMMED over the ranks (divide factor 1, sum-only collectives), which is what the
  loop's loss scaling expects: each rank's loss is its share of the global batch's token mean.
- The loop's head-only loss calls the decoder and the LM head directly; under FSDP that call goes
  through a forward method registered on the root (`register_fsdp_forward_method`), so that the
  root's parameters are gathered first.
- Weights materialised once (`shard(..., from_rank0=True)`, the loop's path): rank 0 sets the
  method up on the base weights; the other ranks set it up on the model's structure on the meta
  device (no memory), and after sharding receive their shards from rank 0
  (`set_model_state_dict(broadcast_from_rank0=True)`, one tensor at a time; the buffers outside the
  state dict, such as the rotary frequencies, are broadcast too). So no rank but 0 ever holds the
  whole model on the host, and rank 0 only until its shards are sent. A method whose setup keeps
  something computed from the weights (a teacher copy, a tensor of its own) cannot be set up on the
  meta device: `meta_tensors` finds it and the loop sets that method up on the weights on every
  rank instead.
- A method's penalty on the weights reads them through `full(p)`: an all-gather whose backward
  sums over the ranks, like the gradients of the forward's activations (the loop divides a
  method's extra loss by the number of ranks under both strategies).
- Evaluation (`unsharded`): every unit is all-gathered in place (each rank then holds the whole
  model in the compute dtype), rank 0 runs lm-eval on plain tensors, no collective runs inside
  lm-eval, and the units are resharded afterwards.
- Stage checkpoints: torch.distributed.checkpoint (`save_checkpoint`), each rank writing its own
  shards, readable at another number of ranks; see the function.
"""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path

import torch

from clbench.checkpoint import preserved_rng, rng_state
from clbench.distributed import collectives
from clbench.errors import ClbenchError, ConfigError


def requested(cfg) -> bool:
    """fsdp from the config, or from accelerate's FSDP launch settings (it passes them as env)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"accelerate launched with FSDP version {version}: clbench shards with FSDP2 only "
                              "(set fsdp_version: 2 in the accelerate config, or --fsdp_version 2)")
        return True
    return cfg.distributed.strategy == "fsdp"


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _layers(model):
    from clbench.method.lm import split_head

    split = split_head(model)
    layers = getattr(split[0], "layers", None) if split is not None else None
    if layers is None or not len(layers):
        raise ClbenchError(f"distributed.strategy fsdp: {type(model).__name__} has no decoder with a `layers` list "
                           "to shard (one FSDP unit per decoder layer)")
    return layers


def _head_logits(self, input_ids, attention_mask, sel):
    from clbench.method.lm import head_logits

    return head_logits(self, input_ids, attention_mask, sel)


HEAD_METHOD = "clbench_head_logits"  # the root's registered forward method of the head-only loss


def shard(model, device: torch.device, autocast_dtype=None, from_rank0: bool = False):
    """Shard `model` in place over every rank (see the module docstring); returns it. from_rank0:
    every rank's weights come from rank 0's model (the others' may be on the meta device)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    collectives.init_group(device)
    if from_rank0:
        full, extra = _rank0_state(model)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kw = {"mesh": mesh}
    if device.type == "cuda" and autocast_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
    for layer in _layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if from_rank0:
        _receive_from_rank0(model, device, full, extra)
        del full
    setattr(model, HEAD_METHOD, types.MethodType(_head_logits, model))  # clbench.method.lm.target_logits calls it
    register_fsdp_forward_method(model, HEAD_METHOD)
    for unit in _units(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    was_training = model.training
    model.eval()  # no dropout: the pinning forward draws nothing from the RNG
    from clbench.method.prompting import context_lengths

    # a prompt chosen from the context (L2P) needs to know where it ends: here, the one token
    with torch.no_grad(), context_lengths(model, [1]):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    model.train(was_training)
    model.reset_iter_state()  # reshards every unit (the root stays gathered after a forward; the optimizer
    return model              # must see the shards) and forgets this forward's order


def _rank0_state(model) -> tuple[dict, list[str]]:
    """Before sharding: rank 0's whole state dict ({} elsewhere) and the names of the buffers outside
    it; the ranks' models must have the same structure (checked here, so that a difference fails on
    every rank instead of leaving one waiting in a broadcast)."""
    state = model.state_dict()
    extra = sorted(n for n, _ in model.named_buffers() if n not in state)
    shape = [(n, tuple(t.shape), str(t.dtype)) for n, t in state.items()] + [(n, None, None) for n in extra]
    differs = sum(collectives.gather(collectives.broadcast(shape) != shape))
    if differs:
        raise ClbenchError(f"fsdp: {differs} rank(s) built a model whose parameters differ from rank 0's "
                           "(names, shapes or dtypes); every rank must load the same model")
    return (state if collectives.is_main() else {}), extra


def _receive_from_rank0(model, device: torch.device, full: dict, extra: list[str]) -> None:
    """After sharding: every rank's shards (and the buffers outside the state dict) from rank 0's
    whole tensors, one tensor at a time; a model on the meta device is given memory first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(model.named_buffers())
    for name in extra:
        torch.distributed.broadcast(buffers[name], src=0)


def meta_tensors(obj, model, depth: int = 4) -> list[str]:
    """Where `obj` (a method, after its setup on a model of the meta device) holds a tensor or a module
    with no data that is not part of `model`: what such a setup computed from the weights it did not
    have. The paths found (e.g. ['teacher']), [] when there is none."""
    own = {id(t) for t in [*model.parameters(), *model.buffers()]} | {id(m) for m in model.modules()}
    found: list[str] = []

    def visit(x, path: str, d: int) -> None:
        if id(x) in own or d < 0:
            return
        if isinstance(x, torch.Tensor):
            if x.is_meta:
                found.append(path)
        elif isinstance(x, torch.nn.Module):
            if any(t.is_meta and id(t) not in own for t in [*x.parameters(), *x.buffers()]):
                found.append(path)
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(v, f"{path}[{k!r}]", d - 1)
        elif isinstance(x, (list, tuple, set)):
            for i, v in enumerate(x):
                visit(v, f"{path}[{i}]", d - 1)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for k, v in vars(x).items():
                visit(v, f"{path}.{k}" if path else k, d - 1)

    visit(obj, "", depth)
    return found


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter, differentiable: its gradient is summed
    over the ranks and each rank keeps its rows, as for a gradient from the forward."""
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(p, DTensor):
        return p.full_tensor(grad_placements=[Partial()] * len(p.placements))
    return p


@contextlib.contextmanager
def unsharded(model):
    """Every unit all-gathered in place while the block runs, on every rank (collective), then
    resharded: inside, the model computes with plain tensors and no collective, so rank 0 alone
    may run an evaluation. Peak: the whole model in the compute dtype, on every rank. Nested
    (generation inside an evaluation), the inner block finds the model gathered and leaves it so."""
    if model.__dict__.get("_clbench_gathered"):
        yield model
        return
    units = _units(model) if is_sharded(model) else []
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)
    # transformers' generate() sees this flag of FSDP's and would step every rank in lockstep
    # (synced_gpus): gathered, rank 0 generates alone
    flagged = [m for m in model.modules() if getattr(m, "_is_fsdp_managed_module", False)] if units else []
    for m in flagged:
        m._is_fsdp_managed_module = False
    model.__dict__["_clbench_gathered"] = bool(units)
    try:
        yield model
    finally:
        model.__dict__.pop("_clbench_gathered", None)
        for m in flagged:
            m._is_fsdp_managed_module = True
        for u in units:
            u.set_reshard_after_forward(u is not model, recurse=False)  # FSDP's own choice: the root stays gathered
        if units:
            # reshard, and forget the forwards run here: FSDP plans the next backward's prefetches from
            # the recorded forward order, and rank 0's evaluation forwards would make its plan differ
            model.reset_iter_state()


def full_state(model) -> dict | None:
    """The model's whole state dict (CPU tensors) on rank 0, None elsewhere; every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if collectives.is_main() else None


# --- stage checkpoints (torch.distributed.checkpoint) --------------------------------------

RANK_FILE = "rank{}.pt"
META_FILE = "meta.pt"


def save_checkpoint(path: Path, model, method_state, extra: dict) -> float:
    """Write a stage checkpoint as the folder `path`: the model's shards through DCP (each rank its
    own), per rank its method state and RNG (`rank<r>.pt`), rank 0 the costs (`meta.pt`). It is
    written under a temporary name and renamed by rank 0 once every rank has finished, so a folder
    named `path` is always complete. The optimizer is not saved: every stage starts a fresh one.
    Every rank calls this. Returns the folder's size in MB."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tmp = path.parent / f".{path.name}.partial"
    if collectives.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    collectives.barrier()
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
    torch.save({"method": method_state, "rng": rng_state(), "world_size": collectives.world_size()},
               tmp / RANK_FILE.format(collectives.rank()))
    if collectives.is_main():
        torch.save(extra, tmp / META_FILE)
    collectives.barrier()
    if collectives.is_main():
        os.replace(tmp, path)
    collectives.barrier()
    return sum(f.stat().st_size for f in path.iterdir()) / 2**20


def checkpoint_meta(path: Path) -> dict:
    """The costs a stage checkpoint folder recorded (raises if it is incomplete)."""
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} has no .metadata (not a complete checkpoint)")
    return torch.load(path / META_FILE, map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, model, method_name: str) -> dict:
    """Read a stage checkpoint folder into the sharded `model`, at any number of ranks. Returns this
    rank's {"method": state, "rng": states}. Written at another number of ranks, the method
    state must have been the same on every rank (it is then replicated); a method whose state is
    per shard can only resume at the number of ranks that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    mine = path / RANK_FILE.format(collectives.rank())
    own = torch.load(mine, map_location="cpu", weights_only=False) if mine.is_file() else None
    if own is not None and own["world_size"] == collectives.world_size():
        return own
    files = sorted(path.glob(RANK_FILE.format("*")))
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    if len({collectives.state_digest(None, s["method"]) for s in states}) > 1:
        raise ClbenchError(f"method {method_name!r}: the checkpoint {path} was written by {len(files)} processes whose "
                           f"method states differ (state kept per shard): resume it with {len(files)} processes")
    return states[0]


def effective_state(model, base) -> dict | None:
    """merging.effective_state of a sharded model, on rank 0 (None elsewhere; every rank must call):
    the whole state gathered to rank 0's CPU; a peft model's adapters are merged there into an
    unsharded replica built on a copy of `base` (the base model) with the same adapters."""
    from clbench.method.merging import effective_state as plain_effective_state

    state = full_state(model)
    if state is None or not hasattr(model, "peft_config"):
        return state
    import copy

    from peft import get_peft_model

    names = list(model.peft_config)
    with preserved_rng():  # the replica's adapter initialisation is overwritten below
        replica = get_peft_model(copy.deepcopy(base).to("cpu"), model.peft_config[names[0]], adapter_name=names[0])
        for n in names[1:]:
            replica.add_adapter(n, model.peft_config[n])
    replica.base_model.set_adapter(list(model.base_model.active_adapters))
    replica.load_state_dict(state, strict=True)
    return plain_effective_state(replica)
