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
greedy_until(model, tokenizer, rows, batches, ...) -> [continuation per row]
    Greedy continuations of prompts already encoded and batched, for evaluation
    (clbench.run.evaluate's generate_until): each row gets the tokens transformers' greedy search
    gives it in its left-padded batch (as lm-eval's HFLM.generate_until batches and pads), ends
    at the model's EOS ids or a stop string, and its text is decoded without special tokens and
    cut at the first stop string, as lm-eval does. On the CPU in bf16 autocast, for a model whose
    layers mix tokens only in attention (Llama), with less work for the same numbers: the
    padding runs only in attention, all batches run in one forward per step (each in its own
    padded attention layout), and the LM head runs at the last position only.
loglikelihoods(model, tokenizer, pairs, ...) -> [sum log p(continuation | context)]
    As lm-eval scores a loglikelihood request: (context, continuation) tokenized by
    clbench.data.tasks.encode_pair, the joined ids cut from the left to max_length + 1.
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

from clbench.data.tasks import encode_pair
from clbench.distributed import fsdp
from clbench.method.lm import split_head
from clbench.method.prompting import prompted


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
    # sharded (FSDP2): every rank calls this (a method's hook), gathers the whole model once and
    # generates its own rows with no collective, so ranks whose sequences end at different steps
    # cannot wait on each other's forwards
    with fsdp.unsharded(model), _eval_mode(model):
        for b0 in range(0, len(encoded), batch_size):
            rows = [ids for ids in encoded[b0:b0 + batch_size] for _ in range(num_return_sequences)]
            texts = _decode_batch(model, tokenizer, rows, max_new_tokens, stop, do_sample, procs, generator, eos, pad,
                                  device, ac)
            out.extend(texts[i:i + num_return_sequences] for i in range(0, len(texts), num_return_sequences))
    return out


def _takes_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _decode_batch(model, tokenizer, rows, max_new_tokens, stop, do_sample, procs, generator, eos, pad, device, ac,
                  fast: bool = False, row_ids: list | None = None):
    """Decode one left-padded batch. eos: an id or a set of ids that end a row.

    fast (greedy_until): the forwards transformers' generate runs on this batch, call for call (the
    LM head at the last position only, no attention mask without padding, ended rows fed the pad
    token, the batch's shapes unchanged), ending when every row has ended; an EOS token stays in
    the row's tokens and texts are decoded without special tokens (which drops it). row_ids: the
    rows' ids for _greedy_pick."""
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
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
    kw = {"logits_to_keep": 1} if fast and _takes_logits_to_keep(model) else {}
    if fast and bool(mask.all()):
        mask = None  # as transformers' generate: no padding, no mask
    gen: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    past, step_ids = None, ids
    for _ in range(max_new_tokens):
        with ac():
            o = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                      **kw)
        past = o.past_key_values
        scores = procs(seen, o.logits[:, -1, :].float())
        if do_sample:
            probs = F.softmax(scores, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        elif fast:
            nxt = torch.tensor(_greedy_pick(scores, row_ids or list(range(n))), dtype=torch.long, device=device)
        else:
            nxt = scores.argmax(dim=-1)
        for i, tid in enumerate(nxt.tolist()):
            if not done[i]:
                done[i] = _take(gen[i], tid, eos_ids, stop, tokenizer, fast)
        if all(done):
            break
        step_ids = nxt.masked_fill(torch.tensor(done, device=device), pad).unsqueeze(1)
        seen = torch.cat([seen, step_ids], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
    return [cut_at_stop(tokenizer.decode(g, skip_special_tokens=fast), stop)[0] for g in gen]


def _greedy_pick(logits: torch.Tensor, rows: list) -> list[int]:
    """Greedy choice of each row (rows: which rows the logits are of): the argmax of its float32
    logits, first index on ties, as transformers' greedy search."""
    return logits.float().argmax(dim=-1).tolist()


def _take(gen: list[int], tid: int, eos_ids, stop, tokenizer, keep_eos: bool) -> bool:
    """Append a chosen token to a row's tokens; True when the row has ended (EOS, or a stop string
    in its text; keep_eos: the EOS token is kept and the text decoded without special tokens)."""
    if tid in eos_ids:
        if keep_eos:
            gen.append(tid)
        return True
    gen.append(tid)
    return bool(stop) and cut_at_stop(tokenizer.decode(gen, skip_special_tokens=keep_eos), stop)[1]


# _grouped_greedy computes each row's numbers in matrix products of other shapes than transformers'
# generate on its batch. That changes no bit where a product's rows do not depend on how many rows
# it has: measured so on the CPU for bf16 autocast (oneDNN; 2 to 199 rows, 1 to 16 threads), NOT
# for float32 (MKL's sgemm rounds rows differently for some row counts below 4 to 28, by thread
# count), not known on GPUs. So it takes only: the CPU, bf16 autocast, batches of GROUPED_MIN_ROWS
# rows or more (and it never runs a product on fewer), and model types whose layers mix tokens only
# in attention, through transformers' attention interface, with full causal attention (checked bit
# for bit on Llama: tests/method/test_fast_generate.py). Other batches decode as transformers' generate
# does (_decode_batch).
_GROUPED_TYPES = {"llama"}
GROUPED_MIN_ROWS = 16


def _groupable(model, device, autocast_dtype) -> bool:
    if prompted(model):  # its prompt goes in front of each sequence, not of a packed prefill
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    return (device.type == "cpu" and autocast_dtype == torch.bfloat16
            and getattr(cfg, "model_type", None) in _GROUPED_TYPES and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])))


class _Batch:
    """One left-padded batch of _grouped_greedy: its rows, 2-D attention mask (None without
    padding, as transformers' generate passes it), positions and KV cache (padded layout)."""

    def __init__(self, rows, idx, cfg, device):
        from transformers.cache_utils import DynamicCache

        self.idx = list(idx)  # indices into greedy_until's rows
        lens = [len(rows[i]) for i in self.idx]
        self.width = max(lens)
        mask = torch.zeros((len(lens), self.width), dtype=torch.long, device=device)
        for j, k in enumerate(lens):
            mask[j, self.width - k:] = 1
        self.pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.mask = None if bool(mask.all()) else mask
        self.cache = DynamicCache(config=cfg)
        # prefill: where each row's tokens sit in the padded (rows x width) layout, flattened
        self.dst = torch.cat([torch.arange(j * self.width + self.width - k, (j + 1) * self.width)
                              for j, k in enumerate(lens)]).to(device)
        self.attn_mask = None

    def causal_mask(self, cfg, q_len, dtype):
        """The attention mask transformers builds for this batch's forward (before its cache update)."""
        from transformers.masking_utils import create_causal_mask

        pos = self.pos if q_len > 1 else self.pos[:, -1:]
        empty = torch.empty((len(self.idx), q_len, 0), dtype=dtype, device=pos.device)
        return create_causal_mask(config=cfg, inputs_embeds=empty, attention_mask=self.mask,
                                  past_key_values=self.cache, position_ids=pos)

    def keep(self, sel: list[int]):
        """Keep only these rows (positions in idx); a row's numbers do not depend on the others."""
        if len(sel) < len(self.idx):
            t = torch.tensor(sel, dtype=torch.long, device=self.pos.device)
            self.cache.batch_select_indices(t)
            self.idx, self.pos = [self.idx[j] for j in sel], self.pos[t]
            self.mask = None if self.mask is None else self.mask[t]

    def advance(self):
        """One more position for every row (the token just chosen)."""
        self.pos = self.pos[:, -1:] + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)


@contextlib.contextmanager
def _attention_by_batch(plan: list):
    """While active, transformers' SDPA attention runs per batch of `plan`: [(batch, start, end)]
    with the batch's tokens (prefill, shape (1, heads, tokens, dim)) or rows (decode, shape
    (rows, heads, 1, dim)) at [start, end). Each batch's queries, keys and values go back into its
    padded layout (zeros at the padding, which its mask hides), its KV cache is updated, and
    transformers' own SDPA function runs on them with the batch's own mask: what that batch's
    padded forward computes, at every real position."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {})
    before = local.get("sdpa")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, q, k, v, attention_mask, **kw):
        outs = []
        for b, s0, s1 in plan:
            if q.shape[2] > 1:  # prefill: one packed sequence -> (rows, heads, width, dim)
                n, w = len(b.idx), b.width

                def padded(x):
                    y = x.new_zeros(n * w, x.shape[1], x.shape[3])
                    y[b.dst] = x[0, :, s0:s1].transpose(0, 1)
                    return y.view(n, w, x.shape[1], x.shape[3]).transpose(1, 2)

                keys, values = b.cache.update(padded(k), padded(v), module.layer_idx)
                out, _ = sdpa(module, padded(q), keys, values, b.attn_mask, **kw)
                outs.append(out.reshape(n * w, *out.shape[2:])[b.dst])
            else:  # decode: one new token per row
                keys, values = b.cache.update(k[s0:s1], v[s0:s1], module.layer_idx)
                out, _ = sdpa(module, q[s0:s1], keys, values, b.attn_mask, **kw)
                outs.append(out)
        out = torch.cat(outs, dim=0)
        return (out.unsqueeze(0) if q.shape[2] > 1 else out), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        if before is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = before


def _grouped_greedy(model, tokenizer, rows, batches, max_new_tokens, stop, eos_ids, pad, device, ac,
                    prefill_tokens: int = 8192) -> dict[int, str]:
    """greedy_until for batches _groupable takes: every batch keeps the padded layout lm-eval
    gives it in attention (_attention_by_batch); everything else runs on the real tokens only and
    on all batches together: the prefills as packed sequences of up to prefill_tokens tokens, then
    one forward per step for the unfinished rows of every batch. A row that ends leaves, but each
    step keeps GROUPED_MIN_ROWS rows at least (ended ones, fed the pad token as in transformers'
    generate, fill up), so that no matrix product runs on fewer rows than the batches have."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    dtype = model.get_input_embeddings().weight.dtype
    # the padded forwards' own 4-D masks go to attention; this one only keeps the model from building one
    dummy = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    todo = [_Batch(rows, b, cfg, device) for b in batches]
    gen: dict[int, list[int]] = {i: [] for b in todo for i in b.idx}
    done: dict[int, bool] = {i: False for i in gen}
    nxt: dict[int, int] = {}
    k = 0
    while k < len(todo):  # prefill
        chunk, plan, t = [], [], 0
        while k < len(todo) and (not chunk or t + sum(len(rows[i]) for i in todo[k].idx) <= prefill_tokens):
            b = todo[k]
            b.attn_mask = b.causal_mask(cfg, b.width, dtype)
            n = sum(len(rows[i]) for i in b.idx)
            plan.append((b, t, t + n))
            chunk.append(b)
            t, k = t + n, k + 1
        order = [i for b in chunk for i in b.idx]
        ids = torch.tensor([[x for i in order for x in rows[i]]], device=device)
        pos = torch.cat([torch.arange(len(rows[i])) for i in order]).unsqueeze(0).to(device)
        last = (torch.tensor([len(rows[i]) for i in order]).cumsum(0) - 1).to(device)
        with ac(), _attention_by_batch(plan):
            logits = model(input_ids=ids, attention_mask=dummy, position_ids=pos, use_cache=False,
                           logits_to_keep=last).logits[0]
        nxt.update(zip(order, _greedy_pick(logits, order)))
    for step in range(max_new_tokens):
        for i in nxt:
            if not done[i]:
                done[i] = _take(gen[i], nxt[i], eos_ids, stop, tokenizer, True)
        held = [(b, j, i) for b in todo for j, i in enumerate(b.idx)]
        live = [x for x in held if not done[x[2]]]
        if not live or step == max_new_tokens - 1:
            break
        with_live = {id(b) for b, _, _ in live}  # fillers from batches that go on anyway come first
        ended = sorted((x for x in held if done[x[2]]), key=lambda x: id(x[0]) not in with_live)
        kept = {(id(b), j) for b, j, _ in live + ended[:max(0, GROUPED_MIN_ROWS - len(live))]}
        for b in todo:
            b.keep([j for j in range(len(b.idx)) if (id(b), j) in kept])
        todo = [b for b in todo if b.idx]
        plan, r = [], 0
        for b in todo:
            b.advance()
            b.attn_mask = b.causal_mask(cfg, 1, dtype)
            plan.append((b, r, r + len(b.idx)))
            r += len(b.idx)
        order = [i for b in todo for i in b.idx]
        ids = torch.tensor([[pad if done[i] else nxt[i]] for i in order], device=device)
        pos = torch.cat([b.pos for b in todo])
        with ac(), _attention_by_batch(plan):
            logits = model(input_ids=ids, attention_mask=dummy, position_ids=pos, use_cache=False,
                           logits_to_keep=1).logits[:, -1]
        nxt = dict(zip(order, _greedy_pick(logits, order)))
    return {i: cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), stop)[0] for i, g in gen.items()}


def greedy_until(model, tokenizer, rows: Sequence[Sequence[int]], batches: Sequence[Sequence[int]], *,
                 max_new_tokens: int, stop: Sequence[str] = (), eos_ids: Sequence[int] = (), pad: int | None = None,
                 autocast_dtype: torch.dtype | None = None) -> list[str]:
    """Greedy continuations of encoded prompts (see the module docstring), in the rows' order.

    batches: lists of row indices, each one left-padded batch as lm-eval's HFLM pads it (its width
    is its longest row; an attention mask only where there is padding). Every row's logits are the
    ones transformers' generate computes for it in that batch under the same autocast, bit for bit
    (tests/method/test_fast_generate.py). Each row decodes up to max_new_tokens tokens and ends at a token
    of eos_ids or when its text (decoded without special tokens) contains a stop string; the text
    is cut before the first stop string. The caller encodes and truncates the prompts (room for
    max_new_tokens within the model's length). autocast_dtype: the forwards' autocast (None: none)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if sorted(i for b in batches for i in b) != list(range(len(rows))):
        raise ValueError("batches must hold every row once")
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty generation prompt")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    def ac():
        return torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                              enabled=autocast_dtype is not None)

    eos_ids = set(eos_ids)
    big = [b for b in batches if len(b) >= GROUPED_MIN_ROWS] if _groupable(model, device, autocast_dtype) else []
    out: dict[int, str] = {}
    # one autocast region around everything: its cast copies of the weights are made once (transformers'
    # generate runs under lm-eval's autocast the same way, once per batch)
    with _eval_mode(model), ac():
        if big:
            out.update(_grouped_greedy(model, tokenizer, rows, big, max_new_tokens, stop, eos_ids, pad, device, ac))
        procs = _processors(False, 1.0, 0, 1.0, 1.0)
        for chunk in batches:
            if len(chunk) >= GROUPED_MIN_ROWS and big:
                continue
            texts = _decode_batch(model, tokenizer, [list(rows[i]) for i in chunk], max_new_tokens, stop, False, procs,
                                  None, eos_ids, pad, device, ac, fast=True, row_ids=list(chunk))
            out.update(zip(chunk, texts))
    return [out[i] for i in range(len(rows))]


def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int | None = None, autocast=None) -> list[float]:
    """sum log p(continuation | context) for each (context, continuation), as lm-eval scores it."""
    limit = context_limit(model, max_length)
    items = []
    for ctx, cont in pairs:
        c, t = encode_pair(tokenizer, ctx, cont)
        if not t:
            raise ValueError(f"empty continuation {cont!r}")
        whole = (c + t)[-(limit + 1):]
        items.append((whole[:-1], whole[-len(t):]))  # inputs, and the targets they predict at the end
    device = next(model.parameters()).device
    split = split_head(model)
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
        """The training documents, in the order of RunContext.pairs (clbench.data.tasks.training_examples)."""
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
