"""Writes that fail for real: a full disk (a small tmpfs) while writing samples, results,
checkpoints and a report, and an output or report directory that is read-only or a file. Each stops the run with one
line naming the file and the cause, keeps what was computed, and a re-run with space finishes
with the uninterrupted run's matrix. Mounting needs root (CI runs as root); without it these
tests are skipped, saying so."""

import errno
import os
import subprocess

import pytest

from conftest import REPO

TINY_TASKS = REPO / "configs" / "tiny_tasks"

SMALL = f"""
model: tiny
tasks: [tiny_parity, tiny_compare]
task_dirs: [{TINY_TASKS}]
methods: [{{name: full_ft}}]
train: {{steps: 2, max_length: 64}}
eval: {{limit: 4}}
precision: fp32
"""


def _mount(where, *opts):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): these tests need root")


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs; fill(pages) then leaves exactly that many 4 KiB pages free."""
    where = tmp_path / "fs"
    _mount(where, "size=2m")

    def fill(pages):
        filler = where / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        os.truncate(filler, max(0, filler.stat().st_size - pages * 4096))
        return filler

    yield where, fill
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from clbench.cli import main

    d = tmp_path_factory.mktemp("small")
    (d / "c.yaml").write_text(SMALL)
    assert main(["run", str(d / "c.yaml"), "--output-dir", str(d / "out"), "--set", "eval.log_samples=false"]) == 0
    return d / "out"


def _config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SMALL)
    return cfg


@pytest.mark.parametrize("what, free_pages, settings, needle", [
    # the lock and config.yaml fit; the base model's first samples file does not
    ("samples", 2, ["keep_checkpoints=none"], r"writing {out}/samples/base/stage0/tiny_\w+\.jsonl failed: no space left on device"),
    # the lock and config.yaml fit; the first results file after stage 1 does not
    ("results", 2, ["keep_checkpoints=none", "eval.log_samples=false"], r"writing {out}/\w+\.(csv|json) failed: no space left on device"),
    # the results files fit; the tiny model's stage checkpoint (~0.4 MB) does not
    ("checkpoint", 12, ["checkpoint_interval=0", "eval.log_samples=false"],
     r"writing the checkpoint {out}/checkpoints/full_ft/seed0/stage1\.pt failed: .*No space left on device"),
])
def test_full_disk_names_the_file_and_a_rerun_finishes(tmpfs, tmp_path, run_cli, uninterrupted, what, free_pages,
                                                       settings, needle):
    import re

    where, fill = tmpfs
    out = where / "out"
    sets = [a for s in settings for a in ("--set", s)]
    filler = fill(free_pages)
    code, _, err = run_cli("run", _config(tmp_path), "--output-dir", out, *sets)
    last = err.strip().splitlines()[-1]  # after the run's progress lines
    assert code == 2 and last.startswith("clbench: error: ") and "Traceback" not in err, err
    assert re.search(needle.format(out=re.escape(str(out))), last), err
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temp file left behind
    if what == "checkpoint":  # a stage is recorded only once its checkpoint is complete
        assert not (out / "results.json").exists() and not (out / "checkpoints/full_ft/seed0/stage1.pt").exists()
    filler.unlink()
    code, _, err = run_cli("run", _config(tmp_path), "--output-dir", out, *sets)
    assert code == 0, err
    assert (out / "matrix.csv").read_text() == (uninterrupted / "matrix.csv").read_text()


def test_read_only_output_directory(tmp_path, run_cli):
    ro = tmp_path / "ro"
    _mount(ro, "size=1m")
    try:
        (ro / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        for out, needle in ((ro / "new", f"cannot create the output directory {ro / 'new'}: Read-only file system"),
                            (ro / "existing", f"cannot write in the output directory {ro / 'existing'}: Read-only file system")):
            code, _, err = run_cli("run", _config(tmp_path), "--output-dir", out)
            assert code == 2 and "Traceback" not in err and needle in err, err
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_output_directory_that_is_a_file(tmp_path, run_cli):
    f = tmp_path / "out"
    f.write_text("a file\n")
    code, _, err = run_cli("run", _config(tmp_path), "--output-dir", f)
    assert code == 2 and "Traceback" not in err and f"output directory {f} is not a directory" in err, err
    assert f.read_text() == "a file\n"
    code, _, err = run_cli("run", _config(tmp_path), "--output-dir", f / "sub")
    assert code == 2 and f"output directory {f / 'sub'} is not a directory" in err, err


def test_report_into_a_read_only_or_full_folder(tmpfs, tmp_path, run_cli, uninterrupted):
    where, fill = tmpfs
    code, _, err = run_cli("report", uninterrupted, "--out", where / "report")
    assert code == 0, err  # the folder works while there is space
    fill(0)
    code, _, err = run_cli("report", uninterrupted, "--out", where / "report2")
    assert code == 2 and "Traceback" not in err, err
    assert f"clbench: error: writing the report into {where / 'report2'} failed: No space left on device" in err, err
    ro = tmp_path / "ro"
    _mount(ro, "size=1m", "ro")
    try:
        code, _, err = run_cli("report", uninterrupted, "--out", ro / "report")
        assert code == 2 and "Traceback" not in err, err
        assert f"clbench: error: cannot write the report into {ro / 'report'}: Read-only file system" in err, err
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
