"""Raw text for continual pre-training: documents packed into fixed-length blocks.

A `clbench.kind: text` task trains on its documents as one token stream,

    EOS d1 EOS d2 EOS ... dn EOS        (each d_i tokenized as lm-eval's rolling log-likelihood does:
                                         the plain string, no special tokens)

cut into blocks of `train.max_length` tokens that overlap by ONE token: the last token of a block
is the first of the next. The language-modelling loss covers every position of a block (the
training example's `n_prompt` is 0), and a block's first token only serves as context, so every
token of the stream after the leading EOS is a loss target exactly once: none is lost at a block
boundary (as with disjoint blocks, whose first tokens are never predicted) and none counted
twice. The leading EOS plays the part of lm-eval's prefix token: the first token of d1 is
predicted from it, as lm-eval predicts the first token of every scored document. The last block
may be shorter; the collate step pads it and the padding carries no loss.

This is the standard "group texts" step of causal-LM pre-training (e.g. the run_clm example of
transformers, which cuts disjoint blocks) written out here so that the block boundaries keep every
target token; no maintained library offers it for pre-tokenized document lists with that
guarantee.
"""

from __future__ import annotations

from clbench.errors import DataError


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """The documents as one stream of token ids: EOS before the first and after every document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("packing raw text needs a tokenizer with an EOS token (the document separator)")
    stream = [eos]
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    return stream


def blocks(stream: list[int], block_len: int) -> list[list[int]]:
    """Blocks of block_len tokens, each starting with the previous block's last token, so that the
    targets (a block minus its first token) of all blocks together are exactly stream[1:]."""
    if block_len < 2:
        raise DataError(f"a block needs at least 2 tokens (train.max_length), got {block_len}")
    step = block_len - 1
    return [stream[i:i + block_len] for i in range(0, max(1, len(stream) - 1), step)]


def target_tokens(example) -> int:
    """How many loss targets an example has (the positions after its prompt; at least its first
    token is context only)."""
    return max(0, len(example.input_ids) - max(1, example.n_prompt))


def is_text_task(lm_task) -> bool:
    """True for an lm-eval task scored by rolling log-likelihood (a `kind: text` stage)."""
    return getattr(lm_task, "OUTPUT_TYPE", None) == "loglikelihood_rolling"


def __getattr__(name):
    # pack_documents lives with the Example it builds (clbench.data.examples); reached from here lazily,
    # so that this module imports nothing of the examples (no import circle)
    if name == "pack_documents":
        from clbench.data.examples import pack_documents

        return pack_documents
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
