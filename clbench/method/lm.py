"""The language-model helpers a method and the loop share: the forward of a micro-batch at its
target positions only (the LM head run where a target is), its loss, and the (decoder, head) split.
Hand-written: transformers computes the head over every position, which at a vocabulary of 49k
dominates a stage's memory and time when targets are a few tokens of a long prompt."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clbench.data.examples import IGNORE
from clbench.method import prompting


@dataclass
class Forward:
    """The loop's forward of one micro-batch, as extra_loss sees it: the task loss, the logits
    at the positions that predict a target token (rows in batch order, then position order:
    the same rows whether or not the LM head ran only there) and those target tokens."""

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


def split_head(model):
    """(decoder, lm_head) of a causal LM (also inside a peft wrapper), or None: a method computing
    the LM head at a few positions only (as the loop's head-only loss does) calls the two itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_dec = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    dec = get_dec() if get_dec else None
    if dec is None or head is None or dec is base:
        return None
    return dec, head


def head_logits(model, input_ids, attention_mask, sel) -> torch.Tensor:
    """The LM head's logits at the positions `sel` marks (of the shifted sequence) only."""
    dec, head = split_head(model)
    h = dec(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(h[:, :-1][sel])


def target_logits(model, batch: dict, head_only_targets: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions whose next token is a target, rows in batch then
    position order. With head_only_targets the LM head runs only on those positions: prompt
    positions carry no loss, and the vocabulary-wide logits over every position otherwise
    dominate memory and time."""
    labels = batch["labels"]
    tgt = labels[:, 1:]
    sel = tgt != IGNORE
    # a prompt chosen from the input (L2P) sees each row's context only: up to its first target
    with prompting.context_lengths(model, lambda: (labels != IGNORE).int().argmax(1)):
        if head_only_targets and split_head(model) is not None:
            fwd = getattr(model, "clbench_head_logits", None)  # a sharded root's registered forward (clbench.distributed.fsdp)
            if fwd is not None:
                return fwd(batch["input_ids"], batch["attention_mask"], sel), tgt[sel]
            return head_logits(model, batch["input_ids"], batch["attention_mask"], sel), tgt[sel]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1][sel], tgt[sel]


def lm_loss(model, batch: dict, head_only_targets: bool = True, return_forward: bool = False):
    """Mean next-token cross entropy over target positions (float32); with return_forward the
    `Forward` (loss, target logits, targets) instead."""
    logits, targets = target_logits(model, batch, head_only_targets)
    loss = F.cross_entropy(logits.float(), targets)
    return Forward(loss, logits, targets) if return_forward else loss
