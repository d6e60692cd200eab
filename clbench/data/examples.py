"""Training examples, the data side of the training loop: an `Example` (token ids and where its
loss starts), `tokenize` ((context, target) pairs, or a raw-text task's documents packed into
blocks by clbench.data.packing, to examples), `collate` (a padded batch with labels) and `IGNORE`
(the label of a position without loss). What a method that builds or reads batches imports;
clbench.training.train re-exports them under their former names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clbench.data.packing import blocks, token_stream
from clbench.data.tasks import encode_pair
from clbench.errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    n_prompt: int  # positions < n_prompt carry no loss


def tokenize(pairs, tokenizer, max_length: int) -> list[Example]:
    """(context, target) pairs -> examples with the loss on the target; the document strings of a
    raw-text task -> blocks of max_length tokens with the loss on every token (clbench.data.packing)."""
    if pairs and isinstance(pairs[0], str):
        return pack_documents(list(pairs), tokenizer, max_length)
    out = []
    for ctx, cont in pairs:
        c, t = encode_pair(tokenizer, ctx, cont)
        t = t[:max_length - 1]
        c = c[-(max_length - len(t)):]  # cut long prompts from the left, keep the target
        out.append(Example(c + t, len(c)))
    return out


def pack_documents(documents: list[str], tokenizer, max_length: int) -> list[Example]:
    """The training examples (loss on every token) of a raw-text task: clbench.data.packing's blocks."""
    if not documents:
        raise DataError("a raw-text task has no training documents")
    return [Example(b, 0) for b in blocks(token_stream(tokenizer, documents), max_length)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L] = torch.tensor(e.input_ids)
        labels[i, e.n_prompt:L] = ids[i, e.n_prompt:L]
        mask[i, :L] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
