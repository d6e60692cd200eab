"""Config validation: every error names the culprit, before any expensive work."""

from pathlib import Path

import pytest

from clbench.config import RunConfig, load_config
from clbench.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "model: tiny\ntasks: [a, b]\nmethods:\n  - name: full_ft\n"


def test_unknown_key_names_key_and_allowed(tmp_path):
    p = write(tmp_path, BASE + "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key 'train.lrr'" in msg and "lr, lr_schedule" in msg and str(p) in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(write(tmp_path, BASE + "modle: x\n"))


def test_wrong_type_names_field_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer.*'many'"):
        load_config(write(tmp_path, BASE + "train: {steps: many}\n"))


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "model: tiny\ntasks: [a, b\nmethods: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:3:" in str(e.value) and "malformed YAML" in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("train.lr=0", "train.lr: Input should be greater than 0"),
    ("train.lr=-1e-3", "train.lr: Input should be greater than 0"),
    ("tasks=[]", "`tasks` is empty"),
    ("tasks=[a, a]", "duplicate task(s) in the stream: a"),
    ("seeds=[1, 1]", "`seeds` has duplicates"),
    ("eval.batch_size=0", "eval.batch_size"),
])
def test_out_of_range_values(tmp_path, override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [override])
    assert needle in str(e.value)


def test_set_overrides_any_field(tmp_path):
    cfg, _ = load_config(write(tmp_path, BASE), ["train.lr=0.25", "methods.0.options.r=4", "eval.limit=7", "name=x"])
    assert cfg.train.lr == 0.25 and cfg.methods[0].options == {"r": 4} and cfg.eval.limit == 7 and cfg.name == "x"
    with pytest.raises(ConfigError, match="not an index"):
        load_config(write(tmp_path, BASE), ["methods.5.name=x"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(write(tmp_path, BASE), ["train.lr"])


@pytest.mark.parametrize("override,needle", [
    ("train.lr.x.y=1", "--set train.lr.x.y: train.lr is 0.003, not a mapping with key 'x'"),
    ("train.lr.x=1", "--set train.lr.x: train.lr is 0.003, not a mapping with key 'x'"),
    ("methods.0.name.x=1", "--set methods.0.name.x: methods.0.name is 'full_ft', not a mapping with key 'x'"),
])
def test_set_below_a_scalar_is_one_clear_error(tmp_path, override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + "train: {lr: 0.003}\n"), [override])
    assert str(e.value) == needle


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_stage_and_method_overrides_merge():
    cfg = RunConfig.model_validate({"tasks": ["a", "b"], "methods": [{"name": "lora", "train": {"lr": 1e-3}}],
                                    "train": {"lr": 1e-5, "steps": 10}, "stages": {"b": {"steps": 3}, "1": {"epochs": 2}}})
    m = cfg.methods[0]
    s1 = cfg.train.merged(m.train, cfg.stage_overrides(1, "a"))
    s2 = cfg.train.merged(m.train, cfg.stage_overrides(2, "b"))
    assert (s1.lr, s1.epochs) == (1e-3, 2) and (s2.lr, s2.steps, s2.epochs) == (1e-3, 3, None)


def test_hash_ignores_cache_dir_only():
    a = RunConfig.model_validate({"tasks": ["a"], "methods": [{"name": "x"}]})
    b = RunConfig.model_validate({"tasks": ["a"], "methods": [{"name": "x"}], "cache_dir": "/elsewhere"})
    c = RunConfig.model_validate({"tasks": ["a"], "methods": [{"name": "x"}], "seeds": [1]})
    assert a.hash() == b.hash() != c.hash()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    """Shipped configs parse, name registered methods with valid options, and known tasks."""
    from clbench.method import load_builtin_methods, load_method_file, make_method
    from clbench import paths
    from clbench.data.tasks import load_streams
    from clbench.data.tasks import load_tasks, resolve_stream

    cfg, cdir = load_config(path)
    load_builtin_methods(paths.BUILTIN_METHODS_DIR)
    for f in cfg.method_files:
        load_method_file(cdir / f)
    for spec in cfg.methods:
        make_method(spec.name, spec.options)
    dirs = [cdir / d for d in cfg.task_dirs]
    assert resolve_stream(cfg, load_tasks(dirs), load_streams(dirs))
