"""Evaluation: every task of the stream, one lm-eval `simple_evaluate` call, the live model.

An HFLM wraps the in-memory model (a PeftModel too); nothing is saved or reloaded.
HFLM calls model.eval() only when constructed, so we build a fresh wrapper per call
(cheap: no weights move) and put the model back in train mode afterwards.

Log-likelihood requests (multiple choice) go through `_PrefixSharingLM`, an HFLM whose
`_loglikelihood_tokens` runs every distinct context ONCE: a context and all its continuations
are packed into one sequence, each continuation attending to the context and to itself only
(a 4-D attention mask, position ids continuing after the context), and the LM head runs only
at the scored positions. lm-eval's own HFLM runs context + continuation once per choice
(6 choices: 6 passes over the same prompt) and the LM head at every position. The result is
the same log-likelihoods up to floating-point rounding (bf16 autocast on CPU: scores agreed
exactly with lm-eval's CLI on the demo tasks, see README "Performance"); requests it cannot
pack (too long for the model, a model without a separable decoder and head) take lm-eval's
path. CLBENCH_EVAL_PREFIX_SHARING=0 turns it off.

Greedy generation requests (generate_until) go through `_PrefixSharingLM.generate_until`, which
returns lm-eval's strings exactly: the same batches (lm-eval's grouping by generation kwargs, its
sort by length and batch size), the same token rows (its tokenizer call, left truncation to
max_length - max_gen_toks), the same stop rule (`until` plus the EOS string, the model's
generation-config EOS ids) and the same text (decoded without special tokens, cut at the first
`until`); clbench.method.generation.greedy_until decodes them with every row's logits bit for bit those
of transformers' generate in lm-eval's padded batch, under the same autocast, doing less work
(see its docstring and docs/performance.md "Generation tasks"). Sampling, other generation
kwargs or generation-config settings, thinking tokens, batch_size "auto" and seq2seq models take
lm-eval's path; CLBENCH_EVAL_FAST_GENERATE=0 turns it off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time

import torch

import clbench.data.tasks
from clbench.method import generation, prompting
from clbench.method.lm import split_head
from clbench.runtime import Runtime

_LM_CLASS = None


def lm_class():
    """HFLM with prefix-shared log-likelihoods (built lazily: lm_eval imports are slow)."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    import torch.nn.functional as F
    from lm_eval.models.huggingface import HFLM

    class _PrefixSharingLM(HFLM):
        # --- data-parallel evaluation: lm-eval's own rank/world-size support (its evaluator splits
        # every task's documents over the ranks, pads the request counts and gathers the per-document
        # metrics and samples to rank 0) over clbench's process group. HFLM handed a model instance
        # assumes one process ("custom distributed integration"); these give it the group.
        def use_process_group(self) -> None:
            import torch.distributed as dist

            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

        def all_gather(self, tensor):
            import torch.distributed as dist

            if self.world_size <= 1:
                return tensor
            parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst=0):
            """Gather to dst and put the documents back in one process's order (see
            one_process_order), so the aggregated scores and the samples files are those of one
            process, float for float."""
            import torch.distributed as dist

            if self.world_size <= 1:
                return [obj]
            got = [None] * self.world_size if self.rank == dst else None
            dist.gather_object(obj, got, dst=dst)
            return one_process_order(got) if self.rank == dst else None

        def barrier(self):
            import torch.distributed as dist

            if self.world_size > 1:
                dist.barrier()

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            split = split_head(self.model) if self.backend == "causal" else None
            if split is None or os.environ.get("CLBENCH_EVAL_PREFIX_SHARING", "1") == "0":
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            dec, head = split
            groups: dict[tuple, list[int]] = {}
            slow = []
            cut = prompting.needs_context(self.model)  # lm-eval's path cannot say where a context ends
            for i, (_, ctx, cont) in enumerate(requests):
                if cut and ctx and cont and len(ctx) + len(cont) > self.max_length + 1 and len(cont) <= self.max_length:
                    whole = (ctx + cont)[-(self.max_length + 1):]  # lm-eval's left truncation, packed here
                    groups.setdefault(tuple(whole[:-len(cont)]), []).append(i)
                elif len(ctx) + len(cont) > self.max_length + 1 or not ctx or not cont:
                    slow.append(i)  # lm-eval truncates these from the left: its own path
                else:
                    groups.setdefault(tuple(ctx), []).append(i)
            packed = []  # (context, [(request index, continuation)], packed length)
            for ctx, idx in groups.items():
                members = []
                for i in idx:
                    if members and len(ctx) + sum(len(c) - 1 for _, c in members) + len(requests[i][2]) - 1 > self.max_length:
                        packed.append((ctx, members))
                        members = []
                    members.append((i, requests[i][2]))
                packed.append((ctx, members))
            packed.sort(key=lambda g: -(len(g[0]) + sum(len(c) - 1 for _, c in g[1])))
            res: list = [None] * len(requests)
            bs = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 32
            b0 = 0
            while b0 < len(packed):  # longest first; the (B, L, L) mask is capped at ~8M entries
                L = len(packed[b0][0]) + sum(len(c) - 1 for _, c in packed[b0][1])
                n = max(1, min(bs, (1 << 23) // (L * L)))
                self._score_packed(packed[b0:b0 + n], dec, head, res, F)
                b0 += n
            if slow:
                for i, r in zip(slow, super()._loglikelihood_tokens([requests[i] for i in slow], disable_tqdm=True,
                                                                      override_bs=override_bs)):
                    res[i] = r
            return res

        def _score_packed(self, batch, dec, head, res, F):
            lens = [len(ctx) + sum(len(c) - 1 for _, c in members) for ctx, members in batch]
            B, L = len(batch), max(lens)
            ids = torch.zeros((B, L), dtype=torch.long)
            pos = torch.zeros((B, L), dtype=torch.long)
            mask = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1)  # padding attends to itself only
            rows_b, rows_t, spans = [], [], []  # scored (batch row, position); per request its rows and tokens
            for b, (ctx, members) in enumerate(batch):
                c = len(ctx)
                ids[b, :c] = torch.tensor(ctx)
                pos[b, :c] = torch.arange(c)
                mask[b, :c, :c] = torch.ones(c, c, dtype=torch.bool).tril_()
                s = c
                for i, cont in members:
                    m = len(cont) - 1  # the continuation's last token is predicted, never fed
                    if m:
                        ids[b, s:s + m] = torch.tensor(cont[:-1])
                        pos[b, s:s + m] = torch.arange(c, c + m)
                        mask[b, s:s + m, :c] = True
                        mask[b, s:s + m, s:s + m] = torch.ones(m, m, dtype=torch.bool).tril_()
                    first = len(rows_t)
                    rows_b += [b] * (m + 1)
                    rows_t += [c - 1] + list(range(s, s + m))
                    spans.append((i, first, cont))
                    s += m
            dev = self.device
            with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None), \
                    prompting.context_lengths(self.model, [len(ctx) for ctx, _ in batch]):
                h = dec(input_ids=ids.to(dev), attention_mask=mask[:, None].to(dev), position_ids=pos.to(dev),
                        use_cache=False).last_hidden_state
                logits = head(h[torch.tensor(rows_b, device=dev), torch.tensor(rows_t, device=dev)])
            logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            greedy = logp.argmax(dim=-1)
            for i, first, cont in spans:
                t = torch.tensor(cont, dtype=torch.long, device=dev)
                lp = logp[first:first + len(cont)].gather(1, t[:, None])
                res[i] = (float(lp.sum()), bool((greedy[first:first + len(cont)] == t).all()))

        def generate_until(self, requests, disable_tqdm: bool = False):
            if os.environ.get("CLBENCH_EVAL_FAST_GENERATE", "1") == "0" or not _fast_generate_ok(self) or not requests:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            from lm_eval.models.utils import Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs

            # lm-eval's own grouping (by generation kwargs), order and batches
            collator = Collator([(*r.args, i) for i, r in enumerate(requests)],
                                sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]), group_by="gen_kwargs",
                                group_fn=lambda x: x[1])
            groups: dict[str, tuple[dict, list[list[int]]]] = {}
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                kw = chunk[0][1]
                groups.setdefault(repr(kw), (kw, []))[1].append([x[2] for x in chunk])
            res: list = [None] * len(requests)
            slow: list[int] = []
            eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
            eos_ids = self.model.generation_config.eos_token_id
            eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
            for gen_kwargs, batches in groups.values():
                idx = [i for b in batches for i in b]
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks) if isinstance(gen_kwargs, dict) else None
                if (kwargs is None or set(kwargs) - _GREEDY_KEYS or kwargs.get("do_sample")
                        or float(kwargs.get("temperature") or 0.0) != 0.0):
                    slow += idx
                    continue
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen_toks = int(kwargs.pop("max_gen_toks"))
                max_ctx_len = self.max_length - max_gen_toks
                assert max_ctx_len > 0, (f"Invalid configuration: requested max tokens to generate ({max_gen_toks}) must "
                                         f"be less than model's maximum sequence length ({self.max_length}).")
                rows: dict[int, list[int]] = {}
                for b in batches:  # tok_batch_encode: special tokens chosen from the batch's first context
                    ctxs = [requests[i].args[0] for i in b]
                    special = {}
                    if has_bos_prefix(ctxs[0], getattr(self.tokenizer, "bos_token", None)):
                        special = {"add_special_tokens": False}
                    elif self.add_bos_token is not None:
                        special = {"add_special_tokens": self.add_bos_token}
                    for i, e in zip(b, self.tokenizer(ctxs, truncation=self.truncation, **special)["input_ids"]):
                        rows[i] = list(e)[-max_ctx_len:]
                if any(not rows[i] for i in idx):
                    slow += idx
                    continue
                local = {i: k for k, i in enumerate(idx)}  # request index -> row of this group
                texts = generation.greedy_until(
                    self.model, self.tokenizer, [rows[i] for i in idx], [[local[i] for i in b] for b in batches],
                    max_new_tokens=max_gen_toks, stop=until, eos_ids=eos_ids, pad=self.tokenizer.pad_token_id,
                    autocast_dtype=self.mixed_precision_dtype)
                for i in idx:
                    res[i] = texts[local[i]]
                    self.cache_hook.add_partial("generate_until", requests[i].args, res[i])
            if slow:
                for i, r in zip(slow, super().generate_until([requests[i] for i in slow], disable_tqdm=True)):
                    res[i] = r
            return res

    _LM_CLASS = _PrefixSharingLM
    return _LM_CLASS


# generation kwargs the fast path takes (after lm-eval's normalisation: until, a token limit, greedy)
_GREEDY_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}
# generation-config fields that do not change greedy decoding under lm-eval's call of model.generate
# (it passes do_sample, max_length and pad_token_id; sampling settings are unused when do_sample is off)
_NEUTRAL_GEN_CONFIG = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample", "temperature",
                       "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "max_length",
                       "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                       "return_dict_in_generate", "_from_model_config", "transformers_version", "use_cache",
                       "num_return_sequences", "length_penalty", "early_stopping"}


def one_process_order(per_rank: list[dict]) -> list[dict]:
    """lm-eval's evaluator gathers, per task, each rank's per-document values and chains them rank
    after rank; rank r scored the documents r, r + W, r + 2W, ... (its doc_iterator's islice). This
    returns W objects whose chain is one process's order instead: the first holds every document in
    order, the others are empty. Two shapes are gathered: {task: {(metric, filter): [value per
    document]}} (interleaved back) and {task: [sample record]} (sorted back by filter, then doc_id,
    the order one process logs them in). Written by hand: lm-eval concatenates by rank, which
    changes the order of floating-point sums (bits per byte) and of the samples files."""
    W = len(per_rank)
    first, rest = {}, [{} for _ in range(W - 1)]
    for task in per_rank[0]:
        parts = [p[task] for p in per_rank]
        if isinstance(parts[0], dict):
            merged = {}
            for key in parts[0]:
                lists = [p[key] for p in parts]
                n = sum(len(x) for x in lists)
                merged[key] = [lists[i % W][i // W] for i in range(n)]
            first[task] = merged
            for r in rest:
                r[task] = {key: [] for key in parts[0]}
        else:
            records = [x for p in parts for x in p]
            filters = list(dict.fromkeys(x.get("filter") for x in records))
            first[task] = sorted(records, key=lambda x: (filters.index(x.get("filter")), x["doc_id"]))
            # lm-eval evens the ranks' request counts by running a rank's last request again, whose
            # responses it appends to that request: keep each request's own `repeats` responses (the
            # fewest any request of the task has), as one process logs them
            lens = [len(r) for x in records for r in x.get("resps", []) if isinstance(r, list)]
            if lens:
                k = min(lens)
                for x in records:
                    if "resps" in x:
                        x["resps"] = [r[:k] if isinstance(r, list) else r for r in x["resps"]]
            for r in rest:
                r[task] = []
    return [first, *rest]


def _fast_generate_ok(lm) -> bool:
    """Whether lm's model.generate would be plain greedy search with a KV cache (what
    clbench.method.generation.greedy_until reproduces); otherwise lm-eval's own generate_until runs."""
    if lm.backend != "causal" or getattr(lm, "think_end_token", None) is not None or not isinstance(lm.batch_size, int):
        return False
    model = lm.model
    peft = getattr(model, "active_peft_config", None)
    if peft is not None and getattr(peft, "is_prompt_learning", False):
        return False
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return False
    diff = cfg.to_diff_dict()
    if set(diff) - _NEUTRAL_GEN_CONFIG or diff.get("use_cache", True) is False or diff.get("num_return_sequences", 1) != 1:
        return False
    return lm.tokenizer.pad_token_id is not None


def _score(results: dict, task: str, metric: str, filt: str) -> float:
    res = results["results"][task]
    key = f"{metric},{filt}"
    if key not in res:
        avail = sorted(k for k in res if "," in k and not k.split(",")[0].endswith("_stderr"))
        raise KeyError(f"task {task!r}: lm-eval returned no {key!r}; it returned {avail}")
    return float(res[key])


@contextlib.contextmanager
def without_env_info():
    """simple_evaluate collects environment info (torch's collect_env, `pip list` and git
    subprocesses: ~0.6 s per call) into its result, and its `git describe` prints "fatal: not a
    git repository" at every evaluation of a run outside one; results.json records versions and
    the git sha once, so clbench's evaluations skip both."""
    from lm_eval import evaluator

    env_info, git_hash = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info = lambda *a, **k: None
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = env_info, git_hash


def evaluate(model, tokenizer, lm_tasks: dict, primary: dict[str, tuple[str, str]], rt: Runtime, *, batch_size,
             limit=None, seed: int = 0, bootstrap_iters: int = 0, log_samples: bool = True, max_length: int | None = None,
             task_limits: dict[str, int | None] | None = None, apply_chat_template: bool = False, system_instruction: str | None = None, data_parallel: bool = False):
    """Scores on the runtime `rt`'s device and autocast. Returns (scores {task: value}, samples
    {task: [records]} or {}, seconds); with data_parallel
    (every rank of the process group calls it, each with the whole model) the documents are split
    over the ranks and rank 0 gets the scores and samples of one process; the others get (None, {}, s).

    apply_chat_template, system_instruction: lm-eval's own (the run's `chat_template` and
    `system_instruction`; few-shot turns as separate messages, lm-eval's default).

    task_limits: a smaller limit for some tasks (off-diagonal cells on a subset); the
    first n test documents of the task are used, the same ones at every stage."""
    from lm_eval import evaluator

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = lm_class()(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(rt.device),
        mixed_precision_dtype=rt.autocast_dtype,
        max_length=max_length,
    )
    if data_parallel:
        lm.use_process_group()
    # lm-eval draws a progress bar per request type; they would drown the run's own progress.
    sink = contextlib.nullcontext() if os.environ.get("CLBENCH_VERBOSE_EVAL") else contextlib.redirect_stderr(io.StringIO())
    per_task = None
    if task_limits and any(task_limits.get(t, limit) != limit for t in lm_tasks):
        per_task = {}
        for t, task in lm_tasks.items():
            n = len(task.eval_docs)
            cap = task_limits.get(t, limit)
            per_task[t] = list(range(min(n, cap) if cap else n))
    with without_env_info(), torch.no_grad(), sink:
        out = evaluator.simple_evaluate(
            model=lm,
            tasks=list(lm_tasks.values()),
            limit=None if per_task else limit,
            samples=per_task,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            apply_chat_template=apply_chat_template,
            system_instruction=system_instruction,
            verbosity="ERROR",
            task_manager=clbench.data.tasks.task_manager(),  # one without lm-eval's index (~7 s per call otherwise)
        )
    if was_training:
        model.train()
    if out is None:  # a rank other than 0 of a data-parallel evaluation
        return None, {}, time.perf_counter() - t0
    scores = {t: _score(out, t, *primary[t]) for t in lm_tasks}
    samples = out.get("samples", {}) if log_samples else {}
    return scores, samples, time.perf_counter() - t0
