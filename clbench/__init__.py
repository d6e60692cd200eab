"""clbench: continual learning for language models, every stage evaluated through lm-eval.

The package, by wing (each subpackage's docstring lists its modules):
    method/       what a method author imports: the protocol, the registry, masking, adapters, ...
    training/     the one training loop
    data/         tasks, their data and lm-eval task building
    distributed/  several processes: collectives, FSDP2
    run/          `clbench run`: plan, loop, evaluation, checkpoints
    results/      the run directory and what it holds; metrics and statistics
    report/       `clbench report`
    experiments/  `clbench sweep` and `clbench tune`
    cli, config, errors, paths, files, interrupt, runtime, checkpoint, schedule: used by all of them

Modules that method files import kept their earlier flat names too (`clbench.masking` is
`clbench.method.masking`, the same module object), so method files and plugins written against
them keep working.
"""
import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "masking": "clbench.method.masking", "adapters": "clbench.method.adapters", "wrapping": "clbench.method.wrapping",
    "generation": "clbench.method.generation", "prompting": "clbench.method.prompting",
    "merging": "clbench.method.merging", "train": "clbench.training.train", "stage": "clbench.training.stage",
    "examples": "clbench.data.examples", "packing": "clbench.data.packing", "tasks": "clbench.data.tasks",
    "fsdp": "clbench.distributed.fsdp",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import clbench.<old name>` gives the module at its new place (not a copy). Hand-written: a
    meta-path alias is a few lines of importlib and no library keeps module aliases."""

    def find_spec(self, name, path=None, target=None):
        old = name.partition("clbench.")[2] if name.startswith("clbench.") else None
        return importlib.util.spec_from_loader(name, self) if old in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name.partition("clbench.")[2]])

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
