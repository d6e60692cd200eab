"""SSR, Self-Synthesized Rehearsal (Huang et al. 2024, arXiv 2403.01244, ACL 2024; code
DeepLearnXMU/SSR).

Idea: rehearsal without keeping real data. The base model writes new instances of a task
from in-context demonstrations, the model that has just learnt the task answers them, and a
small, diverse selection of these synthetic instances is trained on again in every later stage.

The rule, for each task t of the stream but the last (its set would never be trained on):
1. Synthesis with the base model theta_0: `n_demos` demonstrations of task t (a seeded sample
   of its training pairs) give one ICL prompt per ordered `n_shots`-tuple of them
   (custom/icl_gen/complete_param_nic010_cate.py:55-68, `times`):
       "Input: <context 1>\\nOutput: <target 1>\\n\\nInput: <context 2>\\nOutput: <target 2>\\n\\nInput:"
   (context: the task's rendered prompt, which carries the task's description when it has
   one, standing for the paper's definition line; target: the answer without delimiter and
   EOS). The base model samples `samples_per_prompt` continuations of each, and the text is
   split as the authors' parser does (custom/icl_gen/parser.py): on "Input:", each piece on
   "Output:"; a piece with exactly one "Output:" gives its stripped input, a piece without one
   only with `keep_unfinished` (the authors' save_more); empty inputs are dropped, repeated
   ones kept once. The outputs written by theta_0 are discarded: step 3 answers anew.
2. Selection of at most `per_task` synthetic inputs. "kmeans" (default): KMeans with
   `n_clusters` on L2-normalised embeddings, per-cluster quotas proportional to cluster size,
   the inputs nearest to their centroid first (custom/icl_gen/kmeans_self.py:58-82). The paper
   embeds with SimCSE (sup-simcse-roberta-base), which is not available offline; the substitute
   is the base model's own final hidden states (after its last norm) averaged over the input's
   tokens. Quotas are rounded by largest remainder so they sum to exactly per_task (the
   authors' round() can exceed it by a few). "random": a seeded sample.
3. Refinement at the end of stage t with the model theta_t that has just learnt task t (the
   model stage_end hands to evaluation): generation tasks are answered by greedy decoding with
   the task's own `until` and max_gen_toks (label_param.py decodes greedily), the target being
   the continuation + EOS as every clbench generation target; multiple-choice tasks by scoring
   the task's choices as lm-eval does (the argmax of the log-likelihoods: its `acc`
   prediction), the target being target_delimiter + the choice (an adaptation: the paper's
   tasks are all generation). A multiple-choice task whose choices differ between documents
   has no choice list for an invented input and is refused at setup.
4. Every later stage trains on its task's examples followed by every earlier task's synthetic
   set (stage_examples extends the stage's training set, as the paper concatenates the data;
   with `epochs` the stage is longer by as much, with `steps` the mixture is sampled).
   A task's set is fixed once stored: nothing relabels it later.

How it maps onto clbench:
- setup: steps 1 and 2 for every task but the last, on the model setup receives (theta_0, before
  a base method's setup), so no copy of the base model is kept. A resumed run calls setup again
  and repeats them: the same prompts, the same seeded draws, the same selection (greedy or
  seeded; the cost is paid again). Sampling draws come from a generator seeded by the run seed
  and the task's position in the stream.
- stage_end: step 3 for the stage's task; stage_examples: step 4.
- state_dict: the finished tasks' synthetic sets (strings and token ids) and the stats; never
  model weights.
- Stats (`self.stats[task]`): prompts, samples, parsed inputs, distinct inputs, selected.
- base (optional): wrap another method for the training (the paper continues one LoRA adapter,
  r 8, dropout 0.1, on q,v: `base: lora`, `base_options: {r: 8, dropout: 0.1,
  target_modules: [q_proj, v_proj]}`); without one every parameter trains.

Options (defaults and sources):
  n_demos 20, n_shots 2   demonstrations per task and per prompt: 20 x 19 = 380 prompts
                          (complete_param_nic010_cate.py:55 with cate_task_style False; ori.sh)
  samples_per_prompt 3    do_sample_retries 3 x num_return_sequences 1 (ori.sh)
  temperature 0.9, top_p 0.6, repetition_penalty 1.2   ori.sh (scripts-ni-c012/llama2-7b; the
                          script's own default for the penalty is 1.0). On SmolLM2-135M-Instruct
                          the 1.2 penalty breaks the repeated template (seen on tiny_parity: 1 of 6
                          samples parsed at 1.2, 6 of 6 with two inputs each at 1.0)
  top_k 50                transformers' generation default, which the authors' pipeline call
                          inherits (it passes no top_k)
  max_new_tokens 256      unconfirmed: the authors cap prompt + continuation at 2048 tokens
  keep_unfinished false   the authors' save_more (true only for their alpaca-7b runs)
  per_task 200, n_clusters 20   kmeans_self.py:7-8
  selection "kmeans"      or "random" (see step 2)
  batch_size 8            prompts per generation batch (a cost setting; sampled text depends on it)
  base, base_options      none: full fine-tuning
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.data.examples import Example
from clbench.method import MethodError, register
from clbench.method import generation
from clbench.method import wrapping
from clbench.method.masking import derive_seed

log = logging.getLogger(__name__)

SALT_DEMOS, SALT_SAMPLE, SALT_SELECT = 51, 52, 53


class SsrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_demos: int = Field(20, ge=1, description="demonstrations of a task the prompts are built from")
    n_shots: int = Field(2, ge=1, description="demonstrations per prompt")
    samples_per_prompt: int = Field(3, ge=1)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.6, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.2, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    keep_unfinished: bool = Field(False, description="keep a generated input that has no 'Output:' after it")
    per_task: int = Field(200, gt=0, description="synthetic instances kept per task")
    n_clusters: int = Field(20, gt=0)
    selection: Literal["kmeans", "random"] = "kmeans"
    batch_size: int = Field(8, gt=0, description="prompts per generation batch")
    base: wrapping.BaseName = wrapping.BASE_FIELD
    base_options: wrapping.BaseOptions = wrapping.BASE_OPTIONS_FIELD


def icl_prompt(demos: list[tuple[str, str]]) -> str:
    """The authors' prompt (without their definition line): the demonstrations as Input/Output
    blocks, then an open "Input:"."""
    return "".join(f"Input: {x}\nOutput: {y}\n\n" for x, y in demos) + "Input:"


def parse(text: str, keep_unfinished: bool) -> list[str]:
    """The inputs in a continuation of an ICL prompt, split as custom/icl_gen/parser.py does."""
    out = []
    for piece in text.split("Input:"):
        parts = piece.split("Output:")
        if len(parts) == 2 or (keep_unfinished and len(parts) == 1):
            x = parts[0].strip()
            if x:
                out.append(x)
    return out


def quotas(sizes: list[int], total: int) -> list[int]:
    """Per-cluster counts proportional to the cluster sizes, summing to min(total, sum(sizes)):
    floors first, the remaining units to the largest remainders (ties: the lower cluster)."""
    n = sum(sizes)
    if total >= n:
        return list(sizes)
    exact = [total * s / n for s in sizes]
    q = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - q[i]), i))
    for i in order[:total - sum(q)]:
        q[i] += 1
    return q


def kmeans_select(emb: np.ndarray, n: int, n_clusters: int, seed: int) -> list[int]:
    """Indices of at most n rows: KMeans on the L2-normalised rows, per-cluster quotas, nearest
    to the centroid first, cluster by cluster (custom/icl_gen/kmeans_self.py)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if len(emb) <= n:
        return list(range(len(emb)))
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    k = min(n_clusters, len(emb))
    with threadpool_limits(limits=1):  # a few hundred points: one thread is enough, and the result cannot depend on the count
        km = KMeans(n_clusters=k, n_init="auto", random_state=seed % (2**32)).fit(emb)
    labels = km.labels_
    dist = np.linalg.norm(emb - km.cluster_centers_[labels], axis=1)
    q = quotas([int((labels == c).sum()) for c in range(k)], n)
    chosen = []
    for c in range(k):
        members = np.where(labels == c)[0]
        chosen.extend(int(members[j]) for j in np.argsort(dist[members], kind="stable")[:q[c]])
    return chosen


def mean_hidden(model, tokenizer, texts: list[str], batch_size: int = 16, autocast=None) -> np.ndarray:
    """The model's final hidden states (after its last norm) averaged over each text's tokens."""
    import contextlib

    from clbench.method.lm import split_head

    split = split_head(model)
    device = next(model.parameters()).device
    ac = autocast or contextlib.nullcontext
    rows = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b0 in range(0, len(texts), batch_size):
                enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[b0:b0 + batch_size]]
                ids, mask = generation.right_padded(enc, device)
                with ac():
                    if split is not None:
                        h = split[0](input_ids=ids, attention_mask=mask).last_hidden_state
                    else:
                        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                m = mask.unsqueeze(-1).to(torch.float32)
                rows.append(((h.float() * m).sum(1) / m.sum(1)).cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(rows)


@register("ssr")
class Ssr(wrapping.Wrapping):
    Options = SsrOptions

    def __init__(self, options: SsrOptions):
        super().__init__(options)
        self.run = None
        self.candidates: dict[str, list[str]] = {}  # task -> selected synthetic inputs (from theta_0)
        self.synthetic: dict[str, list[tuple[str, str]]] = {}  # finished task -> (context, target) strings
        self.examples: dict[str, list[Example]] = {}  # finished task -> their tokenized examples
        self.stats: dict[str, dict] = {}
        self.last_prompts: dict[str, list[str]] = {}  # task -> its ICL prompts (inspection)

    # --- setup: synthesis and selection with the base model ---------------------------------

    def setup(self, model, run):
        self.run = run
        if run.task is None or run.pairs is None or run.tokenize is None:
            raise MethodError("ssr needs the loop's RunContext (task, pairs, tokenize)")
        for i, task in enumerate(run.tasks[:-1]):
            view = generation.TaskView(run.task(task))
            if view.multiple_choice and view.fixed_choices() is None:
                raise MethodError(f"ssr: task {task!r} is multiple choice with choices that differ between documents; "
                                  "a synthetic input has no choice list to be answered from")
            self.candidates[task] = self._synthesize(model, task, i + 1, view)
        return super().setup(model, run)

    def _synthesize(self, model, task: str, position: int, view) -> list[str]:
        o, run = self.options, self.run
        pairs = run.pairs(task)
        rng = random.Random(derive_seed(run.seed, position, SALT_DEMOS))
        demos = rng.sample(pairs, min(o.n_demos, len(pairs)))
        eos = run.tokenizer.eos_token or ""
        shown = []
        for ctx, target in demos:
            y = target[len(view.delimiter):] if target.startswith(view.delimiter) else target
            shown.append((ctx, (y[:-len(eos)] if eos and y.endswith(eos) else y).strip()))
        limit = generation.context_limit(model, None) - o.max_new_tokens
        prompts = []
        for combo in itertools.permutations(range(len(shown)), min(o.n_shots, len(shown))):
            p = icl_prompt([shown[j] for j in combo])
            if len(run.tokenizer(p, add_special_tokens=False)["input_ids"]) < limit:  # the authors skip long prompts
                prompts.append(p)
        self.last_prompts[task] = prompts
        texts = generation.generate(model, run.tokenizer, prompts, max_new_tokens=o.max_new_tokens, do_sample=True,
                           temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                           repetition_penalty=o.repetition_penalty, num_return_sequences=o.samples_per_prompt,
                           seed=derive_seed(run.seed, position, SALT_SAMPLE), batch_size=o.batch_size,
                           autocast=run.autocast) if prompts else []
        parsed = [x for samples in texts for s in samples for x in parse(s, o.keep_unfinished)]
        distinct = list(dict.fromkeys(parsed))
        seed = derive_seed(run.seed, position, SALT_SELECT)
        if o.selection == "kmeans" and len(distinct) > o.per_task:
            idx = kmeans_select(mean_hidden(model, run.tokenizer, distinct, autocast=run.autocast), o.per_task,
                                o.n_clusters, seed)
        elif len(distinct) > o.per_task:
            idx = random.Random(seed).sample(range(len(distinct)), o.per_task)
        else:
            idx = list(range(len(distinct)))
        chosen = [distinct[j] for j in idx]
        self.stats[task] = {"prompts": len(prompts), "samples": len(prompts) * o.samples_per_prompt,
                            "parsed": len(parsed), "distinct": len(distinct), "selected": len(chosen)}
        log.info("ssr %s: %d prompts, %d parsed inputs (%d distinct), %d selected", task, len(prompts), len(parsed),
                 len(distinct), len(chosen))
        return chosen

    # --- stages ---------------------------------------------------------------------------

    def stage_examples(self, model, stage):
        own = self._inner("stage_examples", model, stage)
        rehearsal = [ex for task in self.run.tasks if task in self.examples for ex in self.examples[task]]
        if not rehearsal:
            return own
        return list(own if own is not None else stage.examples) + rehearsal

    def stage_end(self, model, stage):
        model = super().stage_end(model, stage)
        task = stage.task
        if task in self.candidates and task not in self.synthetic:
            self._refine(model, task)
        return model

    def _refine(self, model, task: str) -> None:
        run = self.run
        view = generation.TaskView(run.task(task))
        inputs = self.candidates[task]
        if not inputs:
            pairs = []
        elif view.multiple_choice:
            choices = view.fixed_choices()
            best = generation.choose(model, run.tokenizer, inputs, [choices] * len(inputs), view.delimiter,
                            batch_size=self.options.batch_size, autocast=run.autocast)
            pairs = [(x, f"{view.delimiter}{choices[b]}") for x, b in zip(inputs, best)]
        else:
            outs = generation.generate(model, run.tokenizer, inputs, max_new_tokens=view.max_gen_toks, stop=view.until,
                              batch_size=self.options.batch_size, autocast=run.autocast)
            eos = run.tokenizer.eos_token or ""
            pairs = [(x, f"{y[0]}{eos}") for x, y in zip(inputs, outs)]
        self.synthetic[task] = pairs
        self.examples[task] = run.tokenize(pairs) if pairs else []

    # --- resume ---------------------------------------------------------------------------

    def fsdp_refusal(self):
        # the synthetic pairs are generated on the gathered model (clbench.method.generation under
        # fsdp.unsharded), the same on every rank; sharded it is its base method's (tests/distributed/test_fsdp_methods.py)
        return self._inner("fsdp_refusal")

    def state_dict(self):
        return {"synthetic": {t: [list(p) for p in ps] for t, ps in self.synthetic.items()},
                "examples": {t: [(ex.input_ids, ex.n_prompt) for ex in exs] for t, exs in self.examples.items()},
                "stats": self.stats, "base": self._base_state()}

    def load_state_dict(self, state):
        self.synthetic = {t: [tuple(p) for p in ps] for t, ps in (state.get("synthetic") or {}).items()}
        self.examples = {t: [Example(list(ids), int(n)) for ids, n in exs]
                         for t, exs in (state.get("examples") or {}).items()}
        self.stats = {**self.stats, **(state.get("stats") or {})}
        self._load_base_state(state.get("base"))
