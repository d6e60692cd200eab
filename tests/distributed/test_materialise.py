"""Sharded runs read the base weights on rank 0 only: the other ranks build the model's structure on
the meta device (clbench.run.models.resolve(weights=False)) and set the method up on it; a method
whose setup keeps something computed from the weights is found (clbench.distributed.fsdp.meta_tensors)
and set up on the weights instead. The two-process runs of test_fsdp.py and test_fsdp_methods.py
check the numbers; these check the two pieces they rest on, in one process."""

import torch

from clbench.distributed.fsdp import meta_tensors
from clbench.method import RunContext, call_hook, load_builtin_methods, make_method
from clbench.paths import BUILTIN_METHODS_DIR
from clbench.run import models


def _same_structure(real, meta):
    rs, ms = real.state_dict(), meta.state_dict()
    assert list(rs) == list(ms)
    assert [(tuple(t.shape), t.dtype) for t in rs.values()] == [(tuple(t.shape), t.dtype) for t in ms.values()]
    assert [n for n, _ in real.named_buffers()] == [n for n, _ in meta.named_buffers()]
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert not any(t.is_meta for t in [*real.parameters(), *real.buffers()])
    assert (meta.get_output_embeddings().weight is meta.get_input_embeddings().weight) == \
        (real.get_output_embeddings().weight is real.get_input_embeddings().weight)
    assert meta.config.to_dict() == real.config.to_dict()
    assert meta.generation_config.to_dict() == real.generation_config.to_dict()


def test_the_tiny_model_without_weights_has_the_structure_of_the_loaded_one():
    real, tok, desc = models.resolve("tiny")
    meta, tok2, desc2 = models.resolve("tiny", weights=False)
    _same_structure(real, meta)
    assert desc == desc2 and len(tok) == len(tok2)


def test_a_model_folder_without_weights_has_the_structure_of_the_loaded_one(tmp_path):
    folder = tmp_path / "model"
    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(3, len(tok))
    model.generation_config.max_new_tokens = 7  # a setting from_pretrained reads from generation_config.json
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    real, _, _ = models.resolve(str(folder))
    meta, _, _ = models.resolve(str(folder), weights=False)
    _same_structure(real, meta)
    assert meta.generation_config.max_new_tokens == 7
    assert torch.equal(real.get_input_embeddings().weight, model.get_input_embeddings().weight)


def _set_up_on_meta(name: str, options: dict | None = None):
    load_builtin_methods(BUILTIN_METHODS_DIR)
    meta, tok, _ = models.resolve("tiny", weights=False)
    run = RunContext(method=name, seed=0, tasks=["a", "b"], device=torch.device("cpu"), tokenizer=tok, sharded=True)
    meth = make_method(name, options or {})
    return meth, call_hook(meth, "setup", meta, run)


def test_methods_that_only_mark_or_wrap_the_model_keep_nothing_from_its_weights():
    for name, options in [("full_ft", {}), ("lota", {}), ("ewc", {}), ("lora", {"r": 2}), ("ks_lottery", {})]:
        meth, model = _set_up_on_meta(name, options)
        assert meta_tensors(meth, model) == [], name


def test_a_setup_that_copies_the_model_is_found():
    # LwF keeps a copy of the model as its teacher's template: on the meta device it would hold no weights
    meth, model = _set_up_on_meta("lwf")
    assert meta_tensors(meth, model) == ["_template"]


def test_meta_tensors_looks_inside_containers_and_skips_the_model_itself():
    meta, _, _ = models.resolve("tiny", weights=False)

    class Holder:
        pass

    h = Holder()
    h.layers = list(meta.model.layers)  # the model's own modules: they receive their weights
    h.weight = meta.lm_head.weight
    h.real = torch.zeros(3)
    h.nested = {"norms": [torch.ones(2), torch.empty(2, device="meta")]}
    assert meta_tensors(h, meta) == ["nested['norms'][1]"]
    h.scale = meta.lm_head.weight.sum()  # computed from a weight: no data behind it
    assert meta_tensors(h, meta) == ["nested['norms'][1]", "scale"]
