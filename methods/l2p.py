"""L2P, Learning to Prompt (Wang et al., CVPR 2022, arXiv 2112.08654).

Code: google-research/l2p (JAX; models/prompt.py: the pool, the selection and the pull
constraint; configs/*_l2p.py: the settings) and its PyTorch port JH-LEE-KR/l2p-pytorch
(prompt.py, configs/cifar100_l2p.py, engine.py).

Idea: the pretrained model stays frozen. A pool of M prompts (each L_p vectors in the input
embedding space), each with a learnable key in the query space. For an input x, a query q(x)
comes from the frozen pretrained model; the N prompts whose keys are most cosine-similar to q(x)
are prepended to x's embeddings. Training minimises the task loss plus a surrogate that pulls
the selected keys toward the query:
    loss = CE(f([P_s1; ...; P_sN; x]), y) + lambda * sum_i (1 - cos(q(x), k_si))
(averaged over the batch's rows). The top-N selection has no gradient: the prompts learn through
the task loss, the keys through the surrogate only. No task identity at test time: every input
picks its own prompts, in training and at evaluation alike (so clbench's evaluation, one model
for every task, is L2P's own protocol).

Query for a causal LM (the paper's is the frozen ViT's [CLS] feature of the image, which a
decoder-only LM does not have): the mean of the frozen model's last hidden states (after the
final norm; no prompt) over the input's CONTEXT tokens, i.e. the tokens before the first target
token (training) or before the continuation (log-likelihood evaluation), or the whole prompt of
a generation. Never the target or a continuation: each multiple-choice option is scored with the
prompts its question picked, so the prefix-shared evaluation (one context, its choices packed
behind it) shares cached prefixes only between rows with the same selection. It costs one extra
forward of the frozen model per training micro-batch and per evaluated context (as the paper's
extra ViT pass). clbench's paths pass the context lengths (clbench/method/prompting.py
context_lengths); a forward that cannot (lm-eval's own log-likelihood path,
CLBENCH_EVAL_PREFIX_SHARING=0) raises rather than scoring with a wrong selection.

How it runs here (hand-written, not peft: peft's prompt tuning has no input-dependent
selection): the pool is a `clbench.method.prompting.PromptInjector` registered on the model (submodule
`clbench_prompt`: `prompts` (M, L_p, hidden), `keys` (M, hidden)) whose decoder forward prepends
the selected prompts, in order of decreasing similarity (torch.topk's order, as the port), in
every forward (see clbench/method/prompting.py). setup freezes every weight of the model; the pool and
the keys are the only trained entries (M L_p hidden + M hidden), at every stage. extra_loss adds
the surrogate for the rows of the loop's forward (their queries and selections, kept from it).

Options (defaults and sources):
  pool_size 10     M: l2p-pytorch configs/cifar100_l2p.py (--size 10); google-research/l2p
                   configs/cifar100_l2p.py pool_size 10 (five_datasets: 20)
  length 5         L_p: l2p-pytorch (--length 5). google-research/l2p's current configs say 10
                   (the commit that added DualPrompt); the paper's L_p = 5 is not confirmed here
  top_k 5          N: l2p-pytorch (--top_k 5). google-research/l2p's current configs say 4
  lam 0.1          lambda: l2p-pytorch (--pull_constraint_coeff 0.1); google-research/l2p's
                   current configs: 1.0 (cifar100), 0.5 (five_datasets). No source here
                   confirms the paper's value. The code's term is -lam * sum cos (reduce_sim);
                   lam * sum (1 - cos) has the same gradient and stays >= 0
  key_init uniform    keys U(0, 1) (l2p-pytorch prompt.py: nn.init.uniform_; the JAX code's
                   flax uniform() is U(0, 0.01); cosine similarity ignores the scale)
  prompt_init vocab   each prompt vector a random vocabulary token's input embedding (Lester
                   et al.'s choice for language models). NOT the authors': their `uniform`
                   (U(0, 1) in the port, U(0, 0.01) in JAX) is for ViT patch embeddings, and
                   U(0, 1) vectors are far larger than a language model's token embeddings;
                   `prompt_init: uniform` gives the port's U(0, 1)
Deviations and what is not implemented:
  - batchwise_prompt (True in every authors' config: the batch's N most frequent selections
    replace every row's own) is not used: each row keeps its own top-N, so an example's score
    does not depend on its batch-mates (and the evaluation's batching).
  - use_prompt_mask / train_mask (task-wise prompt ranges or class masks in training) are off,
    as in the authors' cifar100 config; no classifier head (the LM head scores the target).
  - Training settings are the run's: the authors use Adam at a constant lr 0.03, no weight
    decay, gradient clipping 1.0, batch 128 (google-research/l2p configs; the port: 16 per
    device); clbench's train.lr, weight decay and schedule apply (AdamW), and the lr must be a
    prompt-tuning one (configs/tune/study-adapters.yaml searches it).
  - A raw-text stream (no context to query) is refused at planning.
Sequences get top_k x length positions longer (25 at the defaults).
ddp: the same numbers as one process: each row's selection depends on that row only and the
surrogate is scaled to the global micro-batch's row mean (tests/distributed/test_distributed.py).
fsdp: same as one process (tests/distributed/test_fsdp_methods.py): the prompt pool is a submodule of the root
FSDP unit, gathered before the decoder's prompt hook runs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clbench.distributed import collectives
from clbench.method import Method, MethodError, StageMeans, register
from clbench.method import prompting
from clbench.runtime import derive_seed


class L2POptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool_size: int = Field(10, gt=0, description="M: prompts in the pool")
    length: int = Field(5, gt=0, description="L_p: tokens per prompt")
    top_k: int = Field(5, gt=0, description="N: prompts selected per input")
    lam: float = Field(0.1, ge=0, description="weight of the key-query surrogate loss")
    key_init: Literal["uniform", "zero"] = "uniform"
    prompt_init: Literal["vocab", "uniform"] = "vocab"

    @model_validator(mode="after")
    def _k_in_pool(self):
        if self.top_k > self.pool_size:
            raise ValueError(f"top_k {self.top_k} > pool_size {self.pool_size}")
        return self


class PromptPool(prompting.PromptInjector):
    """M prompts with keys; each row gets the top_k prompts whose keys are closest (cosine) to its
    query, the frozen model's mean last hidden state over the row's context."""

    needs_context = True

    def __init__(self, prompts: torch.Tensor, keys: torch.Tensor, top_k: int):
        super().__init__()
        self.prompts = torch.nn.Parameter(prompts)
        self.keys = torch.nn.Parameter(keys)
        self.top_k = top_k
        self.last = None  # (query (B, hidden) float32, selection (B, top_k)) of the latest prefill

    def length(self) -> int:
        return self.top_k * self.prompts.shape[1]

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """(B, M) cosine similarity of each query to each key (float32)."""
        return F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T

    def select(self, query: torch.Tensor) -> torch.Tensor:
        return torch.topk(self.similarity(query).detach(), self.top_k, dim=1).indices

    def query(self, call) -> torch.Tensor:
        h = call.hidden().float()
        w = call.context_weights(h.shape[1], h.device)
        return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    def prompt_embeds(self, call):
        q = self.query(call)
        idx = self.select(q)
        self.last = (q, idx)
        B, (M, Lp, D) = idx.shape[0], self.prompts.shape
        return self.prompts[idx].reshape(B, self.top_k * Lp, D)


@register("l2p")
class L2P(Method):
    Options = L2POptions

    def __init__(self, options):
        self.options = options
        self._means = StageMeans()
        self._rows = None

    def setup(self, model, run):
        o = self.options
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings().weight
        D_ = emb.shape[1]
        g = torch.Generator().manual_seed(derive_seed(run.seed, 0, 2112))
        if o.prompt_init == "vocab":
            rows = torch.randint(emb.shape[0], (o.pool_size, o.length), generator=g)
            prompts = emb.detach().cpu()[rows]
        else:
            prompts = torch.rand((o.pool_size, o.length, D_), generator=g)
        keys = torch.rand((o.pool_size, D_), generator=g) if o.key_init == "uniform" else torch.zeros(o.pool_size, D_)
        pool = PromptPool(prompts.to(emb.dtype).to(emb.device), keys.to(emb.dtype).to(emb.device), o.top_k)
        return prompting.attach(model, pool)

    def stage_start(self, model, stage):
        self._means.reset()
        inj = prompting.injector_of(model)
        inj.prompts.requires_grad_(True)
        inj.keys.requires_grad_(True)
        return model

    def batch(self, examples, stage):
        self._rows = len(examples)  # the global micro-batch (before its split over processes)
        return None

    def extra_loss(self, model, batch, stage, out):
        inj = prompting.injector_of(model)
        if inj.last is None:
            raise MethodError("l2p: the loop's forward made no prompt selection")
        q, idx = inj.last
        inj.last = None
        cos = inj.similarity(q.detach()).gather(1, idx)  # (B, top_k), differentiable in the keys
        rows = self._rows or cos.shape[0]
        # the global micro-batch's row mean: each process adds its rows' share (the loop divides
        # extra_loss by the process count and sums the gradients)
        term = self.options.lam * (1 - cos).sum() * (collectives.world_size() if collectives.enabled() else 1) / rows
        self._means.add("key_query_cos", cos.detach().mean())
        self._means.add("surrogate_ratio", StageMeans.share(term, out.loss))
        return term

    def stage_stats(self, stage):
        return self._means.means()

    def stream_refusal(self, output_types):
        text = [t for t, kind in output_types.items() if kind == "loglikelihood_rolling"]
        if text:
            return (f"l2p picks prompts by a query of each input's context; raw-text task(s) {', '.join(text)} "
                    "have no context")
        return None

    def fsdp_refusal(self):
        # the prompt module is a submodule of the root FSDP unit, gathered before the decoder runs (the
        # prompt hook is inside the root's forward or its registered head-only forward); every prompt
        # exists from setup (tests/distributed/test_fsdp_methods.py)
        return None
