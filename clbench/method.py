"""The method protocol and registry.

A method is one Python file (built-in ones live in methods/, user ones are listed in the
config's `method_files`) that defines a class decorated with `@register("name")`. The
continual loop owns the only training loop; a method acts through hooks the loop calls:

    setup(model, run)            once per (method, seed), before stage 1; may wrap the
                                 model (e.g. a peft adapter) and returns the model to train
    stage_start(model, stage)    before a stage's training: calibration passes, mask draws,
                                 fresh adapters; returns the model to train
    param_groups(model, stage)   the optimizer's parameter groups for this stage
    after_backward(model, stage) after the (accumulated) backward, before clipping and the
                                 optimizer step: gradient masking lives here
    after_step(model, stage)     after each optimizer step: sparse flushes, rank allocation
    extra_loss(model, batch, stage) -> tensor | None   added to the task loss (regularisers)
    stage_end(model, stage)      after training, before evaluation; returns the model to evaluate
    trainable_params(model) -> int   entries the method trains (default: requires_grad count)
    state_dict() / load_state_dict(state)   what is needed to resume after a stage

Only `setup` is required; a missing optional hook is a no-op (the loop provides defaults,
so a method file states just what it changes). Every method class has an `Options`
pydantic model whose defaults are the method's documented defaults.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ClbenchError, ConfigError

HOOKS = ("stage_start", "param_groups", "trainable_params", "after_backward", "after_step", "extra_loss", "stage_end", "state_dict", "load_state_dict")


class MethodError(ClbenchError):
    pass


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Method(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def setup(self, model: torch.nn.Module, run: "RunContext") -> torch.nn.Module: ...


@dataclass
class RunContext:
    """What a method sees of its run: one (method, seed) pair over the whole stream."""

    method: str
    seed: int
    tasks: list[str]
    device: torch.device
    tokenizer: Any = None
    # examples(task) -> the tokenized training examples (clbench.train.Example) of any task with
    # training data, also one outside the stream (e.g. general instruction data for replay). A
    # method that uses it lists the task names in an attribute `needs_tasks`, checked before the run.
    examples: Callable[[str], list] | None = None


@dataclass
class StageContext:
    """What a method sees of one stage. `calibrate(model, steps=None, lr=None,
    weight_decay=None)` runs the loop's own training loop densely on this stage's data
    (LoTA calibration, KS-Lottery's embedding pass); None keeps the stage's setting."""

    stage: int
    task: str
    seed: int
    run: RunContext
    train_config: Any
    generator: torch.Generator
    calibrate: Callable[..., dict] = None
    global_step: int = 0
    total_steps: int = 0  # set before stage_start (and again by each calibration pass)
    optimizer: Any = None  # the stage's optimizer while train_stage runs (after_step may read its lr)
    extras: dict = field(default_factory=dict)


_REGISTRY: dict[str, type] = {}
_SOURCES: dict[str, str] = {}


def register(name: str, *aliases: str):
    """Class decorator: register a method under `name` (and aliases). Duplicates fail."""

    def deco(cls):
        for n in (name, *aliases):
            src = inspect.getsourcefile(cls) or "?"
            if n in _REGISTRY and _SOURCES.get(n) != src:
                raise MethodError(f"method name {n!r} is registered twice: {_SOURCES[n]} and {src}")
            _REGISTRY[n] = cls
            _SOURCES[n] = src
        cls.name = name
        if not hasattr(cls, "Options"):
            cls.Options = NoOptions
        return cls

    return deco


def load_method_file(path: Path) -> list[str]:
    """Import one method file by path; returns the names it registered."""
    path = Path(path)
    if not path.is_file():
        raise MethodError(f"method file not found: {path}")
    before = dict(_REGISTRY)
    mod_name = f"clbench_methods.{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except MethodError:
        raise
    except Exception as e:  # a user file that fails to import: name the file and the error
        sys.modules.pop(mod_name, None)
        raise MethodError(f"method file {path} failed to import: {type(e).__name__}: {e}") from e
    new = [n for n, c in _REGISTRY.items() if before.get(n) is not c]
    for n in new:
        check_protocol(_REGISTRY[n], path)
    if not new and path.parent.name != "methods":
        raise MethodError(f"method file {path} registered no method (decorate a class with @clbench.method.register('name'))")
    return new


def check_protocol(cls, where) -> None:
    problems = []
    if not callable(getattr(cls, "setup", None)):
        problems.append("no setup(self, model, run) method")
    opts = getattr(cls, "Options", None)
    if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
        problems.append("Options is not a pydantic BaseModel class")
    for h in HOOKS:
        if hasattr(cls, h) and not callable(getattr(cls, h)):
            problems.append(f"{h} is not callable")
    if problems:
        raise MethodError(f"method {getattr(cls, 'name', cls.__name__)!r} in {where} does not implement the protocol: " + "; ".join(problems))


def load_builtin_methods(folder: Path) -> None:
    for f in sorted(Path(folder).glob("*.py")):
        if not f.name.startswith("_"):
            load_method_file(f)


def available() -> dict[str, type]:
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make(name: str, options: dict, where: str = "methods"):
    cls = get(name)
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as e:
        from .config import format_validation_error

        raise ConfigError(format_validation_error(e, f"{where} ({name} options)", cls.Options)) from None
    return cls(opts)


# --- defaults for optional hooks, used by the loop -----------------------------------


def call(method, hook: str, *args, default=None):
    fn = getattr(method, hook, None)
    if fn is None:
        return default
    return fn(*args)


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """All trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def count_trainable(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
