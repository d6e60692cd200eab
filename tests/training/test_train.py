"""The training loop's pieces: lm-eval-identical tokenization, target-only loss, batching."""

import pytest
import torch

from clbench.data.tasks import encode_pair
from clbench.run import models
from clbench.training.train import Example, collate, tokenize


from clbench.method.lm import lm_loss
@pytest.fixture(scope="module")
def tiny():
    tok = models.build_tiny_tokenizer()
    return models.build_tiny_model(0, len(tok)), tok


def test_encode_pair_matches_lm_eval(tiny):
    """Training sees exactly the token split lm-eval scores: context ids + continuation ids."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    for ctx, cont in [("Question: 2+2?\nAnswer:", " four"), ("Text with trailing space ", "odd"), ("x", " y z")]:
        assert encode_pair(tok, ctx, cont) == tuple(lm._encode_pair(ctx, cont))


def test_head_only_loss_equals_full_logits_loss(tiny):
    model, tok = tiny
    ex = tokenize([("Number: 12\nEven or odd?\nAnswer:", " even"), ("Which is larger, 3 or 9?\nAnswer:", " second")], tok, 64)
    batch = collate(ex, tok.pad_token_id)
    a = lm_loss(model, batch, head_only_targets=True)
    b = lm_loss(model, batch, head_only_targets=False)
    assert torch.allclose(a, b, atol=1e-5)
    # and through a peft wrapper
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(models.build_tiny_model(0, len(tok)), LoraConfig(r=2, target_modules="all-linear"))
    assert torch.allclose(lm_loss(pm, batch, True), lm_loss(pm, batch, False), atol=1e-5)


def test_collate_masks_prompt_and_padding(tiny):
    _, tok = tiny
    ex = [Example([5, 6, 7, 8], 3), Example([9, 10], 1)]
    b = collate(ex, pad_id=0)
    assert b["labels"].tolist() == [[-100, -100, -100, 8], [-100, 10, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_long_prompts_are_cut_from_the_left(tiny):
    _, tok = tiny
    (ex,) = tokenize([("word " * 200 + "Answer:", " yes")], tok, 32)
    assert len(ex.input_ids) == 32
    target = encode_pair(tok, "word " * 200 + "Answer:", " yes")[1]
    assert ex.input_ids[ex.n_prompt:] == target
