"""Experience replay: a small buffer of earlier tasks' examples mixed into later batches.

Episodic memory as in Chaudhry et al. 2019 ("On Tiny Episodic Memories in Continual
Learning", arXiv 1902.10486) and Rolnick et al. 2019 (arXiv 1811.11682).

Idea: keep a small buffer of m training examples of every finished task and mix some of
them into each training batch of the later tasks, so the model keeps being trained on the
old tasks while it learns the new one.

How it runs here (no loop change needed):
- Where the examples come from: the loop gives a method no example list, but it hands every
  training micro-batch to `extra_loss`. Replay reconstructs the clbench.train.Example of each
  row exactly (input_ids up to the attention mask's length, n_prompt = the first target
  position) and fills the stage's buffer from this stream of seen examples (repeats in later
  epochs are skipped): `first` keeps the first m distinct examples seen, `reservoir` keeps a
  uniform sample of all distinct examples seen (Vitter's algorithm R, seeded from the run
  seed and the stage). The loop draws batches from seeded shuffles of the whole training
  set, so both are random subsets of the task's data; a stage that sees fewer than m
  distinct examples stores what it saw. The buffer stores what the learner actually met,
  the usual episodic-memory setting. Calibration passes (a base method's
  stage.calibrate) do not call extra_loss, so they neither fill nor replay.
- The buffer of task t is closed at stage_end of stage t; stage t replays only tasks < t.
- Mixing: the loop builds the batch of B new examples itself, so replay adds its part as
  extra_loss: k = round(ratio * B / (1 - ratio)) buffered examples (B = the micro-batch's
  size, so k / (B + k) ~ ratio), drawn uniformly from the pooled buffer of all earlier tasks
  without replacement (with replacement only if k exceeds the buffer), with a generator
  seeded from the run seed and the stage; collated and scored with the loop's lm_loss.
- Weighting "mixed_mean" (default): the total loss equals lm_loss on ONE batch holding the
  B new and the k replayed examples: the token-weighted mean of the target-token NLL,
      L_mix = (N_new L_new + N_rep L_rep) / (N_new + N_rep)
  (N = target-token counts). The loop adds L_new with weight 1, so extra_loss returns
  L_mix - L_new = N_rep / (N_new + N_rep) * (L_rep - L_new), which needs L_new with its
  graph: a forward hook on the LM head (installed for the stage's training only) keeps the
  head's output of the loop's own lm_loss call, and extra_loss recomputes L_new from it
  exactly as lm_loss does (cross entropy in float32 over the target positions). Values and
  gradients equal those of the mixed batch (up to float rounding; tested). "scaled": no hook,
  extra = (N_rep / N_new) L_rep, i.e. total = L_mix * (N_new + N_rep) / N_new: the same
  gradient direction, scaled by a per-batch factor (Adam's update is nearly invariant to
  it, gradient clipping is not).
  The reported stage losses are L_mix (mixed_mean) or the scaled sum. Cost: one extra
  forward and backward of k examples per micro-batch (the replayed part runs as its own
  batch instead of inside the loop's batch).
- base (optional): wrap another method (e.g. `base: lora`, `base_options: {r: 8}`): every
  hook is delegated to it, replay adds its loss on top (to the base's extra_loss). Without
  a base every parameter trains (as full_ft).

Options (defaults and sources):
  m 50                 examples kept per past task (the project brief; unconfirmed)
  selection reservoir  `reservoir` or `first` (see above)
  ratio 0.25           share of replayed examples in each mixed batch (the project brief;
                       unconfirmed)
  weighting mixed_mean see above
  general_task         none; a task name whose training data is replayed as general
                       instruction data from stage 1 on (pooled with the past tasks' buffers;
                       e.g. bb_ni_qasc_answer, Natural Instructions, for a classification stream)
  general_m 50         how many of its examples are kept (a seeded sample)
  base, base_options   none: full fine-tuning
"""

from __future__ import annotations

import random
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clbench import method as M
from clbench.errors import ConfigError
from clbench.masking import derive_seed
from clbench.method import MethodError, register
from clbench.train import IGNORE, Example, collate, lm_loss

SALT_BUFFER, SALT_DRAW, SALT_GENERAL = 11, 12, 13


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    m: int = Field(50, gt=0, description="examples kept per past task")
    selection: Literal["reservoir", "first"] = Field("reservoir", description="which seen examples the buffer keeps")
    ratio: float = Field(0.25, gt=0, lt=1, description="share of replayed examples in each mixed batch")
    weighting: Literal["mixed_mean", "scaled"] = Field("mixed_mean", description="total = mean over the mixed batch, or scaled")
    general_task: Optional[str] = Field(None, description="a task whose training data is replayed from stage 1 on "
                                        "as general instruction data (e.g. one not in the stream)")
    general_m: int = Field(50, gt=0, description="examples of general_task kept (a seeded sample)")
    base: Optional[str] = Field(None, description="a method to wrap (e.g. lora); none = full fine-tuning")
    base_options: dict[str, Any] = Field(default_factory=dict, description="the wrapped method's options")


def examples_from_batch(batch: dict) -> list[Example]:
    """Invert clbench.train.collate: the Examples of a collated (right-padded) batch."""
    ids = batch["input_ids"].detach().cpu()
    mask = batch["attention_mask"].detach().cpu()
    labels = batch["labels"].detach().cpu()
    out = []
    for i in range(ids.shape[0]):
        L = int(mask[i].sum())
        tgt = (labels[i, :L] != IGNORE).nonzero()
        n_prompt = int(tgt[0]) if tgt.numel() else L
        out.append(Example(ids[i, :L].tolist(), n_prompt))
    return out


def n_replay(batch_size: int, ratio: float) -> int:
    return int(round(ratio * batch_size / (1 - ratio)))


def _lm_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise MethodError("replay: weighting mixed_mean needs the model's LM head (get_output_embeddings); use weighting: scaled")
    return head


def loss_from_head_output(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lm_loss's cross entropy recomputed from the LM head's output of the same call:
    (n_targets, V) on the head-only path, (B, T, V) on the full-logits path."""
    tgt = labels[:, 1:]
    if out.dim() == 2:
        sel = tgt[tgt != IGNORE]
        if out.shape[0] != sel.numel():
            raise MethodError(f"replay: the LM head's last output has {out.shape[0]} rows for {sel.numel()} target tokens")
        return F.cross_entropy(out.float(), sel)
    if out.dim() == 3 and tuple(out.shape[:2]) == tuple(labels.shape):
        return F.cross_entropy(out[:, :-1].float().reshape(-1, out.size(-1)), tgt.reshape(-1), ignore_index=IGNORE)
    raise MethodError(f"replay: the LM head's last output has shape {tuple(out.shape)}, the batch {tuple(labels.shape)}")


@register("replay")
class Replay:
    Options = ReplayOptions

    def __init__(self, options: ReplayOptions):
        self.options = options
        self.inner = None
        if options.base is not None:
            if options.base == "replay":
                raise ConfigError("replay: base cannot be replay itself")
            self.inner = M.make(options.base, options.base_options, where="replay base")
        elif options.base_options:
            raise ConfigError("replay: base_options given without base")
        self.buffers: dict[str, list[Example]] = {}  # finished tasks, in stream order
        self._current: list[Example] = []  # the running stage's selection
        self._seen: set = set()
        self._n_seen = 0
        self._rng: random.Random | None = None
        self._draw: torch.Generator | None = None
        self._hook = None
        self._head_out = None
        self.pad_id = 0
        self.general: list[Example] = []  # general instruction data, replayed from stage 1 on
        self.needs_tasks = [options.general_task] if options.general_task else []
        self.last_replay: list[Example] = []  # the examples of the latest replay draw (tests, inspection)
        self.last_task_of_replay: list[str] = []

    # --- delegation -----------------------------------------------------------------------

    def _inner(self, hook, *args, default=None):
        return M.call(self.inner, hook, *args, default=default) if self.inner is not None else default

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
        if self.inner is not None:
            return self.inner.setup(model, run)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def param_groups(self, model, stage):
        return self._inner("param_groups", model, stage)

    def after_backward(self, model, stage):
        self._inner("after_backward", model, stage)

    def after_step(self, model, stage):
        self._inner("after_step", model, stage)

    def trainable_params(self, model):
        return self._inner("trainable_params", model)

    # --- stages ---------------------------------------------------------------------------

    def stage_start(self, model, stage):
        model = self._inner("stage_start", model, stage, default=model)
        self._current, self._seen, self._n_seen = [], set(), 0
        self._rng = random.Random(derive_seed(stage.seed, stage.stage, SALT_BUFFER))
        self._draw = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, SALT_DRAW))
        self._remove_hook()
        if self.options.weighting == "mixed_mean" and (self.buffers or self.general):
            def keep(_module, _inputs, output):
                if torch.is_grad_enabled():
                    self._head_out = output
            self._hook = _lm_head(model).register_forward_hook(keep)
        return model

    def stage_end(self, model, stage):
        self._remove_hook()
        model = self._inner("stage_end", model, stage, default=model)
        self.buffers[stage.task] = list(self._current)
        self._current, self._seen = [], set()
        return model

    def _remove_hook(self):
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._head_out = None, None

    def _observe(self, batch) -> None:
        m = self.options.m
        for ex in examples_from_batch(batch):
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

    def draw(self, k: int) -> tuple[list[Example], list[str]]:
        """k examples from the pooled buffer of the finished tasks (seeded)."""
        pool = [(ex, task) for task, exs in self.buffers.items() for ex in exs]
        pool += [(ex, f"general:{self.options.general_task}") for ex in self.general]
        if not pool or k <= 0:
            return [], []
        if k <= len(pool):
            idx = torch.randperm(len(pool), generator=self._draw)[:k].tolist()
        else:
            idx = torch.randint(len(pool), (k,), generator=self._draw).tolist()
        return [pool[i][0] for i in idx], [pool[i][1] for i in idx]

    def extra_loss(self, model, batch, stage):
        head_out, self._head_out = self._head_out, None  # the loop's lm_loss call on `batch`
        inner = self._inner("extra_loss", model, batch, stage)
        self._observe(batch)
        if not self.buffers and not self.general:
            return inner
        B = int(batch["input_ids"].shape[0])
        chosen, tasks = self.draw(n_replay(B, self.options.ratio))
        self.last_replay, self.last_task_of_replay = chosen, tasks
        if not chosen:
            return inner
        device = batch["input_ids"].device
        rep = {k: v.to(device) for k, v in collate(chosen, self.pad_id).items()}
        head_only = getattr(stage.train_config, "head_only_targets", True)
        l_rep = lm_loss(model, rep, head_only)
        self._head_out = None
        n_new = int((batch["labels"][:, 1:] != IGNORE).sum())
        n_rep = int((rep["labels"][:, 1:] != IGNORE).sum())
        if n_rep == 0 or n_new == 0:  # no target token: nothing to mix (the loop's loss is NaN without one)
            return inner
        if self.options.weighting == "scaled":
            extra = (n_rep / n_new) * l_rep
        else:
            if head_out is None:
                raise MethodError("replay: no LM head output was recorded for the training batch "
                                  "(the loop's loss did not run through the model's LM head); use weighting: scaled")
            l_new = loss_from_head_output(head_out, batch["labels"])
            extra = (n_rep / (n_new + n_rep)) * (l_rep - l_new)
        return extra if inner is None else extra + inner

    # --- resume ---------------------------------------------------------------------------

    def state_dict(self):
        return {"buffers": {t: [(ex.input_ids, ex.n_prompt) for ex in exs] for t, exs in self.buffers.items()},
                "base": self._inner("state_dict")}

    def load_state_dict(self, state):
        self.buffers = {t: [Example(list(ids), int(n)) for ids, n in exs] for t, exs in state.get("buffers", {}).items()}
        if self.inner is not None and state.get("base") is not None:
            M.call(self.inner, "load_state_dict", state["base"])
