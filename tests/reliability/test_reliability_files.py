"""Reliability: clbench deletes only its own temp files, only in the run directory whose lock it
holds, and never touches a directory it did not write."""

import os
import subprocess
import sys
from pathlib import Path

from clbench import files


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp_name(pid: int, name: str) -> str:
    return f"{files.TEMP_PREFIX}{pid}-abcd1234-{name}"


def test_temp_files_carry_clbench_prefix_and_pid(tmp_path):
    tmp = Path(files.temp_file(tmp_path / "matrix.csv"))
    assert tmp.parent == tmp_path and tmp.name.startswith(f".clbench-tmp-{os.getpid()}-")
    assert tmp.name.endswith("-matrix.csv") and files._UNFINISHED.fullmatch(tmp.name)


def test_cleanup_touches_only_its_own_dead_temp_files_in_its_own_run_directory(tmp_path):
    """`clbench run --output-dir proj` over a folder holding a user's dotfiles and another run
    directory: only proj's own unfinished writes (temp_file names of a dead writer, in proj and
    its samples/ and checkpoints/) go."""
    run = tmp_path / "proj"
    dead = _dead_pid()
    keep = [run / ".env.20240101", run / ".matrix.csv.abcd1234",  # a user's file; the old naming
            run / "notes" / _temp_name(dead, "x.txt"),  # a user's folder: never looked into
            run / "other_run" / _temp_name(dead, "matrix.csv"),  # another run directory
            run / "checkpoints" / "nested_run" / _temp_name(dead, "stage1.pt"),  # a run dir nested (has .lock)
            run / "checkpoints" / "m" / _temp_name(os.getppid(), "stage2.pt")]  # a live writer
    gone = [run / _temp_name(dead, "matrix.csv"),
            run / "samples" / "base" / "stage0" / _temp_name(dead, "t.jsonl"),
            run / "checkpoints" / "m" / "seed0" / _temp_name(dead, "stage1.pt")]
    for f in keep + gone:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    (run / "other_run" / ".lock").write_text("1")
    (run / "checkpoints" / "nested_run" / ".lock").write_text("1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / _temp_name(dead, "y.csv")).write_text("x")
    (run / "samples" / "link").symlink_to(outside)  # never followed
    removed = files.remove_unfinished_writes(run)
    assert sorted(removed) == sorted(gone)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in gone)
    assert (outside / _temp_name(dead, "y.csv")).exists()


def test_fresh_and_run_never_touch_a_folder_clbench_did_not_write(tmp_path, run_cli):
    """--output-dir naming a user's folder that holds a file with a results name (config.yaml)
    and a samples/ folder: refused before anything is written or deleted, --fresh included."""
    from conftest import TINY_CONFIG

    out = tmp_path / "mine"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "keep.txt").write_text("mine")
    (out / "config.yaml").write_text("my: own\n")
    for extra in ([], ["--fresh"]):
        code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out, *extra)
        assert code == 2 and "clbench did not write" in err and str(out / "config.yaml") in err, err
        assert (out / "samples" / "keep.txt").read_text() == "mine" and (out / "config.yaml").read_text() == "my: own\n"
        assert not (out / "results.json").exists()


def test_a_lock_file_clbench_did_not_write_is_left_alone(tmp_path, run_cli):
    """clbench's lock is `<dir>/.lock` holding a pid, deleted when the run ends: a user's `.lock`
    (another tool's) in the output directory is refused, not overwritten and deleted."""
    from conftest import TINY_CONFIG

    out = tmp_path / "mine"
    out.mkdir()
    (out / ".lock").write_text("held by my editor\n")
    code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", out)
    assert code == 2 and f"holds {out / '.lock'}, which clbench did not write" in err, err
    assert (out / ".lock").read_text() == "held by my editor\n" and sorted(p.name for p in out.iterdir()) == [".lock"]
