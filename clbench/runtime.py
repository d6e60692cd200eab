"""Where a run executes: device and precision, seeding, memory accounting, quiet libraries."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from clbench.config import RunConfig
from clbench.distributed import collectives
from clbench.errors import ConfigError


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Runtime:
    """Where and how the loop computes, handed down as one object instead of loose arguments (as
    Lightning Fabric carries device and precision): the device, the autocast dtype (None: float32;
    master weights always stay float32), the tokenizer's pad id that batches are padded with, and
    the rich progress bar stages report to (None: no bar). Collectives are clbench.distributed's."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    pad_id: int = 0
    progress: object = None

    def autocast(self):
        """The autocast context of one forward (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


def wants_cpu(cfg: RunConfig) -> bool:
    """Whether the run trains on the CPU (the process group's backend is then gloo)."""
    return cfg.device == "cpu" or not torch.cuda.is_available()


def select_device(cfg: RunConfig) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None). Master weights always stay float32."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    dev = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and collectives.enabled():
        dev = torch.device("cuda", collectives.local_rank())
    if cfg.precision == "fp32":
        return dev, None
    ok = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_supports_bf16()
    if cfg.precision == "bf16" and not ok:
        raise ConfigError(f"precision: bf16 was requested but {dev.type} here does not support it; use auto or fp32")
    return dev, (torch.bfloat16 if ok else None)


def release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory while a block runs: CUDA's allocator peak, or sampled process RSS on CPU.

    On CPU this is the whole process (the kept base model, the checkpoint reference copy and
    the method's own copies included), so compare methods within one run, not across runs.
    release=True first hands freed memory back to the OS, so that RSS starts from what is live,
    not from an earlier method's peak; the loop does that once per method, not per stage:
    memory handed back must be faulted in again by the next stage (0.7 s per stage on the
    demo model), while a method's own earlier stages cannot raise its peak above itself."""

    def __init__(self, device: torch.device, release: bool = True):
        self.device, self.peak_mb, self.release = device, 0.0, release
        self._stop = threading.Event()

    def _rss_mb(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return 0.0

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if self.release:
                release_freed_memory()
            self.peak_mb = self._rss_mb()
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)
        else:
            self._stop.set()
            self._t.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a sharded one's (a DTensor's) local shard, else the tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model, opt) -> dict:
    """Bytes this rank holds of the model's parameters, their gradients and the optimizer state
    (a sharded tensor counts its local shard only)."""
    def nbytes(ts):
        seen, n = set(), 0
        for t in ts:
            t = local(t)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen or not t.numel():  # tied weights once
                seen.add(key)
                n += t.numel() * t.element_size()
        return n

    params = list(model.parameters())
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))}



def method_state_bytes(method, model: torch.nn.Module) -> int:
    """Bytes of the tensors a method object holds on this rank (its masks, Fisher and anchor, task
    vectors, memories, a teacher's weights), found by walking its attributes, containers and the
    objects they hold; a sharded tensor counts its local shard, a tensor sharing storage with the
    model's own parameters or buffers (a method keeping references to them) counts nothing, and
    each storage counts once. Written by hand: no library measures an arbitrary object's tensors."""
    owned = {local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen, visited, total = set(), set(), 0

    def walk(o, depth):
        nonlocal total
        if torch.is_tensor(o):
            t = local(o)
            ptr = t.untyped_storage().data_ptr()
            key = (ptr, t.storage_offset(), t.numel())
            if ptr not in owned and key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
            return
        if depth > 8 or id(o) in visited or isinstance(o, (str, bytes, int, float, bool, type(None))) or callable(o) \
                and not isinstance(o, torch.nn.Module):
            return
        visited.add(id(o))
        if isinstance(o, torch.nn.Module):
            items = list(o.state_dict(keep_vars=True).values())
        elif isinstance(o, dict):
            items = list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            items = list(o)
        elif hasattr(o, "__dict__") and type(o).__module__.split(".")[0] in ("clbench", "clbench_builtin", "clbench_methods"):
            items = list(vars(o).values())  # clbench's own objects (MaskedUpdate, ...); not libraries' (tokenizers)
        else:
            return
        for v in items:
            walk(v, depth + 1)

    for v in vars(method).values():
        walk(v, 0)
    return total


def derive_seed(seed: int, stage: int, salt: int = 0) -> int:
    """The one seed derivation: a seed for stage `stage` of a run with seed `seed`; salt 0 is the
    stage's own seed (its batch order), another salt a method's own draws at that stage,
    independent of the batch order."""
    return (int(seed) * 1_000_003 + int(stage) * 7919 + int(salt) * 104_729) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet_libraries() -> None:
    """The run prints its own progress; the libraries' per-file bars would drown it."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
