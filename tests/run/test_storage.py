"""What clbench stores stays small and exact: sparse changes as a bitmask or indices plus values
(clbench.checkpoint.encode_change), LoTA's and SIFT's stage checkpoints and task vectors a
fraction of full fine-tuning's, and merges read the saved task vectors tensor by tensor
(clbench.method.merging.merged_model) with the results of the in-memory merges."""

from pathlib import Path

import pytest
import torch

from clbench import checkpoint
from clbench.run import models
from clbench.method import RunContext, call_hook, load_builtin_methods, make_method
from clbench.config import MergeSpec, TrainConfig
from clbench.method import merging
from clbench.training.stage import run_stage
from clbench.training.train import tokenize
from harness import cpu_rt

REPO = Path(__file__).resolve().parents[2]
load_builtin_methods(REPO / "methods")
pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
PAIRS = [("Number: 12\nEven or odd?\nAnswer:", " even"), ("Number: 7\nEven or odd?\nAnswer:", " odd"),
         ("Which is larger, 3 or 9?\nAnswer:", " second"), ("Copy: abc\nAnswer:", " abc"),
         ("Review: great fun\nSentiment:", " positive"), ("Review: dull and slow\nSentiment:", " negative")]
CFG = TrainConfig(lr=1e-2, steps=3, batch_size=3, weight_decay=0.1, max_length=64)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(checkpoint._bits_view(a), checkpoint._bits_view(b))


# --- the encoding -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_form_round_trips_bit_for_bit(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    ref = {f"w{i}": torch.randn(40, 30, generator=g).to(dtype) for i in range(4)}
    ref["zero"] = torch.zeros(500, dtype=dtype)
    ref["count"] = torch.tensor(3)
    new = {k: v.clone() for k, v in ref.items()}
    new["w0"].view(-1)[[5, 77, 1000]] += 1  # 3 of 1200 entries: indices
    m = torch.rand(40, 30, generator=g) < 0.1
    new["w1"][m] = torch.randn(int(m.sum()), generator=g).to(dtype)  # ~10%: bitmask
    new["w2"] = torch.randn(40, 30, generator=g).to(dtype)  # all: dense
    new["zero"][[1, 2]] = torch.tensor([-0.0, float("nan")], dtype=dtype)  # -0.0 == 0.0 numerically
    new["count"] = torch.tensor(4)
    diff = checkpoint.state_diff(new, ref)
    kinds = {k: e[0] for k, e in diff.items()}
    assert kinds == {"w0": "sparse", "w1": "bits", "w2": "dense", "zero": "sparse", "count": "dense"}
    assert diff["w0"][1].dtype == torch.int32 and diff["w1"][1].numel() == 150  # 1200 bits
    checkpoint.save_state_diff(tmp_path / "d.pt", diff)
    for d in (diff, checkpoint.load_state_diff(tmp_path / "d.pt"), checkpoint.open_state_diff(tmp_path / "d.pt")):
        for k in ref:
            assert same_bits(checkpoint.diff_value(ref, d, k), new[k]), k


def test_pack_bits_is_numpys_packbits():
    import numpy as np

    m = torch.rand(1001, generator=torch.Generator().manual_seed(1)) < 0.3
    bits = checkpoint.pack_bits(m)
    assert bits.tolist() == np.packbits(m.numpy()).tolist()
    assert torch.equal(checkpoint.unpack_bits(bits, 1001), m)


def test_task_vector_files_of_the_older_format_still_read(tmp_path):
    ref = {"w": torch.zeros(10)}
    new = {"w": torch.arange(10.0)}
    torch.save({"diff": {"w": ("dense", new["w"])}}, tmp_path / "old.pt")  # how taskvec files were written
    f = checkpoint.open_state_diff(tmp_path / "old.pt")
    assert "w" in f and torch.equal(checkpoint.diff_value(ref, f, "w"), new["w"])


# --- stage checkpoints and task vectors of sparse methods -----------------------------------


def _one_stage(name, options):
    tok = models.build_tiny_tokenizer()
    ex = tokenize(PAIRS, tok, 64)
    base = models.build_tiny_model(0, len(tok))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    meth = make_method(name, options)
    run = RunContext(method=name, seed=0, tasks=["a", "b"], device=CPU, tokenizer=tok, examples=lambda t: list(ex))
    model = call_hook(meth, "setup", base, run)
    reference = checkpoint.snapshot(model)
    model, _, _ = run_stage(model, meth, ex, CFG, run, 1, "a", cpu_rt(tok))
    return meth, model, reference, base_state, tok


def tensor_bytes(obj) -> int:
    from torch.utils._pytree import tree_flatten

    return sum(t.numel() * t.element_size() for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor))


def test_lota_and_sift_store_a_fraction_of_full_fine_tuning(tmp_path):
    """The stored tensors' bytes (the files add a few hundred bytes per tensor, which on the tiny
    model's 0.4 MB is not negligible; bench/run.py's storage section gives the 135M model's file
    sizes)."""
    sizes, tv = {}, {}
    for name, options in (("full_ft", {}), ("lota", {"sparsity": 0.9, "calibration_steps": 2}), ("sift", {"rate": 0.05})):
        meth, model, reference, base_state, tok = _one_stage(name, options)
        path = tmp_path / f"{name}.pt"
        checkpoint.save(path, model, reference, call_hook(meth, "state_dict"), {"stage": 1})
        sizes[name] = tensor_bytes({k: v for k, v in checkpoint.load(path).items() if k != "rng"})
        diff = checkpoint.state_diff(merging.effective_state(model), base_state)
        checkpoint.save_state_diff(tmp_path / f"{name}.tv.pt", diff)
        tv[name] = tensor_bytes(diff)
        # exact round trip: a fresh setup plus the checkpoint is the trained model, bit for bit
        torch.manual_seed(0)
        meth2 = make_method(name, options)
        run = RunContext(method=name, seed=0, tasks=["a", "b"], device=CPU, tokenizer=tok)
        fresh = call_hook(meth2, "setup", models.build_tiny_model(0, len(tok)), run)
        ck = checkpoint.load(path)
        checkpoint.apply_diff(fresh, checkpoint.snapshot(fresh), ck["diff"])
        call_hook(meth2, "load_state_dict", ck["method"])
        for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert same_bits(a, b), (name, k)
        files = checkpoint.open_state_diff(tmp_path / f"{name}.tv.pt")
        for k, v in merging.effective_state(model).items():
            assert same_bits(checkpoint.diff_value(base_state, files, k), v), (name, k)
    assert sizes["lota"] <= 0.25 * sizes["full_ft"] and tv["lota"] <= 0.25 * tv["full_ft"], (sizes, tv)
    assert sizes["sift"] <= 0.2 * sizes["full_ft"] and tv["sift"] <= 0.2 * tv["full_ft"], (sizes, tv)


# --- merging tensor by tensor from the saved task vectors -----------------------------------


def _stages_saved(tmp_path, T, seed=0):
    """T stages' weights of the tiny model: dense, sparse and untouched tensors, some stages
    changing a tensor the one before left alone. Returns (base model, states, saved diff files)."""
    g = torch.Generator().manual_seed(seed)
    tok = models.build_tiny_tokenizer()
    base_model = models.build_tiny_model(0, len(tok))
    base = base_model.state_dict()
    keys = [k for k in base if k != "lm_head.weight"]
    states, cur = [], {k: v.clone() for k, v in base.items()}
    for t in range(T):
        for i, k in enumerate(keys):
            if (i + t) % 3 == 0:
                cur[k] = cur[k] + 0.01 * torch.randn(cur[k].shape, generator=g)
            elif (i + t) % 3 == 1:
                m = torch.rand(cur[k].shape, generator=g) < 0.1
                cur[k] = torch.where(m, cur[k] + torch.randn(cur[k].shape, generator=g), cur[k])
        state = dict(cur)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as the model's state_dict
        states.append({k: v.clone() for k, v in state.items()})
        checkpoint.save_state_diff(tmp_path / f"taskvec{t + 1}.pt", checkpoint.state_diff(state, base))
    files = [checkpoint.open_state_diff(tmp_path / f"taskvec{t + 1}.pt") for t in range(T)]
    return base_model, states, files


@pytest.mark.parametrize("cumulative", [True, False])
def test_merged_model_from_files_equals_the_merges_of_the_task_vectors(tmp_path, cumulative):
    base_model, states, files = _stages_saved(tmp_path, 3)
    base = {k: v for k, v in base_model.state_dict().items() if k != "lm_head.weight"}
    # the task vectors straight from the stages' states (not from the files)
    prev, taus = base, []
    for s in states:
        taus.append({k: s[k].float() - prev[k].float() for k in base if not torch.equal(s[k], prev[k])})
        prev = s if cumulative else base
    specs = [MergeSpec(how="task_arithmetic", lam=0.5), MergeSpec(how="ties", density=0.3, lam=1.5),
             MergeSpec(how="ties", density=0.3, scope="global"), MergeSpec(how="dare_linear", density=0.4, lam=0.7),
             MergeSpec(how="dare_ties", density=0.4), MergeSpec(how="lota_additive")]
    expected = [merging.task_arithmetic(base, taus, 0.5), merging.ties(base, taus, 0.3, 1.5),
                merging.ties(base, taus, 0.3, 1.0, "global"), merging.dare_linear(base, taus, 0.4, 0.7, seed=5),
                merging.dare_ties(base, taus, 0.4, 1.0, seed=5), merging.lota_additive(base, taus)]
    for spec, want in zip(specs, expected):  # DARE: the same seed draws the same drops from files as in memory
        got = merging.merged_model(base_model, files, spec, cumulative=cumulative, seed=5).state_dict()
        for k in base:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{spec.how} {spec.scope} {k}")
        assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()  # still tied
    if cumulative:  # theta_0 + the stages' own changes is the last stage
        got = merging.merged_model(base_model, files, MergeSpec(how="task_arithmetic"), cumulative=True).state_dict()
        for k in base:
            torch.testing.assert_close(got[k], states[-1][k], rtol=0, atol=1e-6)
    assert torch.equal(base_model.state_dict()["model.norm.weight"], base["model.norm.weight"])


def test_lota_additive_is_refused_in_the_sequential_stream():
    from pydantic import ValidationError

    from clbench.config import MethodSpec

    with pytest.raises(ValidationError, match="lota_additive needs mode: single"):
        MethodSpec(name="lota", merge=[{"how": "lota_additive"}])
    assert MethodSpec(name="lota", mode="single", merge=[{"how": "lota_additive"}]).merge[0].how == "lota_additive"
