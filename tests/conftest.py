import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Every test runs offline with a throw-away clbench cache (never ~/.cache, never the repo).
    The real-model tests reuse the user's converted model when it exists (see test_real_model)."""
    cache = tmp_path_factory.mktemp("clbench-cache")
    os.environ["CLBENCH_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["HF_HOME"] = str(cache / "hf")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "hf" / "datasets")
    yield cache


@pytest.fixture
def run_cli(capsys):
    """Run the clbench CLI in-process; returns (exit code, stdout, stderr)."""
    from clbench.cli import main

    def _run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the tiny model gains nothing from two, and on a shared 2-core machine
    two spinning threads per process make every step many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok():
    """The tiny byte-level BPE tokenizer (deterministic)."""
    from clbench.run import models

    return models.build_tiny_tokenizer()


def two_stage_run_and_resume(tmp_path, methods: list[dict], tasks=("tiny_parity", "tiny_compare"), train=None,
                             task_dirs=()) -> dict:
    """Run `methods` (config method specs) for two stages of the tiny model through the CLI, then
    pretend the run died after stage 1 and resume it: every method's matrix and stage losses must
    repeat exactly. Returns results.json of the first run."""
    import json

    import yaml

    from clbench.cli import main

    cfg = {"name": "two-stage", "model": "tiny", "tasks": list(tasks), "task_dirs": [str(REPO / "configs" / "tiny_tasks"), *map(str, task_dirs)],
           "methods": methods, "seeds": [0], "threads": 1,
           "train": {"steps": 3, "lr": 3e-3, "batch_size": 8, "max_length": 64, **(train or {})},
           "eval": {"limit": 8, "batch_size": 16, "log_samples": False}, "precision": "fp32", "keep_checkpoints": "all"}
    path = tmp_path / "two-stage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    names = [m.get("label") or m["name"] for m in methods]
    first = {}
    for m in names:
        seed = res["methods"][m]["seeds"]["0"]
        assert seed["complete"] and len(seed["matrix"]) == 3 and len(seed["stages"]) == 2, m
        first[m] = (seed["matrix"], [(s["first_loss"], s["last_loss"]) for s in seed["stages"]])
    saved = json.loads(json.dumps(res))
    for m in names:  # the run "died" after stage 1: stage 2 is resumed from stage 1's checkpoint
        seed = res["methods"][m]["seeds"]["0"]
        seed["stages"], seed["complete"] = seed["stages"][:1], False
        (out / "checkpoints" / m / "seed0" / "stage2.pt").unlink()
    (out / "results.json").write_text(json.dumps(res))
    assert main(["run", str(path), "--output-dir", str(out)]) == 0
    res2 = json.loads((out / "results.json").read_text())
    for m in names:
        seed = res2["methods"][m]["seeds"]["0"]
        assert (seed["matrix"], [(s["first_loss"], s["last_loss"]) for s in seed["stages"]]) == first[m], m
    return saved


def left_padded_generate(model, tok, rows: list[list[int]], n_new: int) -> list[list[int]]:
    """The tokens transformers' generate (lm-eval's own generation path) adds greedily to each row of
    token ids, the rows left-padded to one width."""
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[:, width:].tolist()
