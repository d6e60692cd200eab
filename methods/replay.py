"""Experience replay: a small buffer of earlier tasks' examples mixed into later batches.

Episodic memory as in Chaudhry et al. 2019 ("On Tiny Episodic Memories in Continual
Learning", arXiv 1902.10486) and Rolnick et al. 2019 (arXiv 1811.11682).

Idea: keep a small buffer of m training examples of every finished task and mix some of
them into each training batch of the later tasks, so the model keeps being trained on the
old tasks while it learns the new one.

How it runs here:
- Where the examples come from: the loop hands every training micro-batch's examples to the
  `batch` hook before it collates them. Replay fills the stage's buffer from this stream of
  seen examples (repeats in later epochs are skipped): `first` keeps the first m distinct
  examples seen, `reservoir` keeps a uniform sample of all distinct examples seen (Vitter's
  algorithm R, seeded from the run seed and the stage). The loop draws batches from seeded
  shuffles of the whole training set, so both are random subsets of the task's data; a stage
  that sees fewer than m distinct examples stores what it saw. The buffer stores what the
  learner actually met, the usual episodic-memory setting. Calibration passes (a base
  method's stage.calibrate) call no hook, so they neither fill nor replay.
- The buffer of task t is closed at stage_end of stage t; stage t replays only tasks < t.
- Mixing: k = round(ratio * B / (1 - ratio)) buffered examples per micro-batch of B new ones
  (so k / (B + k) ~ ratio), drawn uniformly from the pooled buffer of all earlier tasks
  without replacement (with replacement only if k exceeds the buffer), with a generator
  seeded from the run seed and the stage.
- Raw-text stages (`clbench.kind: text`, packed blocks with the loss on every token): with
  `token_fraction: f` the replayed share is counted in TOKENS, not examples, as continual
  pre-training reports it (Ibrahim et al. 2024, arXiv 2403.08763: 5% replay for a weak
  distribution shift, 25% for a strong one; TiC-LM, Li et al. 2025, arXiv 2504.02107, mixes a
  fixed ratio of older data into each update's token budget): a micro-batch with N target tokens of the new domain gets
  n = round(f * N / (1 - f)) replayed target tokens, so they are f of the mixed batch's target
  tokens (to one token), taken as whole buffered blocks (seeded draw from the pooled buffers) and
  the prefix of one more block for the rest. The new domain's tokens per step stay as they are
  (the step costs 1 / (1 - f) as much; Ibrahim et al. keep the batch size instead, which is the
  same mix at a smaller new-data batch). Stages of instruction tasks keep `ratio` in examples.
- Weighting "mixed_mean" (default): the `batch` hook returns the B new examples followed by
  the k replayed ones, so the loop trains on ONE mixed batch and its loss is the
  token-weighted mean of the target-token NLL over both,
      L_mix = (N_new L_new + N_rep L_rep) / (N_new + N_rep)   (N = target-token counts).
  "scaled": the loop's batch stays the B new examples and extra_loss adds (N_rep / N_new)
  L_rep, i.e. total = L_mix * (N_new + N_rep) / N_new: the same gradient direction scaled by
  a per-batch factor (Adam's update is nearly invariant to it, gradient clipping is not),
  at the cost of a second forward and backward of the k replayed examples.
  The reported stage losses are L_mix (mixed_mean) or the scaled sum.
- base (optional): wrap another method (e.g. `base: lora`, `base_options: {r: 8}`): every
  hook is delegated to it, replay adds its loss on top (to the base's extra_loss). Without
  a base every parameter trains (as full_ft).

Options (defaults and sources):
  m 50                 examples kept per past task (this suite's choice; unconfirmed by a source)
  selection reservoir  `reservoir` or `first` (see above)
  ratio 0.25           share of replayed examples in each mixed batch (this suite's choice;
                       unconfirmed by a source)
  token_fraction none  raw-text stages: share of replayed target tokens in each mixed batch
                       (e.g. 0.05 or 0.25, Ibrahim et al. 2024); none = `ratio` there too
  weighting mixed_mean see above
  general_task         none; a task name whose training data is replayed as general
                       instruction data from stage 1 on (pooled with the past tasks' buffers;
                       e.g. bb_ni_qasc_answer, Natural Instructions, for a classification stream)
  general_m 50         how many of its examples are kept (a seeded sample)
  base, base_options   none: full fine-tuning
"""

from __future__ import annotations

import random
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from clbench.data.examples import IGNORE, Example, collate
from clbench.data.packing import is_text_task, target_tokens
from clbench.method import MethodError, register
from clbench.method.lm import lm_loss
from clbench.method.masking import derive_seed
from clbench.method.wrapping import BASE_FIELD, BASE_OPTIONS_FIELD, BaseName, BaseOptions, Wrapping

SALT_BUFFER, SALT_DRAW, SALT_GENERAL = 11, 12, 13


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    m: int = Field(50, gt=0, description="examples kept per past task")
    selection: Literal["reservoir", "first"] = Field("reservoir", description="which seen examples the buffer keeps")
    ratio: float = Field(0.25, gt=0, lt=1, description="share of replayed examples in each mixed batch")
    token_fraction: Optional[float] = Field(None, gt=0, lt=1, description="raw-text stages: share of replayed "
                                            "target tokens in each mixed batch (Ibrahim et al. 2024: 0.05, 0.25)")
    weighting: Literal["mixed_mean", "scaled"] = Field("mixed_mean", description="total = mean over the mixed batch, or scaled")
    general_task: Optional[str] = Field(None, description="a task whose training data is replayed from stage 1 on "
                                        "as general instruction data (e.g. one not in the stream)")
    general_m: int = Field(50, gt=0, description="examples of general_task kept (a seeded sample)")
    base: BaseName = BASE_FIELD
    base_options: BaseOptions = BASE_OPTIONS_FIELD


def n_replay(batch_size: int, ratio: float) -> int:
    return int(round(ratio * batch_size / (1 - ratio)))


@register("replay")
class Replay(Wrapping):
    Options = ReplayOptions

    def __init__(self, options: ReplayOptions):
        super().__init__(options)  # the base method, if any (clbench.method.wrapping)
        self.buffers: dict[str, list[Example]] = {}  # finished tasks, in stream order
        self._current: list[Example] = []  # the running stage's selection
        self._seen: set = set()
        self._n_seen = 0
        self._rng: random.Random | None = None
        self._draw: torch.Generator | None = None
        self._pending: list[Example] = []  # weighting scaled: this micro-batch's replayed examples
        self.pad_id = 0
        self.general: list[Example] = []  # general instruction data, replayed from stage 1 on
        self.last_replay: list[Example] = []  # the examples of the latest replay draw (tests, inspection)
        self.last_task_of_replay: list[str] = []

    # --- run ----------------------------------------------------------------------------------

    def needs_tasks(self):
        return ([self.options.general_task] if self.options.general_task else []) + list(super().needs_tasks())

    def setup(self, model, run):
        tok = getattr(run, "tokenizer", None)
        if tok is not None and tok.pad_token_id is not None:
            self.pad_id = tok.pad_token_id
        if self.options.general_task:
            if getattr(run, "examples", None) is None:
                raise MethodError("replay: general_task needs the loop's RunContext.examples")
            pool = run.examples(self.options.general_task)
            rng = random.Random(derive_seed(run.seed, 0, SALT_GENERAL))
            self.general = rng.sample(pool, min(self.options.general_m, len(pool)))
        return super().setup(model, run)

    # --- stages ---------------------------------------------------------------------------

    def stage_start(self, model, stage):
        model = self._inner("stage_start", model, stage, default=model)
        self._current, self._seen, self._n_seen = [], set(), 0
        self._rng = random.Random(derive_seed(stage.seed, stage.stage, SALT_BUFFER))
        self._draw = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, SALT_DRAW))
        self._pending = []
        return model

    def stage_end(self, model, stage):
        model = self._inner("stage_end", model, stage, default=model)
        self.buffers[stage.task] = list(self._current)
        self._current, self._seen, self._pending = [], set(), []
        return model

    def _observe(self, examples) -> None:
        m = self.options.m
        for ex in examples:
            key = (tuple(ex.input_ids), ex.n_prompt)
            if key in self._seen:
                continue
            self._seen.add(key)
            self._n_seen += 1
            if len(self._current) < m:
                self._current.append(ex)
            elif self.options.selection == "reservoir":
                j = self._rng.randrange(self._n_seen)
                if j < m:
                    self._current[j] = ex

    def _pool(self) -> list[tuple[Example, str]]:
        pool = [(ex, task) for task, exs in self.buffers.items() for ex in exs]
        return pool + [(ex, f"general:{self.options.general_task}") for ex in self.general]

    def draw(self, k: int) -> tuple[list[Example], list[str]]:
        """k examples from the pooled buffer of the finished tasks (seeded)."""
        pool = self._pool()
        if not pool or k <= 0:
            return [], []
        if k <= len(pool):
            idx = torch.randperm(len(pool), generator=self._draw)[:k].tolist()
        else:
            idx = torch.randint(len(pool), (k,), generator=self._draw).tolist()
        return [pool[i][0] for i in idx], [pool[i][1] for i in idx]

    def draw_tokens(self, n: int) -> tuple[list[Example], list[str]]:
        """Buffered examples holding n target tokens in all (seeded): whole ones in a random order of
        the pool (cycling through fresh orders if it holds fewer), then the prefix of the next one
        (a raw-text block, loss on every token) or, where the next has a prompt, only whole ones."""
        pool = [(ex, t) for ex, t in self._pool() if target_tokens(ex) > 0]
        chosen, tasks = [], []
        while pool and n > 0:
            for i in torch.randperm(len(pool), generator=self._draw).tolist():
                ex, task = pool[i]
                k = target_tokens(ex)
                if k > n and ex.n_prompt == 0:
                    ex, k = Example(ex.input_ids[:n + 1], 0), n
                if k <= n:
                    chosen.append(ex)
                    tasks.append(task)
                    n -= k
                if n == 0:
                    break
            else:
                if all(ex.n_prompt > 0 and target_tokens(ex) > n for ex, _ in pool):  # none fits what is left
                    break
        return chosen, tasks

    def _is_text_stage(self, stage) -> bool:
        run = stage.run  # a multitask reference's stage is no task of the stream
        return getattr(run, "task", None) is not None and stage.task in run.tasks and is_text_task(run.task(stage.task))

    def batch(self, examples, stage):
        examples = self._inner("batch", examples, stage, default=list(examples))
        self._observe(examples)
        self._pending = []
        if not self.buffers and not self.general:
            return examples
        f = self.options.token_fraction
        if f is not None and self._is_text_stage(stage):
            chosen, tasks = self.draw_tokens(int(round(f * sum(map(target_tokens, examples)) / (1 - f))))
        else:
            chosen, tasks = self.draw(n_replay(len(examples), self.options.ratio))
        self.last_replay, self.last_task_of_replay = chosen, tasks
        if self.options.weighting == "mixed_mean":
            return list(examples) + chosen
        self._pending = chosen
        return examples

    def extra_loss(self, model, batch, stage, out):
        inner = self._inner("extra_loss", model, batch, stage, out)
        chosen, self._pending = self._pending, []
        if not chosen:
            return inner
        rep = {k: v.to(batch["input_ids"].device) for k, v in collate(chosen, self.pad_id).items()}
        n_new = int((batch["labels"][:, 1:] != IGNORE).sum())
        n_rep = int((rep["labels"][:, 1:] != IGNORE).sum())
        if n_rep == 0 or n_new == 0:  # no target token: nothing to mix (the loop's loss is NaN without one)
            return inner
        extra = (n_rep / n_new) * lm_loss(model, rep, stage.train_config.head_only_targets)
        return extra if inner is None else extra + inner

    def fsdp_refusal(self):
        return self._inner("fsdp_refusal")  # the base method's (none: full fine-tuning, which runs sharded)

    def world_size_dependent(self):
        if self.options.weighting == "scaled":
            return "weighting scaled: each rank scales the replayed loss by its own share's target tokens"
        return None

    # --- resume ---------------------------------------------------------------------------

    def state_dict(self):
        return {"buffers": {t: [(ex.input_ids, ex.n_prompt) for ex in exs] for t, exs in self.buffers.items()},
                "base": self._base_state()}

    def load_state_dict(self, state):
        self.buffers = {t: [Example(list(ids), int(n)) for ids, n in exs] for t, exs in state.get("buffers", {}).items()}
        self._load_base_state(state.get("base"))
