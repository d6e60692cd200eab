"""clbench installed like any tool: the wheel carries the built-in methods, tasks and configs, and a
method and a task folder published as their own distribution work after `pip install` through the
`clbench.methods` / `clbench.tasks` entry points, with no `method_files:` or `task_dirs:` line.

One fresh venv, one build of each wheel (setuptools from this venv, --no-build-isolation: no
download), a `clbench list methods` and a tiny two-stage run from a folder outside the repository.
A broken plugin is checked in process against a real dist-info folder on sys.path."""

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_extensions import USER_METHOD  # the norms-only method, published here as a plugin

pytestmark = pytest.mark.packaging

PLUGIN_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "clbench-normsonly"
version = "0.3"

[project.entry-points."clbench.methods"]
norms_only = "clbench_normsonly.method"

[project.entry-points."clbench.tasks"]
normsonly = "clbench_normsonly.tasks"

[tool.setuptools]
packages = ["clbench_normsonly", "clbench_normsonly.tasks"]

[tool.setuptools.package-data]
"clbench_normsonly.tasks" = ["*.yaml", "*.jsonl"]
'''


def _sh(*cmd, cwd=None, env=None):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _wheel(src: Path, out: Path) -> Path:
    _sh(sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-index",
        "--no-build-isolation", "-w", out, src)
    return out


def _plugin_source(root: Path) -> Path:
    """A plugin distribution: one method module and one task folder (the tiny parity task under a
    new name, its data copied from configs/tiny_tasks)."""
    pkg = root / "clbench_normsonly"
    (pkg / "tasks").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "method.py").write_text(USER_METHOD)
    (pkg / "tasks" / "__init__.py").write_text("")
    tiny = REPO / "configs" / "tiny_tasks"
    task = yaml.safe_load((tiny / "tiny_parity.yaml").read_text())
    task["task"] = "plugin_parity"
    (pkg / "tasks" / "plugin_parity.yaml").write_text(yaml.safe_dump(task))
    for split in ("train", "test"):
        shutil.copy(tiny / f"tiny_parity.{split}.jsonl", pkg / "tasks")
    (pkg / "tasks" / "streams.yaml").write_text("plugin1:\n  orders:\n    '1': [plugin_parity]\n")
    return root


def _shipped(folder: str) -> set[str]:
    """The repository's files under methods/, tasks/ or configs/ a wheel must carry."""
    base = REPO / folder
    return {f"clbench_builtin/{folder}/{p.relative_to(base).as_posix()}" for p in base.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_wheel_with_a_plugin_installs_lists_and_runs(tmp_path):
    src = tmp_path / "src"  # the wheel's inputs only: a build in the checkout would reuse build/lib
    for name in ("clbench", "methods", "tasks", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = _wheel(src, tmp_path / "wheels")
    _wheel(_plugin_source(tmp_path / "plugin"), wheels)
    (main,) = wheels.glob("clbench-*.whl")
    (plugin,) = wheels.glob("clbench_normsonly-*.whl")
    names = set(zipfile.ZipFile(main).namelist())
    for folder in ("methods", "tasks", "configs"):
        missing = _shipped(folder) - names
        assert not missing, f"the wheel lacks {sorted(missing)[:5]} (pyproject.toml [tool.setuptools])"

    # A fresh venv: this interpreter's packages (torch, transformers, ...) through a .pth line
    # (a venv made from a venv sees the base interpreter's site-packages, not this one's); a .pth
    # line adds the folder without running its .pth files, so the checkout's editable install
    # stays out and clbench comes from the wheel alone.
    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv)
    py = venv / "bin" / "python"
    site = Path(_sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "zz_clbench_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--disable-pip-version-check", "--no-deps",
        "--no-index", main, plugin)

    work = tmp_path / "elsewhere"  # outside the repository: nothing found next to the cwd
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    where = _sh(py, "-c", "import clbench, clbench.paths as p; print(clbench.__file__); print(p.BUILTIN_METHODS_DIR)",
                cwd=work, env=env).split()
    assert all(Path(w).is_relative_to(site) for w in where), where
    clbench = venv / "bin" / "clbench"
    listed = {line.split()[0]: line for line in _sh(clbench, "list", "methods", cwd=work, env=env).splitlines()}
    assert {"full_ft", "lora", "lota", "ewc"} <= set(listed) and listed["full_ft"].endswith("[built-in]")
    assert "plugin entry point norms_only = clbench_normsonly.method" in listed["norms_only"]
    assert "distribution clbench-normsonly 0.3" in listed["norms_only"]

    cfg = {"name": "wheel", "model": "tiny", "tasks": ["plugin_parity", "tiny_compare"],
           "task_dirs": [str(site / "clbench_builtin" / "configs" / "tiny_tasks")],
           "methods": [{"name": "full_ft"}, {"name": "norms_only"}], "seeds": [0], "threads": 1,
           "train": {"steps": 3, "lr": 3e-3, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 8, "batch_size": 16, "log_samples": False}, "precision": "fp32"}
    (work / "wheel.yaml").write_text(yaml.safe_dump(cfg))
    _sh(clbench, "run", "wheel.yaml", "--output-dir", "out", cwd=work, env=env)
    with open(work / "out" / "matrix.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for m in ("full_ft", "norms_only"):
        assert {(r["stage"], r["eval_task"]) for r in rows if r["method"] == m} >= {
            (s, t) for s in ("1", "2") for t in ("plugin_parity", "tiny_compare")}, m


# --- broken plugins, in process: a real dist-info folder on sys.path ----------------------------------


def _dist(root: Path, name: str, group: str, entry: str) -> None:
    info = root / f"{name.replace('-', '_')}-1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")


@pytest.mark.parametrize("group, entry, msg", [
    ("clbench.methods", "broken = no_such_module_xyz", "failed to load: ModuleNotFoundError"),
    ("clbench.methods", "wrong = textwrap", "registered no method"),
    ("clbench.tasks", "wrong = no_such_module_xyz:FOLDER", "failed to load: ModuleNotFoundError"),
    ("clbench.tasks", "wrong = textwrap", "must name a package or a folder"),
])
def test_a_broken_plugin_is_named_with_its_distribution(tmp_path, monkeypatch, group, entry, msg):
    from clbench.method import available, load_builtin_methods
    from clbench.method import registry
    from clbench import paths
    from clbench.data import tasks
    from clbench.errors import ClbenchError

    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    _dist(tmp_path, "bad-plugin", group, entry)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._PLUGINS, "done", False)  # plugins are looked up once per process
    with pytest.raises(ClbenchError) as e:
        available() if group == "clbench.methods" else tasks.load_tasks()
    name, value = (s.strip() for s in entry.split("="))
    assert f"entry point {name} = {value} (group {group}, distribution bad-plugin 1.2)" in str(e.value)
    assert msg in str(e.value)
    monkeypatch.undo()
    assert "full_ft" in available() and "trec" in tasks.load_tasks()  # nothing left behind
