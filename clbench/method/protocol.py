"""The method protocol, as code: the hooks a method may define, the read-only views it is handed,
and `call`, through which the loop calls every hook (the registry is clbench/method/registry.py).

A method is one Python file (built-in ones live in methods/, user ones are listed in the
config's `method_files` or published under the `clbench.methods` entry point) that defines a
subclass of `Method` decorated with `@register("name")`. The continual loop owns the only
training loop; a method acts through the hooks below, whose defaults (in `Method`) do nothing,
so a method file states only what it changes. The hook names are the only public callables a
method may define with a hook-like name: a misspelt hook (`after_backwards`) fails at load time
instead of never being called.

Per (method, seed):
    needs_tasks() -> [task]        tasks read besides the stream (checked before the run)
    setup(model, run) -> model     once, before stage 1; may wrap the model (a peft adapter)
Per stage (`stage` is a read-only `Stage` view):
    stage_examples(model, stage) -> [Example] | None   the stage's training set, if the
                                   method changes it (rewritten targets, synthetic rehearsal)
    stage_start(model, stage) -> model   calibration passes, mask draws, fresh adapters
    param_groups(model, stage) -> [group] | None   the optimizer's parameter groups
Per micro-batch:
    batch(examples, stage) -> [Example] | None   the micro-batch's examples before collation
                                   (replay appends buffered ones; EWC records them)
    extra_loss(model, batch, stage, out) -> tensor | None   added to the task loss; `out` is the
                                   loop's forward (`clbench.method.lm.Forward`: loss, target logits, targets)
Per optimizer step:
    after_backward(model, stage)   after the (accumulated) backward, before clipping: masks
    after_step(model, stage)       after the optimizer step: sparse flushes, rank allocation
After training:
    stage_end(model, stage) -> model     the model to evaluate
    stage_stats(stage) -> {name: float} | None   the stage's diagnostics the method measured (a
                                   regulariser's share of the loss, the fraction of the gradient
                                   projected away); stored per stage in results.json
                                   (`method_stats`) and printed. `StageMeans` accumulates them.
    trainable_params(model) -> int | None   entries the method trains (None: requires_grad count)
    state_dict() / load_state_dict(state)   what is needed to resume after a stage
Before the run:
    stream_refusal(output_types) -> str | None   None: the method can act on this stream
                                   ({task: lm-eval output_type}, in stream order); else why not
                                   (refused at planning: SDFT on a stream with nothing to rewrite)
Before the run (distributed.strategy fsdp only):
    fsdp_refusal() -> str | None   None: the method runs on sharded parameters (clbench/distributed/fsdp.py);
                                   else why not (the default: not verified), refused at planning
    world_size_dependent() -> str | None   None: the same numbers at any number of processes;
                                   else why not (recorded in results.json, printed on several)
    step_resume_refusal() -> str | None   None: the method keeps no state of its own inside a
                                   stage, so `checkpoint_steps` may resume it mid-stage
                                   (clbench/training/midstage.py); else why not (the default: not verified)
    optimizer_name() -> str | None   the optimizer the method's source trains with ("adamw", "sgd",
                                   "rmsprop"); used when the config's train.optimizer is not set
                                   (None: AdamW); recorded per stage in results.json

Every method has an `Options` pydantic model whose defaults are its documented defaults;
unknown option keys are refused whatever the author wrote (the registry enforces extra=forbid).
The loop calls hooks through `call`, which names the method and hook in any error and checks
what a hook returns.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from clbench.errors import ClbenchError
from clbench.schedule import lr_factor


class MethodError(ClbenchError):
    pass


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class RunContext:
    """What a method sees of the run it is part of (the run's tasks, device, tokenizer, data, precision)
    and which of the run's (method, seed) pairs it is: one method, one seed, over the whole stream."""

    method: str
    seed: int
    tasks: list[str]
    device: torch.device
    tokenizer: Any = None
    # examples(task) -> a fresh list of the tokenized training examples (clbench.data.examples.Example) of
    # any task with training data, also one outside the stream (general data for replay); a method
    # that uses a task outside the stream returns it from needs_tasks(), checked before the run.
    examples: Callable[[str], list] | None = None
    # pairs(task) -> the (context, target) strings those examples were tokenized from, rendered as
    # lm-eval renders the task's evaluation requests; tokenize(pairs) -> Examples at the run's length
    pairs: Callable[[str], list] | None = None
    tokenize: Callable[[list], list] | None = None
    # task(name) -> the lm-eval Task object that renders and scores a task of the run (read only):
    # its output type, choices, generation settings and answer filters (clbench.method.generation.TaskView)
    task: Callable[[str], Any] | None = None
    # the loop's autocast for this run (a context manager factory): a method that runs its own
    # forward outside the loop's (A-GEM's reference gradient, a teacher) uses the same precision
    autocast: Callable[[], Any] | None = None
    # whether the loop shards (distributed.strategy fsdp) the model setup returns: a method that
    # keeps a second model of its own (a teacher) shards it too (clbench.distributed.fsdp.shard)
    sharded: bool = False


class _Clock:
    """The loop's position inside a stage; the loop moves it, a method only reads it."""

    __slots__ = ("step", "lr")

    def __init__(self):
        self.step, self.lr = 0, None


class Stage:
    """The read-only view a method has of one stage.

    stage, task, seed, run, train_config, generator (the stage's seeded generator),
    examples (the stage's training examples, a tuple), total_steps (optimizer steps),
    global_step (the current step, from 0), lr (the learning rate of the step being taken),
    lr_at(step), calibrate(model, steps=None, lr=None, weight_decay=None) (the loop's own
    training loop run densely on this stage's data: LoTA calibration, KS-Lottery's embedding
    pass; None keeps the stage's setting), autocast() (the loop's autocast context)."""

    __slots__ = ("_stage", "_task", "_seed", "_run", "_cfg", "_gen", "_examples", "_total", "_calibrate", "_clock")

    def __init__(self, *, stage: int, task: str, seed: int, run: RunContext, train_config, generator: torch.Generator,
                 examples=(), total_steps: int = 0, calibrate: Callable[..., dict] | None = None, clock: _Clock | None = None):
        self._stage, self._task, self._seed, self._run = stage, task, seed, run
        self._cfg, self._gen, self._examples, self._total = train_config, generator, tuple(examples), int(total_steps)
        self._calibrate, self._clock = calibrate, clock or _Clock()

    def replace(self, **kw) -> "Stage":
        """A copy with some fields changed (the loop's use: the final examples and step count)."""
        cur = dict(stage=self._stage, task=self._task, seed=self._seed, run=self._run, train_config=self._cfg,
                   generator=self._gen, examples=self._examples, total_steps=self._total, calibrate=self._calibrate,
                   clock=self._clock)
        cur.update(kw)
        return Stage(**cur)

    stage = property(lambda self: self._stage)
    task = property(lambda self: self._task)
    seed = property(lambda self: self._seed)
    run = property(lambda self: self._run)
    train_config = property(lambda self: self._cfg)
    generator = property(lambda self: self._gen)
    examples = property(lambda self: self._examples)
    total_steps = property(lambda self: self._total)
    global_step = property(lambda self: self._clock.step)

    @property
    def lr(self) -> float:
        """The learning rate of the optimizer step being taken (the schedule's value at global_step)."""
        return self._clock.lr if self._clock.lr is not None else self.lr_at(self._clock.step)

    def lr_at(self, step: int) -> float:
        return self._cfg.lr * lr_factor(self._cfg, self._total, step)

    def calibrate(self, model, steps=None, lr=None, weight_decay=None, desc: str = "calibrate") -> dict:
        if self._calibrate is None:
            raise MethodError(f"stage {self._stage}: calibrate() is only available while the loop runs the stage")
        return self._calibrate(model, steps=steps, lr=lr, weight_decay=weight_decay, desc=desc)

    def autocast(self):
        import contextlib

        return self._run.autocast() if self._run is not None and self._run.autocast is not None else contextlib.nullcontext()

    def __setattr__(self, name, value):
        if name in Stage.__slots__ and not hasattr(self, name):  # the constructor's first assignment
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"Stage is read-only: a method keeps its own state on itself, not on the stage ({name!r})")

    def __repr__(self):
        return f"Stage({self._stage}, {self._task!r}, seed={self._seed}, steps={self._total})"


class Method:
    """Base class of every method. Override the hooks you need; see the module docstring."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel):
        self.options = options

    def needs_tasks(self) -> list[str]:
        return []

    def setup(self, model: torch.nn.Module, run: RunContext) -> torch.nn.Module:
        return model

    def stage_examples(self, model, stage: Stage):
        return None

    def stage_start(self, model, stage: Stage):
        return model

    def param_groups(self, model, stage: Stage):
        return None

    def batch(self, examples: list, stage: Stage):
        return None

    def extra_loss(self, model, batch: dict, stage: Stage, out):
        return None

    def after_backward(self, model, stage: Stage) -> None:
        return None

    def after_step(self, model, stage: Stage) -> None:
        return None

    def stage_end(self, model, stage: Stage):
        return model

    def stage_stats(self, stage: Stage):
        return None

    def trainable_params(self, model):
        return None

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        return None

    def stream_refusal(self, output_types: dict) -> str | None:
        return None

    def fsdp_refusal(self) -> str | None:
        return "not verified under fsdp (sharded parameters)"

    def world_size_dependent(self) -> str | None:
        return None

    def optimizer_name(self) -> str | None:
        return None

    def step_resume_refusal(self) -> str | None:
        return "not verified: its state inside a stage is not in the step checkpoint"


HOOKS = tuple(n for n, v in vars(Method).items() if callable(v) and not n.startswith("_") and not isinstance(v, type))
_HOOK_PREFIXES = ("after_", "before_", "on_")  # the shape of a hook name: never a helper's


def check_protocol(cls, where) -> None:
    """A method class must subclass Method, define hooks only under their names and with the
    base class's parameters, and have a pydantic Options."""
    name = getattr(cls, "name", cls.__name__)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodError(f"method {name!r} in {where} must subclass clbench.method.Method "
                          f"(class {cls.__name__}(Method): ...)")
    problems = []
    for klass in cls.__mro__:
        if klass in (Method, object):
            break
        for attr, value in vars(klass).items():
            if attr.startswith("_") or not callable(value) or attr in HOOKS or isinstance(value, type):
                continue
            close = difflib.get_close_matches(attr, HOOKS, n=1, cutoff=0.9)
            if close or attr.startswith(_HOOK_PREFIXES):
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{attr!r} is not a hook{hint}; hooks are: {', '.join(HOOKS)} "
                                "(a helper with a hook-like name needs a leading underscore)")
    for h in HOOKS:
        mine, base = inspect.getattr_static(cls, h), vars(Method)[h]
        if mine is base:
            continue
        if not callable(mine):
            problems.append(f"{h} is not callable")
            continue
        try:
            want = len(inspect.signature(base).parameters)
            got = inspect.signature(mine).parameters.values()
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_POSITIONAL for p in got):
            continue
        required = sum(1 for p in got if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        total = sum(1 for p in got if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not (required <= want <= total):
            params = ", ".join(inspect.signature(base).parameters)
            problems.append(f"{h} takes ({', '.join(p.name for p in got)}), the loop calls it as {h}({params})")
    opts = getattr(cls, "Options", None)
    if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
        problems.append("Options is not a pydantic BaseModel class")
    if problems:
        raise MethodError(f"method {name!r} in {where} does not implement the protocol: " + "; ".join(problems))


# --- calling hooks ----------------------------------------------------------------------

def _is_model(v) -> bool:
    return isinstance(v, torch.nn.Module)


def _is_examples(v) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and all(hasattr(e, "input_ids") and hasattr(e, "n_prompt") for e in v))


# What each hook must return (None = anything: the hook's value is not used).
_RETURNS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "setup": (_is_model, "the model to train (a torch.nn.Module)"),
    "stage_start": (_is_model, "the model to train (a torch.nn.Module)"),
    "stage_end": (_is_model, "the model to evaluate (a torch.nn.Module)"),
    "stage_examples": (_is_examples, "None or a list of clbench.data.examples.Example"),
    "batch": (_is_examples, "None or a list of clbench.data.examples.Example"),
    "param_groups": (lambda v: v is None or (isinstance(v, list) and all(isinstance(g, dict) and "params" in g for g in v)),
                     "None or a list of optimizer parameter groups (dicts with 'params')"),
    "extra_loss": (lambda v: v is None or (isinstance(v, torch.Tensor) and v.numel() == 1), "None or a scalar tensor"),
    "trainable_params": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                         "None or a non-negative int"),
    "needs_tasks": (lambda v: isinstance(v, (list, tuple)), "a list of task names"),
    "stage_stats": (lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool) for k, x in v.items())),
                    "None or a dict of names to numbers"),
    "fsdp_refusal": (lambda v: v is None or isinstance(v, str), "None or a reason (str)"),
    "stream_refusal": (lambda v: v is None or isinstance(v, str), "None or a reason (str)"),
    "world_size_dependent": (lambda v: v is None or isinstance(v, str), "None or a reason (str)"),
    "step_resume_refusal": (lambda v: v is None or isinstance(v, str), "None or a reason (str)"),
    "optimizer_name": (lambda v: v in (None, "adamw", "sgd", "rmsprop"), "None, 'adamw', 'sgd' or 'rmsprop'"),
}


def call_hook(method, hook: str, *args):
    """Run one hook; an exception or a wrong return type becomes an error naming the method and
    the hook (the original exception stays attached for --debug)."""
    fn = getattr(method, hook)
    name = getattr(method, "name", type(method).__name__)
    try:
        value = fn(*args)
    except ClbenchError:
        raise
    except Exception as e:
        raise MethodError(f"method {name!r}, hook {hook}: {type(e).__name__}: {e}") from e
    check = _RETURNS.get(hook)
    if check is not None and not check[0](value):
        raise MethodError(f"method {name!r}, hook {hook} returned {type(value).__name__}; expected {check[1]}")
    return value


call = call_hook  # the name method files and plugins written before call_hook may use


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


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of the model in eval mode: a teacher or reference that later training
    cannot move (LwF's previous-stage model, a generator of synthetic data). It is rebuilt from
    the weights at each stage start, so it is never part of a checkpoint."""
    import copy

    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


class StageMeans:
    """A method's per-stage diagnostics, for its `stage_stats` hook: `add(name, value)` once per
    micro-batch or step (a number, or a tensor kept on its device: no host sync in the training
    loop), `means()` the mean of each name over what was added since `reset()` (None when
    nothing was). A method resets it in stage_start and returns means() from stage_stats.
    `share(term, loss)` is the detached ratio term / loss the regularisers report."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sum: dict[str, Any] = {}
        self._n: dict[str, int] = {}

    def add(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(())
        self._sum[name] = self._sum[name] + value if name in self._sum else value
        self._n[name] = self._n.get(name, 0) + 1

    @staticmethod
    def share(term: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return term.detach().float() / loss.detach().float().abs().clamp_min(1e-12)

    def means(self) -> dict[str, float] | None:
        if not self._n:
            return None
        return {k: float(self._sum[k]) / self._n[k] for k in self._sum}
