"""The method protocol as code (clbench/method/protocol.py, clbench/method/registry.py): what a method author gets wrong fails at load
time or at the hook, naming the method and the hook, instead of being silently ignored."""

import textwrap

import pytest
import torch

from clbench.method import MethodError, RunContext, Stage, available, call_hook, load_method_file, make_method
from clbench.config import TrainConfig
from clbench.run import models
from clbench.training.stage import run_stage
from clbench.training.train import tokenize
from harness import cpu_rt

HEADER = """
from pydantic import BaseModel
from clbench.method import Method, register
"""


def method_file(tmp_path, body: str, name="m.py"):
    f = tmp_path / name
    f.write_text(HEADER + textwrap.dedent(body))
    return f


def test_a_misspelt_hook_fails_at_load_naming_it_and_the_known_hooks(tmp_path):
    f = method_file(tmp_path, """
        @register("typo_hook")
        class Typo(Method):
            def after_backwards(self, model, stage):
                pass
    """)
    with pytest.raises(MethodError) as e:
        load_method_file(f)
    msg = str(e.value)
    assert "'after_backwards' is not a hook" in msg and "did you mean 'after_backward'" in msg
    assert "after_step" in msg and str(f) in msg
    assert "typo_hook" not in available()


def test_hook_shaped_names_and_wrong_signatures_are_refused(tmp_path):
    f = method_file(tmp_path, """
        @register("on_thing")
        class OnThing(Method):
            def on_stage_begin(self, model, stage):
                pass
    """)
    with pytest.raises(MethodError, match="'on_stage_begin' is not a hook"):
        load_method_file(f)
    g = method_file(tmp_path, """
        @register("old_extra")
        class OldExtra(Method):
            def extra_loss(self, model, batch, stage):
                return None
    """, "g.py")
    with pytest.raises(MethodError, match=r"extra_loss takes \(self, model, batch, stage\), the loop calls it as "
                                            r"extra_loss\(self, model, batch, stage, out\)"):
        load_method_file(g)
    # a helper with a leading underscore, or one whose name is no hook's, is fine
    h = method_file(tmp_path, """
        @register("helpers_ok")
        class HelpersOk(Method):
            def _after_backward_impl(self):
                pass
            def penalty(self, model):
                return 0
    """, "h.py")
    assert load_method_file(h) == ["helpers_ok"]


def test_a_method_must_subclass_method(tmp_path):
    f = method_file(tmp_path, """
        @register("plain")
        class Plain:
            def setup(self, model, run):
                return model
    """)
    with pytest.raises(MethodError, match="must subclass clbench.method.Method"):
        load_method_file(f)


def test_options_refuse_unknown_keys_even_without_extra_forbid(tmp_path):
    f = method_file(tmp_path, """
        class Opts(BaseModel):   # no extra="forbid": the registry adds it
            rate: float = 0.1

        @register("lenient")
        class Lenient(Method):
            Options = Opts
    """)
    load_method_file(f)
    assert make_method("lenient", {"rate": 0.2}).options.rate == 0.2
    with pytest.raises(Exception, match="raet"):
        make_method("lenient", {"raet": 0.2})


def test_system_exit_at_import_is_a_clear_error(tmp_path, run_cli):
    f = method_file(tmp_path, "raise SystemExit(0)\n")
    with pytest.raises(MethodError, match=r"failed to import: SystemExit"):
        load_method_file(f)
    cfg = tmp_path / "c.yaml"
    from conftest import REPO

    cfg.write_text(textwrap.dedent(f"""
        model: tiny
        tasks: [tiny_parity]
        task_dirs: [{REPO / 'configs' / 'tiny_tasks'}]
        method_files: [{f}]
        methods: [{{name: full_ft}}]
        precision: fp32
    """))
    code, out, err = run_cli("run", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and "failed to import: SystemExit" in err and "Traceback" not in err


@pytest.mark.parametrize("hook,body,expect", [
    ("setup", "def setup(self, model, run):\n    return None", "hook setup returned NoneType; expected the model"),
    ("setup", "def setup(self, model, run):\n    raise ValueError('bad shape')", "hook setup: ValueError: bad shape"),
    ("stage_start", "def stage_start(self, model, stage):\n    return [model]", "hook stage_start returned list"),
    ("extra_loss", "def extra_loss(self, model, batch, stage, out):\n    return 1.0",
     "hook extra_loss returned float; expected None or a scalar tensor"),
    ("batch", "def batch(self, examples, stage):\n    return 'x'", "hook batch returned str"),
    ("trainable_params", "def trainable_params(self, model):\n    return -1", "hook trainable_params returned int"),
])
def test_a_hook_that_raises_or_returns_the_wrong_type_names_method_and_hook(tmp_path, tok, hook, body, expect):
    name = f"bad_{hook}_{len(expect)}"
    f = tmp_path / f"{name}.py"
    f.write_text(HEADER + f'@register("{name}")\nclass Bad(Method):\n' + textwrap.indent(body, "    ") + "\n")
    load_method_file(f)
    meth = make_method(name, {})
    run = RunContext(method=name, seed=0, tasks=["t1"], device=torch.device("cpu"), tokenizer=tok)
    model = models.build_tiny_model(0, len(tok))
    with pytest.raises(MethodError, match=f"method '{name}', {expect}"):
        if hook == "trainable_params":
            call_hook(meth, "trainable_params", model)
        else:
            model = call_hook(meth, "setup", model, run)
            ex = tokenize([("Number: 2\nEven or odd?\nAnswer:", " even")] * 4, tok, 32)
            run_stage(model, meth, ex, TrainConfig(steps=1, batch_size=2), run, 1, "t1", cpu_rt(tok))


def test_the_stage_view_is_read_only(tok):
    st = Stage(stage=1, task="t", seed=0, run=None, train_config=TrainConfig(), generator=None, total_steps=4)
    with pytest.raises(AttributeError, match="read-only"):
        st.total_steps = 9
    with pytest.raises(AttributeError, match="read-only"):
        st.extras = {}
    assert st.total_steps == 4 and st.lr == TrainConfig().lr
