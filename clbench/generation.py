"""Generation and choice scoring on the in-process model, for methods that make or relabel data
inside a stage (SDFT's rewrites, SSR's synthetic rehearsal).

generate(model, tokenizer, prompts, ...) -> [[continuation, ...] per prompt]
    Batched, left-padded decoding with a KV cache. Greedy (the argmax of the float32 logits,
    as transformers' greedy search) or sampling with repetition_penalty, temperature, top_k
    and top_p applied in transformers' order by transformers' own logits processors; samples
    are drawn with a torch.Generator (from `generator` or `seed`), so a call is reproducible.
    Prompts are encoded as lm-eval's HFLM encodes a generation context (no special tokens)
    and cut from the left to leave room for max_new_tokens. A row ends at EOS or when its
    decoded text contains a stop string; the continuation is cut before the first stop
    string (as lm-eval cuts at `until`) and never contains the EOS token.
loglikelihoods(model, tokenizer, pairs, ...) -> [sum log p(continuation | context)]
    As lm-eval scores a loglikelihood request: (context, continuation) tokenized by
    clbench.tasks.encode_pair, the joined ids cut from the left to max_length + 1.
choose(model, tokenizer, contexts, choices, delimiter) -> [index of the best choice]
    lm-eval's multiple-choice `acc` prediction: the argmax of the choices' log-likelihoods
    (`normalize=True`: divided by the choice's length in bytes, as acc_norm).
TaskView(lm_eval_task)
    What a method needs of a task to relabel or check data: output type, target delimiter,
    training documents (in the order of RunContext.pairs), choices, `until` and max_gen_toks,
    and score(doc, text): the task's first filter pipeline and first metric on a response.

The model is put in eval mode for the call and back in its previous mode after it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F


def context_limit(model, max_length: int | None = None) -> int:
    """max_length, or the longest sequence the model takes (its max_position_embeddings; 2048
    when it has none, as lm-eval's HFLM)."""
    if max_length:
        return int(max_length)
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def right_padded(seqs: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token sequences padded on the right (pad id 0, masked out)."""
    width = max(len(x) for x in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _processors(do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                         TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """text up to the first occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, stop: Sequence[str] = (),
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, num_return_sequences: int = 1, generator: torch.Generator | None = None,
             seed: int | None = None, batch_size: int = 8, max_length: int | None = None, autocast=None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` decoded continuations (see the module docstring).
    max_length: the longest sequence the model takes (default: its max_position_embeddings);
    autocast: a context-manager factory for the forwards (RunContext.autocast)."""
    if max_new_tokens < 1 or num_return_sequences < 1 or batch_size < 1:
        raise ValueError("max_new_tokens, num_return_sequences and batch_size must be >= 1")
    if do_sample and generator is None:
        if seed is None:
            raise ValueError("sampling needs a generator or a seed (reproducible draws)")
        generator = torch.Generator().manual_seed(int(seed))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    keep = max(1, context_limit(model, max_length) - max_new_tokens)
    encoded = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"][-keep:]
        if not ids:
            raise ValueError(f"empty generation prompt {p!r}")
        encoded.append(ids)
    procs = _processors(do_sample, temperature, top_k, top_p, repetition_penalty)
    device = next(model.parameters()).device
    ac = autocast or contextlib.nullcontext
    out: list[list[str]] = []
    with _eval_mode(model):
        for b0 in range(0, len(encoded), batch_size):
            rows = [ids for ids in encoded[b0:b0 + batch_size] for _ in range(num_return_sequences)]
            texts = _decode_batch(model, tokenizer, rows, max_new_tokens, stop, do_sample, procs, generator, eos, pad,
                                  device, ac)
            out.extend(texts[i:i + num_return_sequences] for i in range(0, len(texts), num_return_sequences))
    return out


def _decode_batch(model, tokenizer, rows, max_new_tokens, stop, do_sample, procs, generator, eos, pad, device, ac):
    n, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((n, width), pad, dtype=torch.long)
    # the repetition penalty sees each row's own tokens: its left padding is filled with the row's
    # first token, which the row already holds, so the set of penalised tokens is the row's
    seen = torch.empty((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        seen[i] = r[0]
        seen[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, seen, mask = ids.to(device), seen.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gen: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    past, step_ids = None, ids
    for _ in range(max_new_tokens):
        with ac():
            o = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        past = o.past_key_values
        scores = procs(seen, o.logits[:, -1, :].float())
        if do_sample:
            probs = F.softmax(scores, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        else:
            nxt = scores.argmax(dim=-1)
        for i, tid in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tid == eos:
                done[i] = True
                continue
            gen[i].append(tid)
            if stop and cut_at_stop(tokenizer.decode(gen[i]), stop)[1]:
                done[i] = True
        if all(done):
            break
        step_ids = nxt.masked_fill(torch.tensor(done, device=device), pad).unsqueeze(1)
        seen = torch.cat([seen, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
    return [cut_at_stop(tokenizer.decode(g), stop)[0] for g in gen]


def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int | None = None, autocast=None) -> list[float]:
    """sum log p(continuation | context) for each (context, continuation), as lm-eval scores it."""
    from .tasks import encode_pair
    from .train import _split_head

    limit = context_limit(model, max_length)
    items = []
    for ctx, cont in pairs:
        c, t = encode_pair(tokenizer, ctx, cont)
        if not t:
            raise ValueError(f"empty continuation {cont!r}")
        whole = (c + t)[-(limit + 1):]
        items.append((whole[:-1], whole[-len(t):]))  # inputs, and the targets they predict at the end
    device = next(model.parameters()).device
    split = _split_head(model)
    ac = autocast or contextlib.nullcontext
    res: list[float] = []
    with _eval_mode(model):
        for b0 in range(0, len(items), batch_size):
            chunk = items[b0:b0 + batch_size]
            ids, mask = right_padded([x for x, _ in chunk], device)
            with ac():
                if split is not None:
                    hidden = split[0](input_ids=ids, attention_mask=mask).last_hidden_state
                else:
                    logits = model(input_ids=ids, attention_mask=mask).logits
            for i, (x, y) in enumerate(chunk):
                at = slice(len(x) - len(y), len(x))
                with ac():
                    lg = split[1](hidden[i, at]) if split is not None else logits[i, at]
                lp = F.log_softmax(lg.float(), dim=-1)
                res.append(float(lp.gather(1, torch.tensor(y, device=device)[:, None]).sum()))
    return res


def choose(model, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], delimiter: str = " ", *,
           normalize: bool = False, batch_size: int = 16, max_length: int | None = None, autocast=None) -> list[int]:
    """For each context, the index of its best choice by log-likelihood of delimiter + choice
    (ties: the first, as numpy's argmax in lm-eval's acc)."""
    pairs = [(ctx, f"{delimiter}{c}") for ctx, cs in zip(contexts, choices) for c in cs]
    ll = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, autocast=autocast)
    out, k = [], 0
    for cs in choices:
        scores = ll[k:k + len(cs)]
        if normalize:
            scores = [s / max(1, len(c.encode())) for s, c in zip(scores, cs)]
        out.append(max(range(len(cs)), key=lambda j: (scores[j], -j)))
        k += len(cs)
    return out


class TaskView:
    """Read access to an lm-eval task for relabelling and checking data (see the module docstring)."""

    def __init__(self, task: Any):
        self.task = task
        self.output_type: str = task.OUTPUT_TYPE
        self.delimiter: str = task.config.target_delimiter
        self._docs = None

    @property
    def multiple_choice(self) -> bool:
        return self.output_type == "multiple_choice"

    @property
    def docs(self) -> list:
        """The training documents, in the order of RunContext.pairs (clbench.tasks.training_examples)."""
        if self._docs is None:
            self._docs = list(self.task.training_docs())
        return self._docs

    def choices(self, doc) -> list[str]:
        return list(self.task.doc_to_choice(doc))

    def fixed_choices(self) -> list[str] | None:
        """The one choice list every training document shares, or None when they differ."""
        first = None
        for d in self.docs:
            c = self.choices(d)
            if first is None:
                first = c
            elif c != first:
                return None
        return first

    @property
    def until(self) -> list[str]:
        kw = self.task.config.generation_kwargs or {}
        until = kw.get("until", [self.task.config.fewshot_delimiter])
        return [until] if isinstance(until, str) else list(until)

    @property
    def max_gen_toks(self) -> int:
        return int((self.task.config.generation_kwargs or {}).get("max_gen_toks", 256))  # HFLM's default

    def score(self, doc, text: str) -> float:
        """The task's first metric of `text` as the response to `doc`, after its first filter
        pipeline (as lm-eval scores a generation)."""
        resps = [[text]]
        ensemble = self.task._filters[0]
        for f in ensemble.filters:
            resps = f().apply(resps, [doc])
        resps = list(resps)
        metric = self.task.config.metric_list[0]["metric"]
        return float(self.task.process_results(doc, [resps[0]])[metric])
