"""docs/distributed.md's table of every built-in method under ddp and fsdp says what the code
declares (world_size_dependent, fsdp_refusal at the method's defaults), and each "same as 1
process" is backed by a test that runs the method at 2 processes against 1 (tests/distributed/test_distributed.py
runs configs/all-methods.yaml's methods and a few more under ddp; tests/distributed/test_fsdp.py and tests/distributed/test_fsdp_methods.py
run theirs sharded), or says that no test does."""

import re
import sys
from pathlib import Path

import test_distributed
import test_fsdp
import test_fsdp_methods
from clbench.method import call_hook, load_builtin_methods, make_method
from clbench import paths
from clbench.method import registry
from conftest import REPO

DOC = REPO / "docs" / "distributed.md"
SAME = "same as 1 process"
DEPENDENT = "depends on N as under ddp; equal to ddp at the same N"


def table() -> dict[str, tuple[str, str]]:
    text = DOC.read_text()
    body = text.split("## Methods under ddp and fsdp", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        m = re.fullmatch(r"\| `([a-z0-9_]+)` \| (.+?) \| (.+?) \|", line.strip())
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def builtin() -> set[str]:
    """The registered names of the methods in methods/ (other tests register their own)."""
    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    here = paths.BUILTIN_METHODS_DIR.resolve()
    files = {n: getattr(sys.modules.get(c.__module__), "__file__", None) for n, c in registry._REGISTRY.items()}
    return {n for n, f in files.items() if f and Path(f).resolve().parent == here}


def test_the_table_is_what_every_method_declares_and_what_the_tests_run():
    names = builtin()
    rows = table()
    assert set(rows) == names, set(rows) ^ names
    ddp_run = {m["name"] for m in test_distributed.METHODS}
    fsdp_run = {m["name"] for m in test_fsdp.METHODS} | {m["name"] for m in test_fsdp_methods.SHARDED}
    for name, (ddp, fsdp) in rows.items():
        meth = make_method(name, {})
        same_names = {n for n in names if registry._REGISTRY[n] is registry._REGISTRY[name]}  # an alias (bone: miss)
        why = call_hook(meth, "world_size_dependent")
        if why:
            assert ddp == f"depends on N: {why}", name
        else:
            assert ddp == SAME + ("" if same_names & ddp_run else " (not run at 2 processes by the tests)"), name
        refusal = call_hook(meth, "fsdp_refusal")
        if refusal:
            assert fsdp == f"refused: {refusal}", name
        elif why:  # sharded it splits the batch as replicated does: tested against ddp at the same N
            assert fsdp == DEPENDENT + ("" if same_names & fsdp_run else " (not run sharded by the tests)"), name
        else:
            assert fsdp == SAME + ("" if same_names & fsdp_run else " (not run sharded by the tests)"), name
