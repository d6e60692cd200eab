"""Selections under sharding (distributed.strategy fsdp) and the same numbers at any number of
processes.

- clbench.method.masking.topk_masks, the exact top-k over row shards, against a stable descending sort
  of the whole scores (2 gloo processes, rows split as FSDP2 splits them, heavy ties);
- lota, hft, ks_lottery, spafit, ewc, sift, replay run sharded on 2 processes and on 1 (both through
  `clbench run` with distributed.strategy fsdp): the same matrix, losses, selected entries, rows
  and frozen matrices; agem and gem likewise (their own run, where both project): the same
  projected steps; nlora, moelora, moelora_expand, progressive_prompts and l2p likewise (their own
  run), with the parts they freeze bit-identical while sharded;
- the dropout keyed by the global example: the same mask for an example whatever batch holds it.

Run as a script under torchrun, this file is the worker of the top-k check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]  # not conftest's: torchrun runs this file as a script too

SHAPES = [(7, 5), (131, 64), (2, 3), (64, 96), (1, 4)]
RATE = {"lota": 0.1, "sift": 0.05}


def _scores(seed: int) -> dict[str, torch.Tensor]:
    """Non-negative float32 scores, every other tensor with heavy ties (few distinct values)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, shape in enumerate(SHAPES):
        s = torch.rand(shape, generator=g)
        out[f"m{j}"] = (s * 4).floor() / 4 if j % 2 == 0 else s
    out["m0"][0, 0] = 0.0
    return out


def _groups(kind: str, scores):
    """LoTA: one group over every tensor; SIFT: one group per tensor (its own k)."""
    names = list(scores)
    if kind == "lota":
        return [names], [round(RATE["lota"] * sum(s.numel() for s in scores.values()))]
    return [[n] for n in names], [min(int(RATE["sift"] * scores[n].numel()) + 1, scores[n].numel()) for n in names]


def _reference(kind: str, scores) -> dict[str, torch.Tensor]:
    """The first k of a stable descending sort of the concatenated scores of each group."""
    out = {}
    for group, k in zip(*_groups(kind, scores)):
        flat = torch.cat([scores[n].reshape(-1) for n in group])
        sel = torch.zeros(flat.numel(), dtype=torch.bool)
        sel[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
        off = 0
        for n in group:
            out[n] = sel[off:off + scores[n].numel()].view(scores[n].shape)
            off += scores[n].numel()
    return out


def _worker(out_path: str) -> None:
    import torch.distributed as dist

    from clbench.method.masking import topk_masks

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for seed in range(6):
        scores = _scores(seed)
        # FSDP2's split: torch.chunk of the rows, rank r the r-th chunk (possibly none)
        local = {}
        for n, s in scores.items():
            chunks = torch.chunk(s, world, dim=0)
            local[n] = chunks[rank] if rank < len(chunks) else s[:0]
        for kind in ("lota", "sift"):
            masks = topk_masks(local, *_groups(kind, scores), sharded=True)
            parts = [None] * world
            dist.all_gather_object(parts, masks)
            result[f"{kind}{seed}"] = {n: torch.cat([p[n] for p in parts]) for n in scores}
    if rank == 0:
        torch.save(result, out_path)
    dist.destroy_process_group()


def _torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def test_topk_over_two_shards_selects_what_a_stable_sort_of_the_whole_selects(tmp_path):
    """Exact: the same entries (ties included) as one process sorting everything, and at one
    process topk_masks gives them too (with no collective)."""
    from clbench.method.masking import topk_masks

    _torchrun(__file__, tmp_path / "masks.pt")
    got = torch.load(tmp_path / "masks.pt")
    ties = 0
    for seed in range(6):
        scores = _scores(seed)
        for kind in ("lota", "sift"):
            want = _reference(kind, scores)
            one = topk_masks(scores, *_groups(kind, scores))
            for n in scores:
                assert torch.equal(got[f"{kind}{seed}"][n], want[n]), (kind, seed, n)
                assert torch.equal(one[n], want[n]), (kind, seed, n)
            ties += int(sum(((scores[n] == scores[n][want[n]].min()) & ~want[n]).sum() for n in scores if want[n].any()))
    assert ties > 0  # some ties at the threshold were left out: the tie rule was exercised


def test_topk_refuses_negative_or_nan_scores():
    from clbench.method.masking import topk_masks

    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="negative, -0.0 or NaN"):
            topk_masks({"a": torch.tensor([1.0, bad])}, [["a"]], [1])
    with pytest.raises(ValueError, match="cannot select"):
        topk_masks({"a": torch.ones(3)}, [["a"]], [4])


# --- whole methods, sharded on 2 processes against 1 --------------------------------------------

STREAM1 = [{"name": "lota", "options": {"calibration_steps": 2}}, {"name": "hft"},
           {"name": "ks_lottery", "options": {"calibration_steps": 2, "n": 20}},
           {"name": "spafit", "options": {"r": 2, "alpha": 4}}, {"name": "ewc", "options": {"ewc_lambda": 100.0}},
           {"name": "sift"}, {"name": "sift", "label": "sift_decay", "options": {"decay_selected": True}},
           # replay at lr 1e-3: its stage-2 batches mix two tasks' lengths, 11 examples split 6/5 over the
           # ranks, so the sums differ by rounding where the other methods' even 4/4 splits of one length
           # agree almost bit for bit; at the others' lr 3e-3 Adam's sign-like first steps make this dense
           # training chaotic (seen: weights 6e-3 and 38% of a tensor's entries apart after stage 3), at
           # 1e-3 every weight is within 4.8e-6 after stage 3 and the losses within 5e-7
           {"name": "replay", "options": {"m": 8}, "train": {"lr": 1.0e-3}}]
# A-GEM and GEM project the gradient (sharded: per-shard partial dot products summed over the ranks):
# their own run, on order 2 at lr 1e-2, where both project in stages 2 and 3 (on order 1 at lr 3e-3 no
# constraint is violated in 3 steps, and order 1 at lr 1e-2 drifts 3e-5 apart in the losses, Adam's
# sign-like steps at that lr, before the projection matters); seen: losses within 2.2e-6
PROJECTING = [{"name": "agem", "options": {"m": 8}}, {"name": "gem", "options": {"m": 8}}]
# Methods that add trainable modules at setup (a LoRA per stage, experts, soft prompts) and freeze the
# earlier ones stage by stage: their own run, checked for the same numbers and for the frozen parts
# staying bit-identical while sharded (a requires_grad switch that FSDP missed would move them).
# Each one's part frozen after stage 1 (a key fragment of the stage checkpoint's state dict).
# InfLoRA's passes over the stage's examples, and LAMOL's, SDFT's and SSR's generation, run on the
# model gathered on every rank (clbench.distributed.fsdp.unsharded); LwF's teacher is sharded like its student.
ADDED = [{"name": "nlora", "options": {"r": 2}}, {"name": "moelora"}, {"name": "moelora_expand"},
         {"name": "progressive_prompts"}, {"name": "l2p"}, {"name": "inflora", "options": {"r": 2}},
         {"name": "sdft"}, {"name": "ssr"}, {"name": "lwf"},
         {"name": "lwf", "label": "lwf_lora", "options": {"base": "lora", "base_options": {"r": 4}}}]
FROZEN_AFTER_1 = {"nlora": ".stage1.", "moelora_expand": ".groups.0.", "progressive_prompts": "prompts.0",
                  "inflora": ".stage1."}
# Methods whose numbers depend on the number of processes (world_size_dependent: how the batch
# splits over the ranks): sharded at N they equal replicated at N.
DEPENDENT = [{"name": "ilora"}, {"name": "lamol"}]
SHARDED = STREAM1 + PROJECTING + ADDED + DEPENDENT  # every method these tests run sharded (test_compat_table.py reads it)


def _two_and_one(d, methods, order="1", lr=3.0e-3, other="one"):
    """The same config run by 2 sharded processes (d/two) and by 1 (d/one), or (other="ddp") by 2
    replicated ones (d/ddp)."""
    from clbench.cli import main

    cfg = {"name": "fsdp", "model": "tiny", "stream": "tiny3", "order": order,
           "task_dirs": [str(REPO / "configs" / "tiny_tasks")], "methods": methods, "seeds": [0],
           "train": {"lr": lr, "steps": 3, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 8, "batch_size": 16, "log_samples": False}, "precision": "fp32", "keep_checkpoints": "all",
           "threads": 1, "distributed": {"strategy": "fsdp"}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    _torchrun("-m", "clbench", "run", d / "cfg.yaml", "--output-dir", d / "two")
    if other == "ddp":
        _torchrun("-m", "clbench", "run", d / "cfg.yaml", "--output-dir", d / "ddp", "--set", "distributed.strategy=ddp")
        return d / "ddp", d / "two"
    assert main(["run", str(d / "cfg.yaml"), "--output-dir", str(d / "one")]) == 0
    return d / "one", d / "two"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return _two_and_one(tmp_path_factory.mktemp("fsdp"), STREAM1)


@pytest.fixture(scope="module")
def projecting_runs(tmp_path_factory):
    return _two_and_one(tmp_path_factory.mktemp("fsdp_projecting"), PROJECTING, order="2", lr=1.0e-2)


@pytest.fixture(scope="module")
def added_runs(tmp_path_factory):
    return _two_and_one(tmp_path_factory.mktemp("fsdp_added"), ADDED)


@pytest.fixture(scope="module")
def dependent_runs(tmp_path_factory):
    return _two_and_one(tmp_path_factory.mktemp("fsdp_dependent"), DEPENDENT, other="ddp")


def _method_state(run, m, t):
    return torch.load(run / "checkpoints" / m / "seed0" / f"stage{t}.dcp" / "rank0.pt", weights_only=False)["method"]


def _same_numbers(runs, specs) -> dict:
    """Every method of `specs` complete in both runs, with the same matrix and every stage's losses
    within 1e-5 (each rank sums its share of the tokens, then the ranks' sums are added: float sums
    in another order). Returns {name: (seed entry of run 0, of run 1)}."""
    one, two = (json.loads((r / "results.json").read_text()) for r in runs)
    out = {}
    for spec in specs:
        m = spec.get("label", spec["name"])
        s1, s2 = one["methods"][m]["seeds"]["0"], two["methods"][m]["seeds"]["0"]
        assert s1["complete"] and s2["complete"], m
        assert s1["matrix"] == s2["matrix"], m
        for a, b in zip(s1["stages"], s2["stages"], strict=True):
            assert b["first_loss"] == pytest.approx(a["first_loss"], abs=1e-5), m
            assert b["last_loss"] == pytest.approx(a["last_loss"], abs=1e-5), m
        out[m] = (s1, s2)
    return out


def _weights_within_a_step(runs, specs) -> None:
    """The weights after the last stage: none off by more than one lr step (3e-3), at most 1% of a
    tensor's entries by more than 1e-5 (see the tests' docstrings)."""
    for spec in specs:
        m = spec.get("label", spec["name"])
        a, b = (_weights(r, m, 3) for r in runs)
        assert a.keys() == b.keys(), m
        for k in a:
            d = (a[k].float() - b[k].float()).abs()
            assert d.max() <= 3e-3 and (d > 1e-5).float().mean() <= 1e-2, (m, k)


def test_sharded_methods_on_two_processes_match_one(fsdp_runs):
    """Matrices identical; losses within 1e-5 (each rank sums its share of the tokens, then the
    ranks' sums are added: float sums in another order); LoTA's masks, KS-Lottery's rows, HFT's
    frozen matrices identical (exact selections, not approximately equal scores); LoTA's task
    vectors within 3e-3 (one lr step: Adam's division by sqrt(v) amplifies rounding where a
    gradient is ~0, as in the DDP test); EWC's Fisher within 1e-3 of its largest entry per tensor
    (squares of gradients that differ by rounding, accumulated over stages of training that
    differs by rounding; seen: 2.2e-4 after stage 3)."""
    from clbench.method.masking import unpack_mask

    _same_numbers(fsdp_runs, STREAM1)
    for t in (1, 2, 3):
        a, b = (_method_state(r, "lota", t) for r in fsdp_runs)
        assert len(a["masks"]) == t
        for ma, mb in zip(a["masks"], b["masks"]):
            assert ma.keys() == mb.keys()
            assert all(torch.equal(unpack_mask(ma[n]), unpack_mask(mb[n])) for n in ma)
        for va, vb in zip(a["values"], b["values"]):
            assert all(torch.allclose(va[n], vb[n], rtol=0, atol=3e-3) for n in va)
        ka, kb = (_method_state(r, "ks_lottery", t) for r in fsdp_runs)
        assert ka["selected"] == kb["selected"] and len(ka["selected"][-1]) == 20
        assert _method_state(fsdp_runs[0], "hft", t)["frozen"] == _method_state(fsdp_runs[1], "hft", t)["frozen"]
        fa, fb = (_method_state(r, "ewc", t)["fisher"] for r in fsdp_runs)
        assert fa.keys() == fb.keys() and all(fa[n].shape == fb[n].shape for n in fa)
        assert all((fa[n] - fb[n]).abs().max() <= 1e-3 * fa[n].abs().max() for n in fa)



def test_sharded_method_state_is_held_in_shards(fsdp_runs):
    """What LoTA (masks, task vectors) and EWC (Fisher, and the anchor from stage 2 on) hold between
    stages is of each rank's rows under fsdp: after every stage each of the 2 ranks holds at most
    0.55 of one process's bytes (clbench.runtime.method_state_bytes, results.json per_rank): half,
    plus FSDP's even split rounding an odd row count up on one rank."""
    one, two = (json.loads((r / "results.json").read_text()) for r in fsdp_runs)
    for m in ("lota", "ewc"):
        for a, b in zip(one["methods"][m]["seeds"]["0"]["stages"], two["methods"][m]["seeds"]["0"]["stages"], strict=True):
            (whole,), ranks = [r["method_state"] for r in a["per_rank"]], [r["method_state"] for r in b["per_rank"]]
            assert whole > 0 and len(ranks) == 2, (m, a["stage"])
            assert max(ranks) <= 0.55 * whole, (m, a["stage"], ranks, whole)

def _weights(run, m, t):
    """The whole model of a stage checkpoint (a torch.distributed.checkpoint folder)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run / f"{m}-stage{t}.pt"
    if not out.exists():
        dcp_to_torch_save(run / "checkpoints" / m / "seed0" / f"stage{t}.dcp", out)
    return torch.load(out)["model"]


def test_sharded_weights_and_sift_entries_match_one_process(fsdp_runs):
    """Weights after the last stage: none off by more than one lr step (3e-3), at most 1% of the
    entries by more than 1e-5 (Adam's division by sqrt(v) amplifies rounding where a gradient is
    ~0, as in the DDP test; seen: at most 4.8e-5, on 0.02% of an EWC tensor's entries). SIFT: the entries each stage
    changed (its selection: every selected entry moves) are the same, and as many as its budget."""
    from clbench.method import get

    _weights_within_a_step(fsdp_runs, STREAM1)
    budget = sys.modules[get("sift").__module__].budget
    for m in ("sift", "sift_decay"):
        for t in (2, 3):
            changed = []
            for r in fsdp_runs:
                before, after = _weights(r, m, t - 1), _weights(r, m, t)
                changed.append({k: after[k] != before[k] for k in after if k.endswith("proj.weight")})
            assert all(torch.equal(changed[0][k], changed[1][k]) for k in changed[0]), (m, t)
            assert sum(int(c.sum()) for c in changed[0].values()) == sum(budget(before[k].numel(), 0.05) for k in changed[0])


def test_sharded_runs_agree_on_every_rank(fsdp_runs):
    _, two = fsdp_runs
    res = json.loads((two / "results.json").read_text())
    for spec in STREAM1:
        for st in res["methods"][spec.get("label", spec["name"])]["seeds"]["0"]["stages"]:
            assert len(set(st["rank_digests"])) == 1, (spec["name"], st["stage"])


def test_projections_on_sharded_gradients_match_one_process(projecting_runs):
    """A-GEM and GEM on 2 sharded processes against 1: the same matrix; losses within 1e-5 (as
    above); the same steps projected (every rank takes the decision on the same all-reduced dot
    products, and the decisions match one process's); the share of the gradient projected away
    within 1e-5 relative (float64 sums of float32 partial dots in another order; seen: 5e-6); weights
    as above at this run's 3.3x higher lr: none off by more than one lr step (1e-2), at most 1% of the
    model's entries by more than 3e-5 (seen: 1.2e-3 at most; in a tensor at most 0.3% of an o_proj's
    entries above 3e-5, one of a 64-entry norm's); the ranks' digests equal."""
    one, two = (json.loads((r / "results.json").read_text()) for r in projecting_runs)
    for spec in PROJECTING:
        m = spec["name"]
        s1, s2 = one["methods"][m]["seeds"]["0"], two["methods"][m]["seeds"]["0"]
        assert s1["complete"] and s2["complete"], m
        assert s1["matrix"] == s2["matrix"], m
        projected = 0.0
        for a, b in zip(s1["stages"], s2["stages"], strict=True):
            assert b["first_loss"] == pytest.approx(a["first_loss"], abs=1e-5), m
            assert b["last_loss"] == pytest.approx(a["last_loss"], abs=1e-5), m
            assert len(set(b["rank_digests"])) == 1, (m, b["stage"])
            sa, sb = a.get("method_stats") or {}, b.get("method_stats") or {}
            assert sa.keys() == sb.keys(), m
            if sa:
                assert sb["violated"] == sa["violated"], (m, a["stage"])
                assert sb["projected_fraction"] == pytest.approx(sa["projected_fraction"], rel=1e-5, abs=1e-9), m
                projected += sa["violated"]
        assert projected > 0, m  # the projection ran (stages 2 and 3 both project)
        ka, kb = (_method_state(r, m, 3)["stats"] for r in projecting_runs)
        assert ka == kb and all(s["projected"] > 0 for s in ka), (m, ka, kb)
        a, b = (_weights(r, m, 3) for r in projecting_runs)
        assert a.keys() == b.keys(), m
        d = torch.cat([(a[k].float() - b[k].float()).abs().reshape(-1) for k in a])
        assert d.max() <= 1e-2 and (d > 3e-5).float().mean() <= 1e-2, (m, float(d.max()), float((d > 3e-5).float().mean()))


def test_an_option_that_cannot_run_sharded_is_refused_before_any_training(tmp_path, run_cli):
    cfg = {"name": "refused", "model": "tiny", "tasks": ["tiny_parity"], "task_dirs": [str(REPO / "configs" / "tiny_tasks")],
           "methods": [{"name": "lota"}, {"name": "sift", "options": {"target_modules": ["q_proj", "embed_tokens"]}}],
           "train": {"steps": 1}, "precision": "fp32", "distributed": {"strategy": "fsdp"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli("run", tmp_path / "cfg.yaml", "--output-dir", tmp_path / "out")
    assert code == 2 and "methods.1 (sift)" in err and "target_modules ['embed_tokens'] under fsdp" in err
    assert not (tmp_path / "out" / "results.json").exists()


# --- dropout keyed by the global example ---------------------------------------------------------


def test_keyed_dropout_gives_an_example_the_same_mask_in_any_batch_and_padding():
    from clbench.method import adapters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Dropout(0.5), torch.nn.Dropout(0.3))
    x = torch.randn(4, 5, 6)
    with adapters.keyed(model, 11, [0, 1, 2, 3], max_length=8):
        whole = model(x)
    torch.manual_seed(1)  # another process RNG: the keyed masks do not read it
    with adapters.keyed(model, 11, [1, 3], max_length=8):
        share = model(x[[1, 3], :3])  # rank 1's share, padded to a shorter length
    assert torch.equal(share, whole[[1, 3], :3])
    assert type(model[1]) is adapters.KeyedDropout and model[1].index != model[2].index
    with adapters.keyed(model, 12, [0, 1, 2, 3], max_length=8):
        assert not torch.equal(model(x), whole)  # another step: other masks
    with adapters.keyed(model, 11, [0, 1, 2, 3], max_length=8):
        first, second = model(x), model(x)  # a second forward in the same step draws anew
    assert torch.equal(first, whole) and not torch.equal(second, whole)
    assert (model(x) == 0).any()  # outside the loop's forward: torch's own dropout
    torch.manual_seed(2)
    with adapters.keyed(model, 11, [0, 1, 2, 3], max_length=8):
        a = model(x[0])  # not one row per example (an adapter on the head): torch's dropout, from the process RNG
    torch.manual_seed(2)
    assert torch.equal(a, model(x[0]))
    model.eval()
    with adapters.keyed(model, 11, [0, 1, 2, 3], max_length=8):
        assert torch.equal(model(x), x)  # no dropout in eval mode


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_methods_with_added_modules_match_one_process_sharded(added_runs):
    """N-LoRA (its penalty over whole matrices through clbench.distributed.fsdp.full), MoE-LoRA and its expanding
    variant, Progressive Prompts and L2P (the prompt module in the root unit, gathered before the
    decoder's prompt hook runs), InfLoRA, SDFT and SSR (passes and generation on the gathered
    model), LwF alone and over LoRA (its teacher sharded like the student): the same matrix as one process, losses within 1e-5 (the ranks' token
    sums added in another order, as above), the weights after the last stage within one lr step and
    1% of entries beyond 1e-5 (as above), and in the sharded run the part each freezes after stage 1
    bit-identical from stage 1 to stage 3."""
    _same_numbers(added_runs, ADDED)
    _weights_within_a_step(added_runs, ADDED)
    for m, frag in FROZEN_AFTER_1.items():
        first, last = _weights(added_runs[1], m, 1), _weights(added_runs[1], m, 3)
        keys = [k for k in first if frag in k]
        assert keys, (m, frag)
        assert all(torch.equal(first[k], last[k]) for k in keys), m
        trained = [k for k in last if frag.replace("1", "3").replace("0", "2") in k]  # the last stage's part moved
        assert trained and any(not torch.equal(first[k], last[k]) for k in trained), m


def test_methods_that_depend_on_n_match_replicated_at_the_same_n_sharded(dependent_runs):
    """I-LoRA and LAMOL depend on how a batch splits over the ranks (each says why); at 2 sharded
    processes they equal 2 replicated ones: the same matrix, losses within 1e-5 (as above), and
    both record the same dependence."""
    for m, (s1, s2) in _same_numbers(dependent_runs, DEPENDENT).items():
        assert s1["world_size_dependent"] == s2["world_size_dependent"] and s2["world_size_dependent"], m
