"""LAMOL, language modeling for lifelong language learning (Sun, Ho & Lee, ICLR 2020,
arXiv 1909.03329; code chho33/LAMOL).

Idea: one language model both solves the tasks and learns to generate them. Every training
example (context, answer) is also trained as text to generate, behind a generation token:

    task loss:  answer given context                       (the stream's own objective)
    LM loss:    lambda * NLL( context ANS answer EOS | GEN )   (every token after GEN)

and before each new task the model writes pseudo-examples of the earlier tasks by sampling from
GEN; those it can parse ("context ANS answer") join the new task's training set, so the earlier
tasks are rehearsed without keeping any of their data.

How it runs here:
- The markers are text, not new vocabulary: GEN is "__gen__" (or, with task_tokens, "__<task>__",
  the paper's task-specific tokens), ANS is "__ans__". The authors add them as special tokens,
  which resizes the embedding; plain text keeps every model's shapes (checkpoints, task vectors,
  merges) and costs a few tokens per marker.
- The LM sequence of an example is built from its token ids: marker ids + the context's ids +
  ANS ids + the answer's ids (+ EOS when the answer does not end with it); loss on every token
  after the marker. `batch` keeps the micro-batch's examples, `extra_loss` adds lambda times the
  token-mean LM loss over their LM sequences (the authors' loss = QA loss + lm_lambda * LM loss).
- Pseudo-examples (stage_examples, stages 2..T): N = ceil(gamma * |the new task's training set|)
  samples from the model as the previous stage left it, drawn with top-k sampling (k 20,
  temperature 1) from the marker until EOS, at most train.max_length tokens (the authors'
  create_extra_data); with task_tokens each earlier task gets N // (t - 1) of them (the authors
  drop the remainder), at least one. A sample is kept when its text holds exactly one ANS with
  a non-empty context before it and a non-empty answer after it; it becomes a training example
  (context, answer), the answer followed by EOS where the task is a generation task (as every
  clbench generation target). The draws come from a generator seeded by the run seed and the
  stage: the same on every process, and a resumed run (same weights) writes the same samples.
- The pseudo-examples of a stage are not stored: each stage writes its own from the current
  model, as the paper does (stage t rehearses tasks 1..t-1 with samples written after stage t-1).
- task_tokens false (the authors' default): one GEN marker for all tasks. A sample then has no
  task, so the stream must have one output type (all generation or all multiple choice),
  refused at setup otherwise.
- Several processes: each rank's LM loss is the token mean of its share of the batch and the
  ranks' losses are averaged, not weighted by their token counts, so the numbers depend on the
  number of processes (declared).

Options (defaults and sources):
  gamma 0.2          pseudo-samples as a fraction of the new task's training set: the paper's
                     LAMOL_0.2 (its main results); the code's default is 0.05 (settings.py).
  lm_lambda 0.25     weight of the LM loss (settings.py, --lm_lambda; the paper's lambda).
  top_k 20           top-k sampling of pseudo-examples (settings.py, --top_k_lm).
  task_tokens true   task-specific markers (the paper's best, LAMOL^TASK; the code's flag
                     --add_task_tokens is off by default): clbench needs a sample's task to
                     render its answer (EOS for generation tasks).
  batch_size 8       sampled sequences per generation batch (a cost setting; the samples depend on it).
Every parameter trains (the authors fine-tune GPT-2 fully).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.data.examples import Example, collate
from clbench.method import Method, MethodError, StageMeans, register
from clbench.method import generation
from clbench.method.lm import lm_loss
from clbench.method.masking import derive_seed

GEN, ANS = "__gen__", "__ans__"
SALT_SAMPLE = 41


class LamolOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(0.2, ge=0, description="pseudo-examples per stage as a fraction of the new task's training set")
    lm_lambda: float = Field(0.25, ge=0, description="weight of the LM loss on context ANS answer")
    top_k: int = Field(20, ge=1, description="top-k sampling of pseudo-examples")
    task_tokens: bool = Field(True, description="a marker per task (__<task>__) instead of one __gen__")
    batch_size: int = Field(8, ge=1, description="sequences per generation batch")
    max_new_tokens: Optional[int] = Field(None, gt=0, description="longest pseudo-example (none: train.max_length)")


def parse_sample(text: str) -> tuple[str, str] | None:
    """(context, answer) of a generated sample "context ANS answer", or None: exactly one ANS with
    something other than whitespace on both sides."""
    parts = text.split(ANS)
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        return None
    return parts[0], parts[1]


@register("lamol")
class LAMOL(Method):
    Options = LamolOptions

    def __init__(self, options: LamolOptions):
        self.options = options
        self.run = None
        self._ids: dict[str, list[int]] = {}
        self._task_of: dict[tuple, str] = {}  # a pseudo-example's token ids -> its task
        self._current: list[Example] = []
        self._means = StageMeans()
        self.last_samples: list[tuple[str, str]] = []  # (task, generated text) of the latest stage (inspection)

    def marker(self, task: str) -> str:
        return f"__{task}__" if self.options.task_tokens else GEN

    def _tok(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.run.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[text]

    def setup(self, model, run):
        if run.tokenizer is None or run.task is None or run.tokenize is None:
            raise MethodError("lamol needs the loop's RunContext (tokenizer, task, tokenize)")
        self.run = run
        if not self.options.task_tokens:
            kinds = {run.task(t).OUTPUT_TYPE for t in run.tasks}
            if len(kinds) > 1:
                raise MethodError(f"lamol with task_tokens: false writes samples without a task, so the stream must "
                                  f"have one output type; it has {sorted(kinds)}: set task_tokens: true")
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def world_size_dependent(self):
        return ("its LM loss is each rank's token mean over its share of the batch, averaged over the ranks "
                "(not weighted by their token counts)")

    def fsdp_refusal(self):
        # pseudo-samples are generated on the gathered model (clbench.method.generation under fsdp.unsharded),
        # the same on every rank; it depends on N as under ddp, and at N sharded processes equals N
        # replicated ones (tests/distributed/test_fsdp_methods.py)
        return None

    # --- the LM objective ---------------------------------------------------------------

    def lm_example(self, ex: Example, task: str) -> Example:
        """marker + context + ANS + answer (+ EOS): loss on every token after the marker."""
        eos = self.run.tokenizer.eos_token_id
        head = self._tok(self.marker(task))
        ids = head + list(ex.input_ids[:ex.n_prompt]) + self._tok(ANS) + list(ex.input_ids[ex.n_prompt:])
        if eos is not None and ids[-1] != eos:
            ids.append(eos)
        return Example(ids, len(head))

    def batch(self, examples, stage):
        self._current = list(examples)
        return None

    def extra_loss(self, model, batch, stage, out):
        if not self.options.lm_lambda or not self._current:
            return None
        seqs = [self.lm_example(ex, self._task_of.get(tuple(ex.input_ids), stage.task)) for ex in self._current]
        limit = stage.train_config.max_length
        seqs = [Example(e.input_ids[:limit], e.n_prompt) for e in seqs if e.n_prompt < min(limit, len(e.input_ids))]
        if not seqs:
            return None
        pad = self.run.tokenizer.pad_token_id if self.run.tokenizer.pad_token_id is not None else 0
        lm = {k: v.to(batch["input_ids"].device) for k, v in collate(seqs, pad).items()}
        with stage.autocast():
            loss = lm_loss(model, lm, getattr(stage.train_config, "head_only_targets", True))
        term = self.options.lm_lambda * loss
        self._means.add("lm_share", StageMeans.share(term, out.loss))
        return term

    # --- pseudo-examples ------------------------------------------------------------------

    def stage_examples(self, model, stage):  # the stage's first hook (clbench.training.stage.start_stage)
        self._means.reset()
        self._task_of = {}
        done = self.run.tasks[: self.run.tasks.index(stage.task)] if stage.task in self.run.tasks else []
        if not done or not self.options.gamma:
            self.last_samples = []
            return None
        o = self.options
        n = math.ceil(o.gamma * len(stage.examples))
        if o.task_tokens:
            per = max(1, n // len(done))
            wanted = [(t, per) for t in done]
        else:
            wanted = [(None, n)]
        gen = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, SALT_SAMPLE))
        limit = o.max_new_tokens or stage.train_config.max_length
        pairs, tasks, samples = [], [], []
        for task, k in wanted:
            marker = self.marker(task) if task else GEN
            texts = generation.generate(model, self.run.tokenizer, [marker] * k, max_new_tokens=limit, do_sample=True,
                               top_k=o.top_k, generator=gen, batch_size=o.batch_size, autocast=self.run.autocast)
            for (text,) in texts:
                owner = task or done[-1]
                samples.append((owner, text))
                got = parse_sample(text)
                if got is None:
                    continue
                ctx, answer = got
                if self.run.task(owner).OUTPUT_TYPE == "generate_until":
                    answer += self.run.tokenizer.eos_token or ""
                pairs.append((ctx, answer))
                tasks.append(owner)
        self.last_samples = samples
        pseudo = self.run.tokenize(pairs) if pairs else []
        self._task_of = {tuple(ex.input_ids): t for ex, t in zip(pseudo, tasks)}
        self._means.add("pseudo_requested", float(sum(k for _, k in wanted)))
        self._means.add("pseudo_kept", float(len(pseudo)))
        return list(stage.examples) + pseudo

    def stage_stats(self, stage):
        """pseudo_requested / pseudo_kept: the stage's pseudo-examples sampled and parsed into training
        examples; lm_share: the weighted LM loss as a share of the task loss (mean over micro-batches)."""
        return self._means.means()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
