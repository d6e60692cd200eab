"""Device hygiene without a GPU: every method's hooks, two stages and a resume in between, on a
model whose tensors claim to live on a second device.

CPU never notices when a tensor of one device meets one of another in an operation; CUDA
refuses it. Here the model's tensors are wrapped in `OnDevice`, a tensor subclass that reports
the device "meta" (a stand-in for cuda: it needs no GPU and, unlike "cuda" on a CPU build, torch
lets it through the Python bindings) while its values live in an ordinary CPU tensor. A dispatch
mode (`SecondDevice`) runs every aten operation on those values and refuses, as CUDA does, an
operation that mixes a wrapped tensor with a CPU tensor of one or more dimensions (0-d CPU
tensors are scalars, which CUDA accepts; CPU indices into a device tensor, which CUDA accepts,
and copies between the devices are allowed). Factories asked for the stand-in device produce
wrapped tensors, so code that passes `device=` stays on it and code that forgets stays on CPU,
exactly the difference CUDA makes. torch has no autocast for "meta": the test turns autocast
off for it (precision is not what is checked here).

Written by hand because no library does it: FakeTensorMode can claim cuda but has no values,
so the methods' data-dependent steps (top-k thresholds, KS tests, .item()) cannot run in it.
"""

import contextlib
import io
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from clbench import checkpoint
from clbench.run import models
from clbench.method import RunContext, call_hook, load_builtin_methods, make_method, methods_in
from clbench.config import TrainConfig
from clbench.runtime import Runtime
from clbench.training.stage import run_stage
from clbench.training.train import tokenize

REPO = Path(__file__).resolve().parents[2]
DEV = torch.device("meta")
aten = torch.ops.aten
MIXING_ALLOWED = {aten.copy_.default, aten._to_copy.default, aten.copy.default}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMismatch(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor's values that claim to live on DEV."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                dtype=elem.dtype, layout=elem.layout, device=DEV,
                                                requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl
    # it has values: torch's "meta = no data" shortcuts (load_state_dict skips copying into a
    # meta parameter) must not apply
    is_meta = property(lambda self: False)

    def untyped_storage(self):  # the values' storage: tied weights are told apart by it
        return self.elem.untyped_storage()

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_dev(d) -> bool:
    return d is not None and torch.device(d).type == DEV.type


def _run(func, args, kwargs):
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if func not in MIXING_ALLOWED:
        checked = tensors
        if func in INDEXING and isinstance(args[0], OnDevice):  # CPU indices into a device tensor are fine
            checked = [args[0]] + [a for a in args[2:3] if isinstance(a, torch.Tensor)]
        kinds = {"device" if isinstance(t, OnDevice) else t.device.type for t in checked
                 if isinstance(t, OnDevice) or t.dim() > 0}
        if len(kinds) > 1:
            shapes = [(tuple(t.shape), "device" if isinstance(t, OnDevice) else "cpu") for t in checked]
            raise DeviceMismatch(f"{func}: tensors of two devices meet: {shapes}")

    def unwrap(t):
        if isinstance(t, OnDevice):
            return t.elem
        if isinstance(t, torch.Tensor) and t.device.type == DEV.type:
            raise DeviceMismatch(f"{func}: a real {DEV.type} tensor (no values) reached the check")
        return t

    a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    wanted = kwargs.get("device")
    if _on_dev(wanted):
        k["device"] = torch.device("cpu")
    wrap = _on_dev(wanted) or (any(isinstance(t, OnDevice) for t in tensors) and wanted is None)
    with _disable_current_modes():
        out = func(*a, **k)
    if not wrap:
        return out
    return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t, out)


class SecondDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Factories(torch.overrides.TorchFunctionMode):
    """torch.tensor/as_tensor build their tensor below the dispatch modes; tolist is refused for
    any subclass. Both are routed to the values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _on_dev(kwargs.get("device")):
            return aten._to_copy(func(*args, **dict(kwargs, device="cpu")), device=DEV)
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):
            return args[0].elem.tolist()
        return func(*args, **kwargs)


@contextlib.contextmanager
def second_device():
    with SecondDevice(), _Factories():
        yield


@pytest.fixture
def no_meta_autocast(monkeypatch):
    real, enabled = torch.autocast, torch.is_autocast_enabled

    def autocast(device_type, *a, **kw):
        return contextlib.nullcontext() if device_type == DEV.type else real(device_type, *a, **kw)

    def is_enabled(*a):
        return False if a and a[0] == DEV.type else enabled(*a)

    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(torch, "is_autocast_enabled", is_enabled)


# --- the check itself catches what CUDA refuses and lets through what CUDA accepts ------------


def test_the_check_refuses_what_cuda_refuses():
    with second_device():
        w = torch.randn(4, 4).to(DEV)
        with pytest.raises(DeviceMismatch):  # a device tensor masked with a CPU mask (LoTTO's old stage 2)
            w.detach().abs().masked_fill_(torch.zeros(4, 4, dtype=torch.bool), 0.0)
        with pytest.raises(DeviceMismatch):  # a CPU tensor indexed with device indices (LoTA's old top-k)
            sel = torch.zeros(16, dtype=torch.bool)
            sel[torch.topk(w.reshape(-1), 3).indices] = True
        with pytest.raises(DeviceMismatch):  # a CPU tensor given device values (KS-Lottery's old D)
            D = torch.zeros(4, dtype=torch.float64)
            D[torch.tensor([0, 2])] = w[:2, 0].double()
        with pytest.raises(DeviceMismatch):
            torch.zeros(4) + w[0]
        # what CUDA accepts
        assert (w * torch.tensor(2.0)).device == DEV  # a 0-d CPU tensor is a scalar
        assert w[torch.tensor([1, 3])].device == DEV  # CPU indices
        assert w[torch.ones(4, 4, dtype=torch.bool)].device == DEV  # a CPU bool mask as index
        w.copy_(torch.ones(4, 4))
        assert torch.zeros(4, device=w.device).device == DEV and torch.tensor([1.0], device=w.device).device == DEV
        assert w.cpu().device.type == "cpu" and float(w.sum()) == 16.0


# --- every method, every hook, two stages with a resume between them -----------------------

CFG = TrainConfig(lr=1e-2, steps=2, batch_size=2, grad_accum=2, weight_decay=0.1, max_grad_norm=0.5, max_length=64)
TASKS = ["tiny_copy", "tiny_parity"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from clbench.data import tasks as taskcat

    defs = taskcat.load_tasks([REPO / "configs" / "tiny_tasks"])
    return taskcat.build_lm_eval_tasks([defs[t] for t in TASKS], tmp_path_factory.mktemp("tasks"))


def _methods():
    load_builtin_methods(REPO / "methods")
    return methods_in(REPO / "methods")


def _to_cpu(obj):
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, obj)


# options that keep a method's own generation small on the tiny model (every code path still runs):
# SSR's defaults synthesise 380 prompts x 3 samples x 256 tokens per task
SMALL = {"ssr": {"n_demos": 4, "samples_per_prompt": 1, "max_new_tokens": 24, "per_task": 4, "n_clusters": 2}}


@pytest.mark.parametrize("name", _methods())
def test_method_hooks_keep_to_the_model_device(name, lm, no_meta_autocast, one_thread):
    from clbench.data import tasks as taskcat

    tok = models.build_tiny_tokenizer()
    pairs = {n: taskcat.training_examples(t, tok.eos_token if t.OUTPUT_TYPE == "generate_until" else None)
             for n, t in lm.items()}
    examples = {n: tokenize(p, tok, 64)[:8] for n, p in pairs.items()}

    def fresh():
        torch.manual_seed(0)  # as the loop seeds before setup, so a resumed run rebuilds the same adapters
        model = models.build_tiny_model(0, len(tok)).to(DEV)
        meth = make_method(name, SMALL.get(name, {}))
        run = RunContext(method=name, seed=0, tasks=list(TASKS), device=DEV, tokenizer=tok,
                           examples=lambda t: list(examples[t]), pairs=lambda t: list(pairs[t]),
                           tokenize=lambda p: tokenize(p, tok, 64), task=lambda t: lm[t])
        model = call_hook(meth, "setup", model, run)
        model.to(DEV)  # as the loop does after setup
        return meth, model, run, checkpoint.snapshot(model)

    rt = Runtime(DEV, None, tok.pad_token_id)
    with second_device():
        meth, model, run, reference = fresh()
        model, _, _ = run_stage(model, meth, examples[TASKS[0]], CFG, run, 1, TASKS[0], rt)
        call_hook(meth, "trainable_params", model)
        # a checkpoint as the loop writes and reads it: tensors saved from the device, loaded on CPU
        trained = _to_cpu(model.state_dict())
        buf = io.BytesIO()
        torch.save(_to_cpu({"diff": checkpoint.model_diff(model, reference), "method": call_hook(meth, "state_dict")}), buf)
        buf.seek(0)
        ck = torch.load(buf, map_location="cpu", weights_only=False)
        meth, model, run, reference = fresh()
        checkpoint.apply_diff(model, reference, ck["diff"])
        restored = _to_cpu(model.state_dict())
        bad = [k for k, v in trained.items() if not torch.equal(restored[k], v)]
        assert not bad, bad[:3]
        if ck["method"] is not None:
            call_hook(meth, "load_state_dict", ck["method"])
        model, stats, _ = run_stage(model, meth, examples[TASKS[1]], CFG, run, 2, TASKS[1], rt)
        call_hook(meth, "trainable_params", model)
        assert all(p.device == DEV for p in model.parameters())
        assert stats["steps"] == CFG.steps


# --- the GPU check's dry run ------------------------------------------------------------------


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_dry_run_lists_every_method_and_names_missing_inputs(tmp_path, capsys):
    gc = _gpu_check()
    assert gc.main(["run", "--dry-run", "--bundle", str(tmp_path / "nothing")]) == 0
    out = capsys.readouterr().out
    assert f"bundle folder {tmp_path / 'nothing'} does not exist" in out
    for name in _methods():
        assert f"stream  {name}: " in out, name
    assert "prefix-sharing vs lm-eval's own path" in out and "1b      full_ft" in out
    assert "fsdp    skipped: no FSDP strategy yet" in out or "fsdp    1-GPU FSDP" in out
    # a bundle without one of its parts is named part by part
    (tmp_path / "b" / "wheels").mkdir(parents=True)
    assert gc.main(["run", "--dry-run", "--bundle", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "holds no wheels" in out and "holds no tokenizer" in out and "smollm2-135m.json is missing" in out


def test_gpu_check_refuses_a_missing_bundle_before_any_work(tmp_path, capsys):
    gc = _gpu_check()
    with pytest.raises(SystemExit) as e:
        gc.main(["run", "--bundle", str(tmp_path / "nothing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clbench: error: bundle folder") and "prepare" in err[0]
