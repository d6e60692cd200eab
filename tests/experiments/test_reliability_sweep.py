"""Reliability: a sweep runs (and so reports) each distinct (method, settings, seed) once."""

import yaml

from conftest import TINY_CONFIG


def test_a_method_an_axis_leaves_alone_runs_once(tmp_path, run_cli):
    """methods.lora.options.r: [4, 8] over a base holding full_ft and lora: full_ft would run,
    identically, in both runs and the report would count it twice; it runs in the first only."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": str(TINY_CONFIG), "set": {"train.steps": 2},
                                    "grid": {"methods.lora.options.r": [4, 8], "seeds": [0, 1]}}))
    out = tmp_path / "out"
    code, text, err = run_cli("sweep", path, "--output-dir", out, "--dry-run")
    assert code == 0, err
    held = {p.stem: [m.get("label") or m["name"] for m in yaml.safe_load(p.read_text())["methods"]]
            for p in (out / "configs").glob("*.yaml")}
    assert held == {"r=4__seed=0": ["full_ft", "lora@r=4"], "r=4__seed=1": ["full_ft", "lora@r=4"],
                    "r=8__seed=0": ["lora@r=8"], "r=8__seed=1": ["lora@r=8"]}
    units = [(m, s) for run, ms in held.items() for m in ms for s in [run[-1]]]
    assert len(units) == len(set(units))  # every (method, seed) once


def test_methods_with_different_settings_all_run(tmp_path, run_cli):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": str(TINY_CONFIG), "grid": {"train.steps": [2, 3]}}))
    out = tmp_path / "out"
    code, _, err = run_cli("sweep", path, "--output-dir", out, "--dry-run")
    assert code == 0, err
    for p in (out / "configs").glob("*.yaml"):  # full_ft's steps change; lora sets its own lr, not steps
        assert [m["name"] for m in yaml.safe_load(p.read_text())["methods"]] == ["full_ft", "lora"]


def test_report_counts_a_result_held_by_two_run_folders_once(tmp_path, run_cli):
    """A sweep folder that still holds an earlier sweep's run of the same config (here: a copy under
    another run name) would count full_ft seed 0 twice (n = 2, std 0); the report counts it once
    and says which folder holds it. A run of another config (more steps) still counts."""
    import shutil

    from test_report import md

    sw = tmp_path / "sweep"
    for name, steps in (("a", 2), ("c", 3)):
        code, _, err = run_cli("run", TINY_CONFIG, "--output-dir", sw / name, "--set", "threads=1",
                               "--set", f"train.steps={steps}", "--set", "methods=[{name: full_ft}]")
        assert code == 0, err
    shutil.copytree(sw / "a", sw / "b")
    cfg = yaml.safe_load((sw / "b" / "config.yaml").read_text())
    (sw / "b" / "config.yaml").write_text(yaml.safe_dump({**cfg, "name": "older-sweep/a", "threads": 2}))
    code, _, err = run_cli("report", sw, "--out", tmp_path / "rep")
    assert code == 0, err
    assert md(tmp_path / "rep", "summary__tiny__tiny3")["full_ft"][6] == "2"  # a (or b) and c
    page = (tmp_path / "rep" / "report.md").read_text()
    assert f"{sw / 'b'}: full_ft seed 0 counted once: {sw / 'a'} holds the same result" in page, page
