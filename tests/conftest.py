import os
import sys
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
    from clbench import models

    return models.build_tiny_tokenizer()
