"""The package layout as rules the code must keep (clbench/__init__.py lists the wings):

- every module of clbench belongs to one layer, and no import goes from a lower layer to a higher
  one (at module level or inside a function), except the few listed in UPWARD with their reason;
- the module-level imports inside clbench form no circle;
- no module imports another module's private name (clbench, the built-in methods, the benchmark);
- method files written against the earlier flat module names (`clbench.masking`, `clbench.train`,
  ...) and the README's example keep working, and get the very same objects.

Read from the source with `ast`, so a new module or import is checked the day it is written.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "clbench"

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = [
    {"clbench", "errors", "paths", "files", "interrupt", "config", "schedule", "checkpoint"},
    {"data"},
    {"distributed"},
    {"runtime"},   # device, precision and memory per rank: above the collectives, below what trains
    {"method"},
    {"training"},
    {"results"},
    {"run"},
    {"report", "experiments"},
    {"cli", "__main__"},
]
# Upward imports kept, each inside the one function that needs it:
UPWARD = {
    # sharding a model finds its decoder layers and pins the head-only forward, which a method's
    # prompt context can change; the method kit in turn generates on sharded models (fsdp.unsharded)
    ("clbench.distributed.fsdp", "clbench.method.lm"): "the decoder/head split and the head-only forward",
    ("clbench.distributed.fsdp", "clbench.method.prompting"): "the prompt context of the pinning forward",
    ("clbench.distributed.fsdp", "clbench.method.merging"): "a sharded peft model's merged state",
}


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, f


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else parts[0]
    for i, group in enumerate(LAYERS):
        if key in group:
            return i
    raise AssertionError(f"{module} belongs to no layer of tests/reliability/test_layout.py: add its wing to LAYERS")


def _is_module(dotted: str) -> bool:
    """Whether clbench.x.y names a module or package (else it names something inside one)."""
    path = PKG.joinpath(*dotted.split(".")[1:])
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imports(tree: ast.Module, package: str):
    """(imported module, line, at module level) for every clbench import, TYPE_CHECKING blocks left out
    (they import nothing at run time)."""
    skip = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            skip.update(id(m) for m in ast.walk(n))
    top = {id(n) for n in tree.body}
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - n.level + 1] + ([base] if base else []))
            if base == "clbench" or base.startswith("clbench."):
                subs = [f"{base}.{a.name}" for a in n.names if _is_module(f"{base}.{a.name}")]
                for target in subs or [base]:
                    yield target, n, id(n) in top
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("clbench."):
                    yield a.name, n, id(n) in top


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, path in _modules():
        for target, node, _ in _imports(ast.parse(path.read_text()), _package(module, path)):
            if _layer(target) > _layer(module) and (module, target) not in UPWARD:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_the_listed_upward_imports_still_exist():
    """An exception that is no longer needed leaves UPWARD, so the list stays the truth."""
    seen = set()
    for module, path in _modules():
        for target, _, _ in _imports(ast.parse(path.read_text()), _package(module, path)):
            seen.add((module, target))
    assert set(UPWARD) <= seen, set(UPWARD) - seen


def test_module_level_imports_form_no_circle():
    graph = {}
    for module, path in _modules():
        graph[module] = {t for t, _, top in _imports(ast.parse(path.read_text()), _package(module, path))
                         if top and t != module}
    # a submodule's import runs its package's __init__ first
    for module in list(graph):
        parent = module.rpartition(".")[0]
        if parent and parent in graph and parent != "clbench":
            graph[module].add(parent)
    state, path_ = {}, []

    def visit(m):
        state[m] = 1
        path_.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == 1 and not (t == m.rpartition(".")[0]):
                raise AssertionError("import circle: " + " -> ".join(path_[path_.index(t):] + [t]))
            if t not in state:
                visit(t)
        path_.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_name():
    wrong = []
    for folder in ("clbench", "methods", "bench"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("clbench")):
                    wrong += [f"{f.relative_to(REPO)}:{n.lineno} imports {a.name}" for a in n.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not wrong, "\n".join(wrong)



def test_no_clbench_module_is_imported_under_another_name():
    """`from clbench import method as M` dodged the local name `method`: the code imports the names it
    uses, or the module under its own name (`collectives.rank()`)."""
    wrong = []
    for folder in ("clbench", "methods", "bench"):
        for f in sorted((REPO / folder).rglob("*.py")):
            module = ".".join(f.relative_to(REPO).with_suffix("").parts)
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("clbench")):
                    base = n.module or ""
                    if n.level:
                        pkg = module.split(".")[: -n.level]
                        base = ".".join(pkg + ([base] if base else []))
                    wrong += [f"{f.relative_to(REPO)}:{n.lineno} imports {base}.{a.name} as {a.asname}" for a in n.names
                              if a.asname and a.asname != a.name and _is_module(f"{base}.{a.name}")]
                elif isinstance(n, ast.Import):
                    wrong += [f"{f.relative_to(REPO)}:{n.lineno} imports {a.name} as {a.asname}" for a in n.names
                              if a.name.startswith("clbench") and a.asname]
    assert not wrong, "\n".join(wrong)

OLD_PATHS = '''
import clbench.masking, clbench.train, clbench.stage, clbench.examples, clbench.fsdp
from clbench import adapters, distributed as D, generation as G, masking, prompting, wrapping as W
from clbench.masking import MaskedUpdate
from clbench.train import IGNORE, Example, _split_head, collate, lm_loss, split_head, target_logits
from clbench.tasks import load_tasks
import clbench.method.masking, clbench.method.lm, clbench.data.examples, clbench.distributed.collectives
new = clbench.method
assert clbench.masking is new.masking and masking is new.masking, "clbench.masking"
assert MaskedUpdate is new.masking.MaskedUpdate
assert clbench.train is clbench.training.train and clbench.stage is clbench.training.stage
assert lm_loss is new.lm.lm_loss and target_logits is new.lm.target_logits
assert split_head is new.lm.split_head and _split_head is split_head
assert Example is clbench.data.examples.Example and collate is clbench.data.examples.collate
assert clbench.fsdp is clbench.distributed.fsdp and G is new.generation and W is new.wrapping
assert adapters is new.adapters and prompting is new.prompting and load_tasks is clbench.data.tasks.load_tasks
assert D.rank is clbench.distributed.collectives.rank and D.world_size() == 1
names = new.load_method_file(__import__("pathlib").Path(__import__("sys").argv[1]))
assert names == ["norms_only"], names
print("ok")
'''


def test_method_files_written_against_the_flat_names_keep_working(tmp_path):
    """A fresh interpreter (the registry is process-global): the earlier module names give the
    modules at their new places, and the README's example method file loads."""
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(# my_methods/norms_only.py.*?)```", readme, re.S)
    assert example, "README.md: the example method file (```python # my_methods/norms_only.py) is gone"
    (tmp_path / "norms_only.py").write_text(example.group(1))
    r = subprocess.run([sys.executable, "-c", OLD_PATHS, str(tmp_path / "norms_only.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_every_test_folder_is_on_the_test_path():
    """Tests import helpers from other wings' test modules; pytest puts a folder on sys.path only when
    it collects a test there, so without pyproject's `pythonpath` such an import would depend on
    which folder was collected first."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["pythonpath"])
    folders = {str(d.relative_to(REPO)) for d in (REPO / "tests").iterdir() if d.is_dir() and any(d.glob("test_*.py"))}
    assert folders <= listed, sorted(folders - listed)
