"""I-LoRA, interpolation-based LoRA (Ren et al. 2024, arXiv 2402.18865; ICASSP 2025).

Code: which47/LLMCL (method/ILORA.py: the model, the buffer, the EMA callback;
utils/arg_configs.py: the LoRA configuration; scripts/train_seq.sh: the training setting).

Idea: a dual-memory experience replay built from two LoRA adapters on one frozen base model.
The plastic adapter theta_p learns (it is the only one trained); the stable adapter theta_s is a
slow exponential moving average of it, an interpolation in weight space between the earlier
minima and the current one (the paper's mode-connectivity argument). A reservoir buffer of the
examples seen is replayed, and on the replayed examples the plastic adapter's hidden states are
pulled up to the stable adapter's wherever they fall below them:

    L = (CE_p(x) + CE_p(b)) / 2 + gamma * L_cons(b)          x: the micro-batch, b: a buffer batch
    L_cons(b) = mean over layers l, positions, units of (h_p - max(h_p, h_s))^2
              = mean of relu(h_s - h_p)^2                     (h_s computed without gradient)
    after every optimizer step:  theta_s <- lam * theta_s + (1 - lam) * theta_p
                                 lam = min(1 - 1 / (k + 1), stable_decay)

with k the number of optimizer steps of the stage taken so far (1 after the first step).

How it runs here:
- setup wraps the model with peft and adds two adapters of the same LoraConfig, `plastic` and
  `stable`; only `plastic` is active in the training forward and only it requires grad, so the
  stable tensors never receive a gradient and never reach the optimizer, and the base weights
  stay bit-identical. Both adapters live in the model, so the loop's weight checkpoints cover
  the stable one too.
- batch: every example of every training micro-batch goes into one reservoir buffer of
  `buffer_size` examples over the whole run (Vitter's algorithm R as in the authors' Buffer:
  the n-th example met replaces a uniformly drawn slot with probability buffer_size / n). As in
  the authors' code every example met counts, the current stage's included and an example
  met again in a later epoch counted again. The draws are seeded from the run seed and the
  stage. The micro-batch itself is not changed.
- extra_loss (from stage 2 on, see first_stage_replay): b = buffer_batch examples drawn
  uniformly without replacement from the buffer (seeded). The stable adapter is made the
  active one and run on b under no_grad (hidden states only); then the plastic adapter is made
  active again (and the only one requiring grad) and run on b with gradient, giving CE_p(b) at
  b's target positions (the loop's head-only path) and its hidden states. The hook returns
  (CE_p(b) - CE_p(x)) / 2 + gamma * L_cons, CE_p(x) being the loop's `out.loss`, so that the
  loop's total is the loss above. Both extra forwards run in the loop's mode (training: adapter
  dropout is active in both, as in the authors' code) and autocast; L_cons in float32.
  With several processes each rank subtracts its own CE_p(x): the total halves the task loss
  exactly when every rank's micro-batch has the same number of target tokens.
- hidden states: the decoder's `output_hidden_states` tuple as the authors use it, i.e. the
  embedding output (identical under both adapters, so it adds zeros to the mean), the output
  of every decoder layer but the last, and the last one after the final norm; the mean runs
  over the real (attention-mask) positions of b only.
- after_step: the EMA above on every adapter tensor (lora_A and lora_B of every adapted
  module), in place and without gradient. The authors' update never runs: it matches the
  parameter names of adapter `default` against those of adapter `ema`, and peft's names carry
  the adapter (`lora_A.default.weight` vs `lora_A.ema.weight`), so theta_s stays at its
  initial value. Here the tensors are paired by module and adapter, which is the update the
  paper describes.
- stage_end: the model is evaluated with the `evaluate` adapter active; stage_start makes
  `plastic` active again.
- The reported stage losses include the replay and consistency terms.

Options (defaults and sources):
  r 8, alpha 32, dropout 0.1, target_modules [q_proj, k_proj, v_proj, o_proj]
                      the authors' LoRA configuration (utils/arg_configs.py:89-92)
  stable_decay 0.99   lam's ceiling, the weight the stable adapter KEEPS at each step, so theta_s
                      is an EMA that lags theta_p by about 1 / (1 - lam) = 100 steps. Source: the
                      EMA I-LoRA's code takes from CLS-ER (Arani et al. 2022, NeurAI-Lab/CLS-ER
                      models/clser.py: the same alpha = min(1 - 1/(step + 1), alpha) and
                      ema = alpha * ema + (1 - alpha) * param), whose stable model keeps 0.999 by
                      default and 0.99 or 0.999 in its tuned settings (utils/best_args.py); 0.99
                      because clbench's stages are hundreds of steps, not tens of thousands. The
                      authors' own value, ema_alpha = 0.25 (which47/LLMCL ILORA.py:152, used as
                      param * alpha + plastic * (1 - alpha), :163, :171), is not taken: it makes
                      the stable adapter move three quarters of the way to the plastic one at every
                      step, so the consistency term is ~0 and I-LoRA is LoRA + replay; and their
                      update never runs (below), so that value was never exercised. EasyCL's
                      port keeps 0.25 but writes the EMA the other way round (it keeps 0.75).
                      The ramp min(1 - 1/(k + 1), lam) restarts every stage (k counts the stage's
                      steps, as the authors' trainer's global_step): for a stage shorter than
                      1 / (1 - lam) steps theta_s is the running mean of the stage's plastic
                      iterates and the previous stable adapter (weight 1 / (k + 1) on the latter).
                      The paper's own value is not confirmed. 0 makes theta_s = theta_p.
  gamma 1.0           weight of L_cons (the authors' reg_weight, ILORA.py:153)
  buffer_size 500     the authors' Buffer(500) (ILORA.py:157, "same as ER")
  buffer_batch null   replayed examples per micro-batch; null = as many as the micro-batch has
                      (the authors draw input_ids.shape[0], ILORA.py:225), capped by the buffer
  first_stage_replay false   the authors draw no buffer batch during the first task (ILORA.py:224,
                      its name hard-coded): stage 1 trains on CE_p(x) alone (the EMA runs)
  stable_init copy    `copy`: the stable adapter starts as a copy of the plastic one (an EMA of
                      the plastic trajectory from its start); `fresh`: its own peft
                      initialisation (another random A, B = 0), what the authors' add_adapter
                      gives. Both are the base model at setup (B = 0). Unconfirmed choice.
  evaluate plastic    the adapter the stage's evaluation uses: the authors save and evaluate
                      the plastic one (ILORA.py:298-303, inference.py); `stable` for the EMA.

The authors' training setting is the run's train config here, not an option: their one script
(scripts/train_seq.sh, written out for the `seq` baseline, the method being an argument) trains
with lr 1e-5 (constant after 500 warm-up steps), 3 epochs per task, batch 1.

Choices no source confirms: the consistency mean over real positions only (the authors' buffer
batches are left-padded with token 0 and run without an attention mask, and their buffer labels
are padded with 0, so padding is trained on as a target; here padding is masked and never a
target); `stable_init`; after a task the authors call `load_ema_model` (ILORA.py:295), defined
nowhere in their repository (their `update_ema_model`, :180, would load the saved plastic
adapter into the stable one): not done here, the stable adapter stays the running average
across stages.

Memory: two adapters; optimizer state for the plastic one only; the buffer holds token ids.
Per micro-batch from stage 2 on: one extra no-grad forward and one extra forward and backward
on the buffer batch, with every layer's hidden states kept for L_cons.
"""

from __future__ import annotations

import random
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clbench.data.examples import IGNORE, Example, collate
from clbench.method import Method, MethodError, StageMeans, register
from clbench.method.lm import split_head
from clbench.method.masking import derive_seed

PLASTIC, STABLE = "plastic", "stable"
SALT_BUFFER, SALT_DRAW = 31, 32


class ILoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="rank of both adapters")
    alpha: float = Field(32, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.1, ge=0, lt=1, description="adapter dropout")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="adapted modules")
    stable_decay: float = Field(0.99, ge=0, le=1, description="lam's ceiling in theta_s <- lam theta_s + (1 - lam) theta_p")
    gamma: float = Field(1.0, ge=0, description="weight of the hidden-state consistency term")
    buffer_size: int = Field(500, gt=0, description="reservoir buffer size (examples, whole run)")
    buffer_batch: Optional[int] = Field(None, gt=0, description="replayed examples per micro-batch (null: the micro-batch's size)")
    first_stage_replay: bool = Field(False, description="replay (and the consistency term) in stage 1 too")
    stable_init: Literal["copy", "fresh"] = Field("copy", description="stable adapter at setup: a copy of the plastic one, "
                                                   "or its own peft initialisation")
    evaluate: Literal["plastic", "stable"] = Field("plastic", description="the adapter the evaluation uses")


def adapter_pairs(model) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(stable, plastic) tensors of every adapted module, lora_A and lora_B."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for d in (m.lora_A, m.lora_B):
                if PLASTIC in d and STABLE in d:
                    pairs.append((d[STABLE].weight, d[PLASTIC].weight))
    return pairs


def hidden_forward(model, batch: dict, head_only_targets: bool, with_logits: bool = True):
    """(target logits or None, targets or None, hidden states) of the active adapter on `batch`,
    the target rows as clbench.method.lm.target_logits gives them."""
    sel = batch["labels"][:, 1:] != IGNORE
    split = split_head(model) if head_only_targets else None
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    if split is not None:
        dec, head = split
        o = dec(**kw)
        logits = head(o.last_hidden_state[:, :-1][sel]) if with_logits else None
    else:
        o = model(**kw)
        logits = o.logits[:, :-1][sel] if with_logits else None
    return logits, (batch["labels"][:, 1:][sel] if with_logits else None), o.hidden_states


def consistency(h_plastic, h_stable, attention_mask) -> torch.Tensor:
    """mean over layers, real positions and units of (h_p - max(h_p, h_s))^2, float32."""
    mask = attention_mask.bool()
    total, count = None, 0
    for hp, hs in zip(h_plastic, h_stable):
        d = torch.clamp(hs.float() - hp.float(), min=0)[mask]  # = max(h_p, h_s) - h_p
        term = (d * d).sum()
        total = term if total is None else total + term
        count += d.numel()
    return total / count


@register("ilora")
class ILoRA(Method):
    Options = ILoraOptions

    def __init__(self, options: ILoraOptions):
        self.options = options
        self.buffer: list[Example] = []
        self.n_seen = 0
        self.pad_id = 0
        self._rng: random.Random | None = None
        self._draw: torch.Generator | None = None
        self.last: dict = {}  # the latest micro-batch's terms (inspection, tests)
        self.last_decay: float | None = None  # lam of the latest EMA step
        self._means = StageMeans()  # the stage's consistency term / task loss (stage_stats)

    def _config(self):
        from peft import LoraConfig

        o = self.options
        return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules,
                          task_type="CAUSAL_LM")

    @staticmethod
    def _use(model, name: str) -> None:
        """Make adapter `name` the one in the forward; only the plastic one ever requires grad."""
        model.base_model.set_adapter(name, inference_mode=name != PLASTIC)

    def setup(self, model, run):
        from peft import get_peft_model

        tok = getattr(run, "tokenizer", None)
        if tok is not None and tok.pad_token_id is not None:
            self.pad_id = tok.pad_token_id
        model = get_peft_model(model, self._config(), adapter_name=PLASTIC)
        model.add_adapter(STABLE, self._config())
        pairs = adapter_pairs(model)
        if not pairs:
            raise MethodError(f"ilora: no module matched target_modules {self.options.target_modules}")
        if self.options.stable_init == "copy":
            with torch.no_grad():
                for s, p in pairs:
                    s.copy_(p)
        self._use(model, PLASTIC)
        return model

    def stage_start(self, model, stage):
        self._use(model, PLASTIC)
        self._means.reset()
        self._rng = random.Random(derive_seed(stage.seed, stage.stage, SALT_BUFFER))
        self._draw = torch.Generator().manual_seed(derive_seed(stage.seed, stage.stage, SALT_DRAW))
        return model

    def batch(self, examples, stage):
        size = self.options.buffer_size
        for ex in examples:
            if len(self.buffer) < size:
                self.buffer.append(ex)
            else:
                j = self._rng.randrange(self.n_seen + 1)
                if j < size:
                    self.buffer[j] = ex
            self.n_seen += 1
        return None

    def _replays(self, stage) -> bool:
        return stage.stage >= 2 or self.options.first_stage_replay

    def draw(self, k: int) -> list[Example]:
        k = min(k, len(self.buffer))
        if k <= 0:
            return []
        return [self.buffer[i] for i in torch.randperm(len(self.buffer), generator=self._draw)[:k].tolist()]

    def world_size_dependent(self):
        """Read by the recorder (results.json, and a printed line with several processes)."""
        return ("each rank draws buffer_batch (default: its own micro-batch size) buffered examples and subtracts "
                "its own CE_p(x) in its extra loss, so the total depends on how the batch is split over the processes")

    def fsdp_refusal(self):
        # both adapters exist from setup; the EMA acts on each rank's own rows of them, elementwise.
        # Sharded it depends on N as replicated does (world_size_dependent): at N sharded processes
        # it equals N replicated ones (tests/distributed/test_fsdp_methods.py)
        return None

    def extra_loss(self, model, batch, stage, out):
        self.last = {}
        if not self._replays(stage):
            return None
        chosen = self.draw(self.options.buffer_batch or int(batch["input_ids"].shape[0]))
        if not chosen:
            return None
        device = batch["input_ids"].device
        rep = {k: v.to(device) for k, v in collate(chosen, self.pad_id).items()}
        head_only = stage.train_config.head_only_targets
        try:
            self._use(model, STABLE)
            with torch.no_grad():
                _, _, h_stable = hidden_forward(model, rep, head_only, with_logits=False)
        finally:
            self._use(model, PLASTIC)
        logits, targets, h_plastic = hidden_forward(model, rep, head_only)
        cons = consistency(h_plastic, h_stable, rep["attention_mask"])
        total = self.options.gamma * cons
        if targets.numel():
            ce_b = F.cross_entropy(logits.float(), targets)
            total = total + 0.5 * (ce_b - out.loss)
            self.last["ce_buffer"] = float(ce_b.detach())
        self.last["consistency"] = float(cons.detach())
        self._means.add("consistency_ratio", StageMeans.share(self.options.gamma * cons, out.loss))
        return total

    def stage_stats(self, stage):
        """consistency_ratio: mean over the stage's replaying micro-batches of gamma * L_cons / the
        micro-batch's CE_p(x) (none in stage 1 unless first_stage_replay)."""
        return self._means.means()

    def after_step(self, model, stage):
        k = stage.global_step + 1  # optimizer steps of this stage taken, this one included
        lam = min(1.0 - 1.0 / (k + 1), self.options.stable_decay)
        with torch.no_grad():
            for s, p in adapter_pairs(model):
                s.mul_(lam).add_(p.detach(), alpha=1.0 - lam)
        self.last_decay = lam

    def stage_end(self, model, stage):
        self._use(model, self.options.evaluate)
        return model

    def trainable_params(self, model):
        return sum(p.numel() for _, p in adapter_pairs(model))

    def state_dict(self):
        # both adapters are in the model (checkpointed as weights); the buffer and the count of
        # examples met decide every later reservoir step, the draws are reseeded per stage
        return {"buffer": [(ex.input_ids, ex.n_prompt) for ex in self.buffer], "n_seen": self.n_seen}

    def load_state_dict(self, state):
        self.buffer = [Example(list(ids), int(n)) for ids, n in state.get("buffer", [])]
        self.n_seen = int(state.get("n_seen", len(self.buffer)))
