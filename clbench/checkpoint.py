"""Stage checkpoints for resume: what is needed to continue after a completed stage.

A checkpoint stores the model as a DIFF against the state right after the method's
`setup` (which a resumed run rebuilds deterministically from the base model and the
seed): unchanged tensors are skipped, sparsely changed tensors are stored as (indices,
values), and only densely changed tensors are stored whole. So LoRA stores its adapter,
a sparse method its changed entries, and full fine-tuning a full copy (there is no
smaller exact description of it). Plus the method's own state (masks, merged task
vectors, ...) and the RNG states. Written atomically.

The loop writes a stage's checkpoint in a background thread while that stage is evaluated
(`save_in_background`): evaluation reads the weights but never changes them, and it leaves
the RNG states as it found them (`preserved_rng`), so the file is the same as one written
after the evaluation. The loop waits for it before the results files record the stage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
from pathlib import Path

import numpy as np
import torch

SPARSE_MAX_FRACTION = 0.3  # above this share of changed entries a dense copy is smaller


def snapshot(model: torch.nn.Module, share: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A copy of the model's state. Entries equal to the same entry of `share` (e.g. the kept,
    never-trained base model's state: full fine-tuning starts from it) reuse that tensor
    instead of a copy, which saves a model copy in memory and its time."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        s = (share or {}).get(k)
        same = (s is not None and s.shape == v.shape and s.dtype == v.dtype and s.device == v.device
                and torch.equal(s, v))
        out[k] = s if same else v.clone()
    return out


def model_diff(model: torch.nn.Module, reference: dict[str, torch.Tensor], copy: bool = True) -> dict:
    return state_diff(model.state_dict(), reference, copy=copy)


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for two state-dict entries that are the same tensor (tied weights)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def state_diff(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], copy: bool = True) -> dict:
    """{key: ("dense", tensor) | ("sparse", flat indices, values) | ("alias", other key)} for the
    tensors of `state` that differ from `reference` (tied tensors are stored once).
    copy=False: dense entries are the state's own tensors (no copy), for a diff that is written
    out before the state changes again."""
    diff = {}
    seen: dict[tuple, str] = {}
    for k, v in state.items():
        v = v.detach()
        key = storage_key(v)
        if key in seen:  # tied weights (e.g. SmolLM2's embedding and LM head): store once
            if seen[key] in diff:
                diff[k] = ("alias", seen[key])
            continue
        seen[key] = k
        ref = reference.get(k)
        if ref is not None and ref.shape == v.shape and ref.dtype == v.dtype:
            changed = (ref != v).view(-1)
            n = int(changed.sum())
            if n == 0:
                continue
            if n <= SPARSE_MAX_FRACTION * v.numel():
                idx = changed.nonzero().view(-1)
                diff[k] = ("sparse", idx.clone(), v.reshape(-1)[idx].clone())
                continue
        diff[k] = ("dense", v.clone() if copy else v)
    return diff


def diff_value(reference: dict[str, torch.Tensor], diff: dict, key: str) -> torch.Tensor:
    """The full tensor `key` of the state a diff describes (the reference's own when unchanged)."""
    entry = diff.get(key)
    if entry is None:
        return reference[key]
    if entry[0] == "alias":
        return diff_value(reference, diff, entry[1])
    if entry[0] == "dense":
        return entry[1]
    _, idx, vals = entry
    flat = reference[key].detach().clone().reshape(-1)
    flat[idx] = vals
    return flat.view_as(reference[key])


def save_state_diff(path: Path, diff: dict) -> float:
    return _save_atomic(path, {"diff": diff})


def load_state_diff(path: Path) -> dict:
    if not path.is_file():
        from .errors import ClbenchError

        raise ClbenchError(f"merging needs {path} (written after that stage); delete the run's rows of this "
                           "method (or use --fresh) to train the stream again")
    return load(path)["diff"]


def apply_diff(model: torch.nn.Module, reference: dict[str, torch.Tensor], diff: dict) -> None:
    keys = list(reference) + [k for k in diff if k not in reference]
    state = {k: diff_value(reference, diff, k) for k in keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: unexpected keys {unexpected[:5]}")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Leave the RNG states as they were (lm-eval seeds them for its own draws)."""
    s = rng_state()
    try:
        yield
    finally:
        set_rng_state(s)


class PendingSave:
    """A checkpoint being written by a background thread; wait() gives its size in MB."""

    def __init__(self, path: Path, payload):
        self.path, self._mb, self._error = path, None, None
        self._thread = threading.Thread(target=self._write, args=(payload,), name=f"clbench-save-{path.name}")
        self._thread.start()

    def _write(self, payload) -> None:
        try:
            self._mb = _save_atomic(self.path, payload())
        except BaseException as e:  # re-raised by wait() in the loop's thread
            self._error = e

    def wait(self) -> float:
        self._thread.join()
        if self._error is not None:
            from .errors import ClbenchError

            raise ClbenchError(f"writing the checkpoint {self.path} failed: {self._error}; results up to the "
                               "previous stage are kept") from self._error
        return self._mb

    def cancel(self) -> None:
        """On an error elsewhere: let the write end (the stage is not recorded, so it is not used)."""
        self._thread.join()


def save_in_background(path: Path, model, reference, method_state, extra: dict) -> PendingSave:
    """Start writing one stage checkpoint atomically. The model's weights and the method state
    must not change until wait() returns (the loop evaluates meanwhile, which only reads them).
    The diff is computed here, in the caller's thread: torch ops in the writer thread would
    start a second pool of compute threads next to the evaluation's (measured on 2 cores: the
    evaluation then lost ~1 s per 513 MB checkpoint; with only the file writing in the thread,
    ~0.1 to 0.6 s)."""
    payload = {"diff": model_diff(model, reference, copy=False), "method": method_state, "rng": rng_state(), **extra}
    return PendingSave(path, lambda: payload)


def save(path: Path, model, reference, method_state, extra: dict) -> float:
    """Write one stage checkpoint atomically; returns its size in MB."""
    return save_in_background(path, model, reference, method_state, extra).wait()


def _save_atomic(path: Path, payload: dict) -> float:
    from .results import temp_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except RuntimeError as e:
        # torch's zip writer reports a failed write as "enforce fail ... unexpected pos": say why
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size / 2**20


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
