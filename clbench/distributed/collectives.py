"""Several processes, one run: data-parallel training through torch.distributed, set up by accelerate.

    accelerate launch --multi_gpu --num_processes 2 -m clbench run CONFIG     (CPU: gloo; GPU: nccl)
    torchrun --nproc_per_node 2 -m clbench run CONFIG

How a step runs on N processes (every rank holds the whole model):
- Every rank draws the same global batch from the same seeded generator (train.batch_size is the
  GLOBAL batch, so a 1-process run with the same config sees the same examples), and rank r
  trains on examples r, r+N, r+2N, ... of it.
- Each rank's loss is its target tokens' summed NLL divided by the global number of target tokens
  (one all-reduce of the counts), a method's extra loss is divided by N, and after the backward of
  all micro-batches the gradients of every parameter are summed over the ranks (all-reduce) BEFORE
  the method's after_backward hook. So every rank sees exactly the gradient of the global batch:
  gradient masks, SIFT's and LoTA's selections, AdaLoRA's allocation and the optimizer step are
  computed from the same numbers on every rank and stay identical without any broadcast of masks
  (HFT's and other seeded draws use the same seed on every rank). The loop checks it: after every
  stage each rank hashes its weights and the method's state, rank 0 gathers the hashes, and a
  mismatch stops the run ("ranks diverged").
- Why not torch's DistributedDataParallel wrapper: the loop computes the loss through the decoder
  and the LM head directly (head-only targets) and methods hook single parameters, so the forward
  never passes through a DDP wrapper; an explicit all-reduce of the gradients is the same
  arithmetic and works with every method. (Cost: no overlap of communication with backward.)
- Evaluation runs once, on rank 0, and its scores are broadcast; only rank 0 writes the run
  directory (results, checkpoints, samples) and prints. Other ranks wait at the next collective
  (the process group's timeout is raised to CLBENCH_DIST_TIMEOUT_MIN, default 360 minutes).
- distributed.strategy fsdp shards parameters, gradients and optimizer state instead (clbench/distributed/fsdp.py):
  the same batches and loss scaling, FSDP's reduce-scatter summing the gradients in place of
  `sum_gradients`; a method states whether it can run sharded (`Method.fsdp_refusal`).
"""

from __future__ import annotations

import datetime
import hashlib
import os

import torch
from clbench.errors import ClbenchError
from clbench.errors import TrainingError

_STATE = None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def enabled() -> bool:
    return world_size() > 1


def init(cpu: bool) -> None:
    """Set up the process group through accelerate (once); nothing happens in a single process."""
    global _STATE
    if not enabled() or _STATE is not None:
        return
    from accelerate import PartialState

    minutes = float(os.environ.get("CLBENCH_DIST_TIMEOUT_MIN", "360"))
    _STATE = PartialState(cpu=cpu, timeout=datetime.timedelta(minutes=minutes))


def init_group(device: torch.device) -> None:
    """A process group also for one process (FSDP needs one); torchrun's or accelerate's when launched."""
    init(device.type == "cpu")
    if not _active():
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


def finish() -> None:
    """The end of a run that completed on several processes: every rank waits for the others (rank 0
    writes the results last), then the process group is destroyed, so that no rank tears down its
    connections while another still uses them (a gloo rank that exited first was seen to abort in
    its teardown: "terminate called without an active exception"). Not called after an error: a
    rank that failed would leave the others waiting here."""
    if enabled() and _active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def shard(examples: list) -> list:
    """This rank's share of a global batch: examples rank, rank + N, ..."""
    if not _active():
        return examples
    n = torch.distributed.get_world_size()
    if len(examples) < n:
        raise TrainingError(f"a batch of {len(examples)} examples cannot be split over {n} processes: "
                            f"set train.batch_size (the global batch) to at least {n}")
    return examples[rank()::n]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def sum_gradients(tensors) -> None:
    """Sum .grad over the ranks, in place, for every tensor that has one (the same set on every rank:
    the model's structure and the method's hooks are the same everywhere)."""
    if not _active():
        return
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


def broadcast(obj):
    """Rank 0's object on every rank."""
    if not _active():
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's object, in rank order (on every rank)."""
    if not _active():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def state_digest(model: torch.nn.Module | None, method_state) -> str:
    """sha256 over the model's weights and the tensors of the method's state (masks, Fisher, ...):
    the replicated ones only (a sharded tensor, a DTensor, differs between ranks by design)."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for k, v in (model.state_dict() if model is not None else {}).items():
        if isinstance(v, DTensor):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")

    def walk(x):
        if isinstance(x, DTensor):
            return
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        # other leaves (timings, logged losses) may differ between ranks without any harm

    walk(method_state)
    return h.hexdigest()


def check_ranks(tag: str, model: torch.nn.Module, method_state, entry: dict) -> None:
    """With several processes: every rank must hold the same weights and method state (`method_state()`
    gives it) after a stage; their digests go into the stage's entry, and a difference stops the run."""
    if not enabled():
        return
    digests = gather(state_digest(model, method_state()))
    entry["rank_digests"] = [d[:16] for d in digests]
    if len(set(digests)) != 1:
        raise ClbenchError(f"{tag} stage {entry['stage']}: ranks diverged (weights or method state differ: "
                           f"{entry['rank_digests']}); results up to the previous stage are kept")
