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
