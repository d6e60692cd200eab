"""What a user sees of clbench's files: modes follow the umask, no git noise outside a repository."""

import os
import stat
import subprocess
import sys
import textwrap

from conftest import REPO


def test_written_files_follow_the_umask(tmp_path):
    # a fresh interpreter with umask 027: clbench reads the umask once, at import
    code = textwrap.dedent(f"""
        import os
        os.umask(0o027)
        from pathlib import Path
        from clbench.files import atomic_write
        atomic_write(Path({str(tmp_path / 'a.txt')!r}), "x")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o640
    code = code.replace("0o027", "0o002").replace("a.txt", "b.txt")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o664


def test_a_run_outside_a_git_repository_prints_no_git_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: tiny
        tasks: [tiny_parity]
        task_dirs: [{REPO / 'configs' / 'tiny_tasks'}]
        methods: [{{name: full_ft}}]
        train: {{steps: 2, max_length: 48}}
        eval: {{limit: 4}}
        precision: fp32
        threads: 1
    """))
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    r = subprocess.run([sys.executable, "-m", "clbench", "run", str(cfg), "--output-dir", str(tmp_path / "out")],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "not a git repository" not in r.stderr and "fatal" not in r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "matrix.csv").st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m
