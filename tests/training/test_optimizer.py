"""The optimizer a stage trains with: `train.optimizer` (global, per method, per stage), else the
one the method names (Method.optimizer_name), else AdamW; recorded per stage in results.json."""

import json
import textwrap

import pytest
import torch
import yaml

from clbench.config import ConfigError, load_config
from clbench.method.lm import lm_loss
from clbench.run import models
from clbench.training.train import collate, make_optimizer, tokenize
from conftest import REPO

SGD_METHOD = """
from clbench.method import Method, register


@register("sgd_named")
class SgdNamed(Method):
    \"\"\"Full fine-tuning that names plain SGD as its paper's optimizer.\"\"\"

    def optimizer_name(self):
        return "sgd"
"""


def _run(tmp_path, run_cli, methods, train=None):
    (tmp_path / "sgd_named.py").write_text(SGD_METHOD)
    cfg = {"model": "tiny", "tasks": ["tiny_parity"], "task_dirs": [str(REPO / "configs" / "tiny_tasks")],
           "method_files": [str(tmp_path / "sgd_named.py")], "methods": methods, "seeds": [0], "threads": 1,
           "train": {"steps": 3, "lr": 3e-3, "batch_size": 8, "max_length": 64, "max_grad_norm": None, **(train or {})},
           "eval": {"limit": 8, "batch_size": 16, "log_samples": False}, "precision": "fp32"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli("run", path, "--output-dir", tmp_path / "out")
    assert code == 0, err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    return {m: s["seeds"]["0"]["stages"][0] for m, s in res["methods"].items()}


def test_the_config_wins_then_the_method_then_adamw(tmp_path, run_cli):
    stages = _run(tmp_path, run_cli, [
        {"name": "full_ft"},                                                   # nobody names one: AdamW
        {"name": "full_ft", "label": "ft_sgd", "train": {"optimizer": "sgd"}},  # the config names SGD
        {"name": "sgd_named"},                                                 # the method names SGD
        {"name": "sgd_named", "label": "named_but_adamw", "train": {"optimizer": "adamw"}},  # the config wins
        {"name": "full_ft", "label": "ft_rmsprop", "train": {"optimizer": "rmsprop", "momentum": 0.5}},
    ])
    names = {m: s["optimizer"]["name"] for m, s in stages.items()}
    assert names == {"full_ft": "adamw", "ft_sgd": "sgd", "sgd_named": "sgd", "named_but_adamw": "adamw",
                     "ft_rmsprop": "rmsprop"}
    assert stages["ft_rmsprop"]["optimizer"]["momentum"] == 0.5
    # the recorded optimizer is the one that trained: same data, same start, the same optimizer gives
    # the same losses bit for bit, another one different losses after its first step
    loss = {m: s["last_loss"] for m, s in stages.items()}
    assert loss["ft_sgd"] == loss["sgd_named"] and loss["full_ft"] == loss["named_but_adamw"]
    assert loss["ft_sgd"] != loss["full_ft"] and loss["ft_rmsprop"] not in (loss["ft_sgd"], loss["full_ft"])


def test_sgd_takes_exactly_the_step_minus_lr_times_the_gradient(tok):
    """The SGD the loop builds is plain SGD at train.lr (momentum 0, no weight decay): one step
    moves every parameter by -lr * its gradient, computed here by backward on the same batch."""
    from clbench.config import TrainConfig

    model = models.build_tiny_model(0, len(tok))
    batch = collate(tokenize([("Number: 12\nEven or odd?\nAnswer:", " even"), ("Number: 7\nEven or odd?\nAnswer:", " odd")],
                             tok, 64), tok.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm_loss(model, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=0.05, optimizer="sgd")
    opt = make_optimizer([{"params": list(model.parameters())}], cfg, "sgd")
    assert isinstance(opt, torch.optim.SGD)
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.05 * grads[n], rtol=0, atol=1e-7)


def test_an_unknown_optimizer_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        model: tiny
        tasks: [tiny_parity]
        task_dirs: [{REPO / 'configs' / 'tiny_tasks'}]
        methods: [{{name: full_ft, train: {{optimizer: adam}}}}]
    """))
    with pytest.raises(ConfigError, match=r"methods\.0\.train\.optimizer"):
        load_config(path)
