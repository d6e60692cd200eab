"""The method registry: `@register("name")` on a Method subclass, the built-in methods imported as
the package clbench_builtin.methods, user method files imported by path, and the methods published
under the `clbench.methods` entry point. Hand-written: a registry with origins and duplicate checks
(the shape of lm-eval's `api/registry.py`), for the protocol in clbench/method/protocol.py."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from clbench import paths
from clbench.config import format_validation_error
from clbench.errors import ClbenchError, ConfigError
from clbench.method.protocol import MethodError, call_hook, check_protocol


def _forbid_extra(opts: type[BaseModel]) -> type[BaseModel]:
    """The same Options class, refusing unknown keys (a misspelt option must never be ignored)."""
    if opts.model_config.get("extra") == "forbid":
        return opts
    return type(opts.__name__, (opts,), {"model_config": ConfigDict(**{**opts.model_config, "extra": "forbid"}),
                                         "__module__": opts.__module__, "__doc__": opts.__doc__})


_REGISTRY: dict[str, type] = {}
_SOURCES: dict[str, str] = {}
_PLUGIN_OF: dict[str, str] = {}  # name -> the entry point (clbench.paths.plugin_label) that registered it


def register(name: str, *aliases: str):
    """Class decorator: register a method under `name` (and aliases). Duplicates fail."""

    def deco(cls):
        src = inspect.getsourcefile(cls) or "?"
        cls.name = name
        check_protocol(cls, src)
        cls.Options = _forbid_extra(cls.Options)
        for n in (name, *aliases):
            if n in _REGISTRY and _SOURCES.get(n) != src:
                raise MethodError(f"method name {n!r} is registered twice: {_SOURCES[n]} and {src}")
            _REGISTRY[n] = cls
            _SOURCES[n] = src
            if _PLUGINS["loading"]:
                _PLUGIN_OF[n] = _PLUGINS["loading"]
        return cls

    return deco


BUILTIN_PACKAGE = "clbench_builtin.methods"  # the built-in methods (pyproject.toml maps the repository's methods/)
FILE_PREFIX = "clbench_methods"  # the module name of a method file loaded by path: clbench_methods.<file stem>


def builtin_package():
    """The built-in methods' package, imported as an ordinary package, so one built-in method reaches
    another by import (`from clbench_builtin.methods import olora`). From an uninstalled checkout on
    PYTHONPATH (clbench.paths: bench/gpu_check.py) the package is made importable from its folder."""
    if importlib.util.find_spec("clbench_builtin") is None and BUILTIN_PACKAGE not in sys.modules:
        folder = paths.BUILTIN_METHODS_DIR
        top = types.ModuleType("clbench_builtin")
        top.__path__ = []
        sys.modules.setdefault("clbench_builtin", top)
        spec = importlib.util.spec_from_file_location(BUILTIN_PACKAGE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[BUILTIN_PACKAGE] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(BUILTIN_PACKAGE)


def _is_builtin(path: Path) -> bool:
    return path.resolve().parent == paths.BUILTIN_METHODS_DIR.resolve()


def load_method_file(path: Path) -> list[str]:
    """Import one method file; returns the names it registered. A built-in method is imported as
    clbench_builtin.methods.<stem> (once, however often it is asked for); any other file by path, as
    clbench_methods.<stem>. The built-ins are reachable under clbench_methods.<stem> too (the name
    they had when they were loaded by path)."""
    path = Path(path)
    if not path.is_file():
        raise MethodError(f"method file not found: {path}")
    before = dict(_REGISTRY)
    builtin = _is_builtin(path)
    mod_name = f"{BUILTIN_PACKAGE}.{path.stem}" if builtin else f"{FILE_PREFIX}.{path.stem}"
    try:
        if builtin:
            builtin_package()
            module = importlib.import_module(mod_name)
        else:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
    except MethodError as e:
        sys.modules.pop(mod_name, None)
        raise MethodError(f"method file {path}: {e}") from e
    except BaseException as e:  # also SystemExit/KeyboardInterrupt raised by the file itself
        sys.modules.pop(mod_name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise MethodError(f"method file {path} failed to import: {type(e).__name__}: {e}") from e
    if builtin:
        sys.modules[f"{FILE_PREFIX}.{path.stem}"] = module
    new = [n for n, c in _REGISTRY.items() if before.get(n) is not c]
    if not new and not builtin and path.parent.name != "methods":
        raise MethodError(f"method file {path} registered no method (decorate a Method subclass with "
                          "@clbench.method.register('name'))")
    return new


def method_module(path: Path):
    """The module of a method file, imported through load_method_file if it is not yet. A user's
    method that extends a built-in one imports it instead (`from clbench_builtin.methods import
    olora`); this serves method files that extend each other by path."""
    path = Path(path)
    name = f"{BUILTIN_PACKAGE if _is_builtin(path) else FILE_PREFIX}.{path.stem}"
    if name not in sys.modules:
        load_method_file(path)
    return sys.modules[name]


def load_builtin_methods(folder: Path) -> None:
    for f in sorted(Path(folder).glob("*.py")):
        if not f.name.startswith("_"):
            load_method_file(f)


# --- plugins: methods published as their own distribution ----------------------------------

_PLUGINS: dict[str, Any] = {"done": False, "loading": None}


def load_plugin_methods() -> None:
    """Import every `clbench.methods` entry point once, before the registry is first read. A
    target is a module (importing it registers its methods), a method file path, or a Method
    class registered with @register; anything else, or an import failure, is an error naming the
    entry point and its distribution."""
    if _PLUGINS["done"] or _PLUGINS["loading"]:
        return
    try:
        for ep in paths.plugin_entry_points(paths.METHODS_GROUP):
            label = paths.plugin_label(ep)
            _PLUGINS["loading"], before = label, dict(_REGISTRY)
            try:
                target = paths.load_plugin(ep)
                if isinstance(target, (str, os.PathLike)):
                    load_method_file(Path(target))
            except ClbenchError as e:
                raise MethodError(str(e) if label in str(e) else f"plugin {label}: {e}") from e
            registered = isinstance(target, type) and _REGISTRY.get(getattr(target, "name", None)) is target
            if not registered and not any(before.get(n) is not c for n, c in _REGISTRY.items()):
                raise MethodError(f"plugin {label} registered no method: it must name a module or method file "
                                  "defining a Method subclass decorated with @clbench.method.register('name'), or "
                                  f"such a class; it gave {target!r}")
        _PLUGINS["done"] = True
    finally:
        _PLUGINS["loading"] = None


def origin(name: str) -> str:
    """Where a registered method comes from: 'built-in', the plugin entry point, or its file."""
    src = Path(_SOURCES[name]).resolve()
    if name in _PLUGIN_OF:
        return f"plugin {_PLUGIN_OF[name]}"
    return "built-in" if src.parent == paths.BUILTIN_METHODS_DIR.resolve() else str(src)


def methods_in(folder: Path) -> list[str]:
    """The names of the methods registered from the files of `folder`, each once (aliases left out)."""
    folder, seen, out = Path(folder).resolve(), set(), []
    for name, cls in available().items():
        if cls not in seen and Path(_SOURCES[name]).resolve().parent == folder:
            seen.add(cls)
            out.append(cls.name)
    return out


def available() -> dict[str, type]:
    load_plugin_methods()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type:
    load_plugin_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_method(name: str, options: dict, where: str = "methods"):
    """The method `name` built from its options (validated against its Options; `where` names the
    config key in errors)."""
    cls = get(name)
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"{where} ({name} options)", cls.Options)) from None
    try:
        meth = cls(opts)
    except ClbenchError:
        raise
    except Exception as e:
        raise MethodError(f"method {name!r} could not be created from its options: {type(e).__name__}: {e}") from e
    tasks = call_hook(meth, "needs_tasks")
    if not (isinstance(tasks, (list, tuple)) and all(isinstance(t, str) for t in tasks)):
        raise MethodError(f"method {name!r}: needs_tasks() returned {tasks!r}, expected a list of task names")
    return meth


make = make_method  # the name method files and plugins written before make_method may use
