"""Stage checkpoints for resume: what is needed to continue after a completed stage.

A checkpoint stores the model as a DIFF against the state right after the method's
`setup` (which a resumed run rebuilds deterministically from the base model and the
seed): unchanged tensors are skipped, a changed tensor is stored in the smallest of three
exact forms (`encode_change`): its changed positions as a bitmask (1 bit per entry) plus
their values, as int32/int64 flat indices plus values (when few entries changed), or whole.
"Changed" compares bit patterns, so the round trip is exact (-0.0, NaN payloads included).
So LoRA stores its adapter, a sparse method its changed entries (LoTA at sparsity 0.9:
about 1/8 + 0.1 of full fine-tuning's bytes per candidate matrix), and full fine-tuning a
full copy (there is no smaller exact description of it). Plus the method's own state
(masks as bits, ...) and the RNG states. Written atomically.

The task vectors merging reads (`save_state_diff`) are safetensors files with the same
encoding, one named tensor per part, so that a merge reads one tensor of one stage at a time
(`DiffFile`) instead of every stage's whole model.

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

from clbench.errors import ClbenchError
from clbench.files import temp_file



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


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (floats compared bit for bit: -0.0 != 0.0, NaN == NaN)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.is_floating_point() and t.element_size() in ints:
        return t.view(ints[t.element_size()])
    return t


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits' order: first entry in the high bit


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits (8 entries per byte, numpy.packbits' order), on its own device."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    w = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * w).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The first n entries of a pack_bits result, as a flat bool tensor on the bits' device."""
    w = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits.reshape(-1, 1) & w).ne(0).reshape(-1)[:n]


def encode_change(v: torch.Tensor, changed: torch.Tensor) -> tuple:
    """The smallest exact description of tensor v given the flat bool tensor of its entries that
    differ from the reference: ("bits", packed mask, values) | ("sparse", indices, values) |
    ("dense", v). Values are copies in v's dtype, in flat order."""
    N, es = v.numel(), v.element_size()
    n = int(changed.sum())
    idx_size = 4 if N < 2**31 else 8
    cost = {"dense": N * es, "bits": (N + 7) // 8 + n * es, "sparse": n * (idx_size + es)}
    form = min(cost, key=lambda f: (cost[f], f != "dense"))  # a tie keeps the plain copy
    if form == "dense":
        return ("dense", v)
    values = v.reshape(-1)[changed].clone()
    if form == "bits":
        return ("bits", pack_bits(changed), values)
    idx = changed.nonzero().view(-1)
    return ("sparse", idx.to(torch.int32) if idx_size == 4 else idx, values)


def state_diff(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], copy: bool = True) -> dict:
    """{key: ("dense", tensor) | ("bits", packed mask, values) | ("sparse", flat indices, values) |
    ("alias", other key)} for the tensors of `state` that differ from `reference` (tied tensors
    are stored once); see encode_change. copy=False: dense entries are the state's own tensors
    (no copy), for a diff that is written out before the state changes again."""
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
            changed = (_bits_view(ref.to(v.device)) != _bits_view(v)).view(-1)
            if not bool(changed.any()):
                continue
            entry = encode_change(v, changed)
            del changed
        else:
            entry = ("dense", v)
        if entry[0] == "dense":
            entry = ("dense", v.clone() if copy else v)
        diff[k] = entry
    return diff


def diff_value(reference: dict[str, torch.Tensor], diff, key: str) -> torch.Tensor:
    """The full tensor `key` of the state a diff describes (the reference's own when unchanged),
    on the reference's device. `diff` is a state_diff result or a DiffFile."""
    entry = diff.get(key)
    if entry is None:
        return reference[key]
    if entry[0] == "alias":
        return diff_value(reference, diff, entry[1])
    if entry[0] == "dense":
        return entry[1]
    ref = reference[key].detach()
    kind, where, vals = entry
    flat = ref.clone().reshape(-1)
    where = where.to(ref.device)
    if kind == "bits":
        where = unpack_bits(where, flat.numel())
    flat[where] = vals.to(device=ref.device, dtype=ref.dtype)
    return flat.view_as(ref)


def save_state_diff(path: Path, diff: dict) -> float:
    """Write a diff as a safetensors file (atomically): tensors `<key>/<part>`, the entries' kinds
    (and alias targets) in the metadata. Returns its size in MB."""
    import json

    from safetensors.torch import save_file

    tensors, kinds = {}, {}
    for k, entry in diff.items():
        kinds[k] = list(entry[:1]) + ([entry[1]] if entry[0] == "alias" else [])
        parts = {"dense": ("value",), "bits": ("bits", "values"), "sparse": ("index", "values"), "alias": ()}[entry[0]]
        for part, t in zip(parts, entry[1:]):
            tensors[f"{k}/{part}"] = t.detach().to("cpu").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        save_file(tensors, str(tmp), metadata={"clbench_diff": json.dumps(kinds)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size / 2**20


class DiffFile:
    """A saved diff read one entry at a time: `get(key)` opens the file, reads that entry's
    tensors and closes it, so nothing of the other entries (or of other stages' files) stays in
    memory. Files written before diffs were safetensors (torch.save) are read whole."""

    def __init__(self, path: Path):
        import json

        import zipfile

        self.path = Path(path)
        self._eager = None
        if zipfile.is_zipfile(self.path):  # a torch.save archive (safetensors files are not zips)
            self._eager = load(self.path)["diff"]
            self.kinds = {k: e[0] for k, e in self._eager.items()}
            return
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["clbench_diff"])
        self._meta = meta
        self.kinds = {k: m[0] for k, m in meta.items()}

    def __contains__(self, key) -> bool:
        return key in self.kinds

    def __iter__(self):
        return iter(self.kinds)

    def get(self, key, default=None):
        if self._eager is not None:
            return self._eager.get(key, default)
        m = self._meta.get(key)
        if m is None:
            return default
        if m[0] == "alias":
            return ("alias", m[1])
        from safetensors import safe_open

        parts = {"dense": ("value",), "bits": ("bits", "values"), "sparse": ("index", "values")}[m[0]]
        with safe_open(str(self.path), framework="pt") as f:
            return (m[0], *[f.get_tensor(f"{key}/{p}").clone() for p in parts])

    def load(self) -> dict:
        """Every entry in memory (a plain state_diff dict)."""
        return {k: self.get(k) for k in self.kinds}


def _missing(path: Path):
    return ClbenchError(f"merging needs {path} (written after that stage); delete the run's rows of this "
                        "method (or use --fresh) to train the stream again")


def open_state_diff(path: Path) -> DiffFile:
    if not path.is_file():
        raise _missing(path)
    return DiffFile(path)


def load_state_diff(path: Path) -> dict:
    return open_state_diff(path).load()


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
            self._mb = save_atomic(self.path, payload())
        except BaseException as e:  # re-raised by wait() in the loop's thread
            self._error = e

    def wait(self) -> float:
        self._thread.join()
        if self._error is not None:
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


def save_atomic(path: Path, payload: dict) -> float:
    """Write `payload` with torch.save under a temporary name and rename it into place; its size in MB."""
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
