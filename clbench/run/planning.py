"""Planning a run: everything cheap is validated and resolved before anything expensive starts
(config, methods and their options, tasks, data files), so a typo fails in a second, not after
an hour of training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clbench.method import call_hook, load_builtin_methods, load_method_file, make_method
from clbench import paths
from clbench.config import RunConfig
from clbench.data import datacheck
from clbench.data.tasks import TaskDef, hub_task, load_streams, load_tasks, resolve_stream, twin_name
from clbench.data.presets import config_data_root
from clbench.distributed import fsdp
from clbench.errors import ConfigError
from clbench.run import models


@dataclass
class Plan:
    """Everything validated and resolved before the first expensive step."""

    cfg: RunConfig
    config_dir: Path
    cache: Path
    task_names: list[str]
    task_defs: dict[str, TaskDef]
    method_specs: list = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    # eval.other_kind: each stream task's twin of the other kind, in stream order (empty when off)
    other_kind: list[str] = field(default_factory=list)

    @property
    def eval_names(self) -> list[str]:
        return self.task_names + self.heldout + self.other_kind

    def same_task(self, name: str) -> str:
        """The stream task a name scores: itself, or the stream task whose other-kind twin it is."""
        return self.task_names[self.other_kind.index(name)] if name in self.other_kind else name


def plan(cfg: RunConfig, config_dir: Path) -> Plan:
    cache = paths.cache_dir(cfg.cache_dir)
    paths.set_offline_env(cache, cfg.offline)
    models.check(cfg.model, cache, cfg.offline)
    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    for f in cfg.method_files:
        load_method_file((config_dir / f).resolve())
    made = [make_method(spec.name, spec.options, where=f"methods.{i}") for i, spec in enumerate(cfg.methods)]  # validates
    check_fsdp(cfg, made)

    root = config_data_root(cfg, config_dir)  # where a preset's release is read from
    dirs = [(config_dir / d).resolve() for d in cfg.task_dirs]
    task_defs = load_tasks(dirs)
    for i, meth in enumerate(made):  # tasks a method reads besides the stream (e.g. replay's general data)
        for n in meth.needs_tasks():
            if n not in task_defs:
                raise ConfigError(f"methods.{i} ({cfg.methods[i].name}) needs task {n!r}, which does not exist; "
                                  f"available: {', '.join(sorted(task_defs))}")
            task_defs[n].check_data(cache, data_root=root)
    streams = load_streams(dirs, task_defs)
    names = resolve_stream(cfg, task_defs, streams)
    for i, meth in enumerate(made):  # a method that cannot act on this stream says why (Method.stream_refusal)
        why = call_hook(meth, "stream_refusal", {n: task_defs[n].lm_eval.get("output_type", "generate_until") for n in names})
        if why:
            raise ConfigError(f"methods.{i} ({cfg.methods[i].name}): {why}")
    for n in names:
        if task_defs[n].lm_eval.get("output_type") == "loglikelihood_rolling" and not task_defs[n].text:
            raise ConfigError(f"task {n!r} ({task_defs[n].path}) is a perplexity probe (loglikelihood_rolling): "
                              "it can only be held out (`heldout:`), not trained in the stream (a raw-text "
                              "training task says `clbench: {kind: text}`)")
        task_defs[n].check_data(cache, data_root=root, stream=None if cfg.tasks else cfg.stream)
    heldout = expand_heldout(cfg.heldout, task_defs)
    unknown = [n for n in heldout if n not in task_defs]
    if unknown and cfg.offline:
        raise ConfigError(f"unknown held-out task(s) {', '.join(map(repr, unknown))}; available: "
                          f"{', '.join(sorted(task_defs))}, or `general` (every built-in held-out task). lm-eval's "
                          "standard tasks (arc_easy, hellaswag, ...) load from the hub: set `offline: false`")
    for n in unknown:  # offline: false: lm-eval's own task of that name, data from the hub
        task_defs[n] = hub_task(n)
    both = sorted(set(heldout) & set(names))
    if both:
        raise ConfigError(f"task(s) {', '.join(both)} are both in the stream and held out: a held-out task is never trained")
    for n in heldout:
        if not task_defs[n].hub:
            task_defs[n].check_data(cache, need_train=False, data_root=root)
    twins = other_kind_tasks(names, heldout, task_defs) if cfg.eval.other_kind else []
    for n in twins:
        task_defs[n].check_data(cache, need_train=False, data_root=root)
    return datacheck.check_plan(Plan(cfg, config_dir, cache, names, task_defs, list(cfg.methods), heldout, twins))


KINDS = {"generate_until": "generation", "multiple_choice": "log-likelihood"}


def other_kind_tasks(names: list[str], heldout: list[str], task_defs: dict) -> list[str]:
    """eval.other_kind: every stream task's twin of the other kind (generation <-> log-likelihood
    multiple choice), checked to exist, to be the other kind, and to be neither trained nor held out."""
    out = []
    for n in names:
        t = twin_name(n)
        kind = task_defs[n].lm_eval.get("output_type")
        if kind not in KINDS:
            raise ConfigError(f"eval.other_kind: task {n!r} is {kind}; only generation and multiple-choice tasks "
                              "have another kind")
        if t not in task_defs:
            raise ConfigError(f"eval.other_kind: task {n!r} has no task of the other kind (looked for {t!r}, "
                              f"the {KINDS[kind]} task's twin by name); drop eval.other_kind or add {t!r}")
        tk = task_defs[t].lm_eval.get("output_type")
        if tk == kind or tk not in KINDS:
            raise ConfigError(f"eval.other_kind: {t!r} ({task_defs[t].path}) is {tk}, not the other kind of "
                              f"{n!r} ({kind})")
        if t in names or t in heldout:
            raise ConfigError(f"eval.other_kind: {t!r}, the other kind of {n!r}, is itself "
                              f"{'in the stream' if t in names else 'held out'}: score it one way only")
        out.append(t)
    return out


def check_fsdp(cfg: RunConfig, made: list) -> None:
    """Under distributed.strategy fsdp every method must declare that it runs sharded."""
    if not fsdp.requested(cfg):
        return
    for i, meth in enumerate(made):
        reason = call_hook(meth, "fsdp_refusal")
        if reason:
            raise ConfigError(f"methods.{i} ({cfg.methods[i].name}) cannot run with distributed.strategy fsdp: {reason}")


GENERAL_SUITE = "general"


def expand_heldout(names: list[str], task_defs: dict) -> list[str]:
    """`general` stands for every built-in held-out task (tasks/ with clbench.heldout: true)."""
    out: list[str] = []
    for n in names:
        if n == GENERAL_SUITE:
            out += sorted(k for k, d in task_defs.items()
                          if d.heldout and d.path is not None and d.path.parent == paths.BUILTIN_TASKS_DIR)
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def tasks_to_prepare(cfg: RunConfig | None, tasks: dict, streams: dict, names: list[str] | None = None,
                     stream: str | None = None) -> list[str]:
    """The tasks `clbench data prepare` prepares: those named; else a stream's (the option's, or the
    config's); else the config's `tasks` (groups and tags expanded as a run expands them; registry
    tasks need no data); else every built-in stream's (presets, whose data is on the user's disk,
    only when named). A config adds its held-out probes and, with eval.other_kind, each task's
    other kind. Unknown names fail, naming the available ones."""
    if names:
        out = list(names)
    elif stream or (cfg and cfg.stream):
        sname = stream or cfg.stream
        if sname not in streams:
            raise ConfigError(f"unknown stream {sname!r}; available: {', '.join(sorted(streams))}")
        out = list(dict.fromkeys(n for order in streams[sname]["orders"].values() for n in order))
    elif cfg and cfg.tasks:
        out = [n for n in resolve_stream(cfg, tasks, streams) if not tasks[n].hub]
    else:
        out = list(dict.fromkeys(n for s in streams.values() if not s.get("preset") for o in s["orders"].values()
                                 for n in o))
    if cfg and cfg.heldout and not names:
        out = list(dict.fromkeys(out + [n for n in expand_heldout(cfg.heldout, tasks) if n in tasks]))
    if cfg and cfg.eval.other_kind and not names:
        out = list(dict.fromkeys(out + [twin_name(n) for n in out if twin_name(n) in tasks]))
    unknown = [n for n in out if n not in tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; available: {', '.join(sorted(tasks))}")
    return out
