"""Reliability: config values and environment variables are checked when a command starts: one
line naming the value, exit 2, before any model is loaded or anything is written."""

import pytest

from conftest import REPO

TINY_TASKS = REPO / "configs" / "tiny_tasks"
GOOD = f"""
model: tiny
tasks: [tiny_parity]
task_dirs: [{TINY_TASKS}]
methods: [{{name: full_ft}}]
train: {{steps: 2}}
eval: {{limit: 4}}
precision: fp32
"""


@pytest.mark.parametrize("extra, expect", [
    ("seeds: [-1]", "seeds.0: Input should be greater than or equal to 0"),
    ("seeds: [4294967296]", "seeds.0: Input should be less than or equal to 4294967295"),
    ("data_seed: -5", "data_seed: Input should be greater than or equal to 0"),
    ("eval: {limit: 4, offdiag_limit: 8}", "eval.offdiag_limit (8) is above eval.limit (4)"),
])
def test_bad_config_values_fail_at_plan_time(tmp_path, run_cli, extra, expect):
    """`seeds: [-1]` used to fail with numpy's ValueError after stage 1 had trained."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD.replace("eval: {limit: 4}\n", "") + extra + "\n")
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 2 and "Traceback" not in err and expect in err, err
    assert not out.exists()


def test_seed_at_the_top_of_the_range_is_accepted():
    from clbench.config import RunConfig

    assert RunConfig.model_validate({"tasks": ["a"], "methods": [{"name": "full_ft"}], "seeds": [0, 2**32 - 1]}).seeds[1] == 2**32 - 1


@pytest.mark.parametrize("name, value, expect", [
    ("CLBENCH_LOG_EVERY", "ten", "CLBENCH_LOG_EVERY='ten' must be a whole number > 0"),
    ("CLBENCH_LOG_EVERY", "0", "CLBENCH_LOG_EVERY='0' must be a whole number > 0"),
    ("CLBENCH_DIST_TIMEOUT_MIN", "soon", "CLBENCH_DIST_TIMEOUT_MIN='soon' must be a number > 0"),
    ("CLBENCH_EVAL_PREFIX_SHARING", "off", "CLBENCH_EVAL_PREFIX_SHARING='off' must be 0 or 1"),
    ("CLBENCH_EVAL_FAST_GENERATE", "yes", "CLBENCH_EVAL_FAST_GENERATE='yes' must be 0 or 1"),
    ("CLBENCH_CACHE", "FILE", "must be a folder (it names a file)"),
    ("CLBENCH_DATA_ROOT", "FILE", "must be a folder (it names a file)"),
])
def test_bad_environment_variable_is_one_line(tmp_path, run_cli, monkeypatch, name, value, expect):
    if value == "FILE":
        value = str(tmp_path / "a_file")
        (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv(name, value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD)
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, "--output-dir", out)
    assert code == 2 and "Traceback" not in err and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["run", "sweep", "tune"])
def test_a_folder_given_as_the_config_is_one_line(tmp_path, run_cli, cmd):
    code, _, err = run_cli(cmd, tmp_path)
    assert code == 2 and "Traceback" not in err and f"{tmp_path} is a directory, not a config file" in err, err
    assert len(err.strip().splitlines()) == 1
