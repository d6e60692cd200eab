"""Soft prompts in every forward clbench makes: the machinery of the prompt-based methods
(methods/progressive_prompts.py, methods/l2p.py).

peft's prompt tuning (PeftModelForCausalLM) prepends its virtual tokens in the wrapper's own
forward; clbench's fast paths call the decoder directly (training's LM head at the target
positions only, evaluation's prefix-shared log-likelihoods, greedy generation with a KV cache),
so they would score the model without its prompt. Here the prompt lives where every path goes
through: `attach(model, injector)` registers `injector` (a `PromptInjector`, an nn.Module whose
parameters are the prompts) as the submodule `clbench_prompt` of the causal LM and makes its
decoder's forward (`model.get_decoder()`) prepend the prompt's embeddings. Per decoder call:

  - prefill (no KV cache yet, or an empty one): the P prompt vectors go in front of the input's
    embeddings; a 2-D attention mask gets P ones in front; a 4-D one (the packed layout of the
    prefix-sharing evaluation) becomes (P + L) x (P + L): the prompt attends causally to itself,
    every input row to the whole prompt and, as before, to what it attended to; position ids
    (when the caller gives them) move up by P and the prompt takes 0..P-1. The decoder's output
    (last_hidden_state and any hidden_states) loses the P prompt rows again, so that every caller
    sees the shapes of its own input: the LM head, `logits_to_keep`, the target selection.
  - a step with a KV cache that already holds the prompt (generation): the input is fed as is,
    its mask gets P ones in front and its positions move up by P.

With P = 0 (no prompt yet: the evaluation before the first stage) the decoder runs untouched.
The sequence a row sees is [prompt, its tokens] at positions 0..P+n-1, whatever the path.

An injector whose prompt depends on the input (L2P picks prompts by a query computed from the
context) sets `needs_context`: it must know where each row's context ends, never the target or a
continuation (a choice must not pick its own prompt). The scoring paths say it through
`context_lengths(model, fn)` (clbench/training/train.py's target_logits: the first target position of
each row; clbench/run/evaluate.py's prefix-shared scoring: each packed row's context). A forward of a
generation (use_cache=True, no scope) has only context: all its real tokens are. Any other
forward of such a model without a scope raises instead of scoring with a wrong prompt
(lm-eval's own log-likelihood path, CLBENCH_EVAL_PREFIX_SHARING=0).

The packed multi-row prefill of clbench.method.generation._grouped_greedy is refused for a prompted
model (`prompted(model)`), which then decodes as transformers' generate does (_decode_batch).
"""

from __future__ import annotations

import abc
import contextlib
import types

import torch

ATTR = "clbench_prompt"
_NAMES = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache")


class PromptError(RuntimeError):
    pass


class PromptInjector(torch.nn.Module, metaclass=abc.ABCMeta):
    """The prompt of a model: subclasses give `length()` (the prompt tokens every row gets now)
    and `prompt_embeds(call)` (the (B, P, D) vectors of a prefill; `call` is a `Call`)."""

    needs_context = False

    def __init__(self):
        super().__init__()
        self._context = None  # per-row context lengths of the forwards in a context_lengths scope

    @abc.abstractmethod
    def length(self) -> int:
        """The prompt tokens every row gets now."""

    @abc.abstractmethod
    def prompt_embeds(self, call: "Call") -> torch.Tensor:
        """The (B, P, D) prompt vectors of a prefill."""

    # the decoder's forward, bound to this module (a deep copy of the model rebinds it to the copy)
    def _decoder_forward(self, *args, **kwargs):
        dec = self.__dict__["_decoder"]
        orig = type(dec).forward
        kw = dict(zip(_NAMES, args))
        kw.update(kwargs)
        P = self.length()
        if P == 0:
            return orig(dec, **kw)
        past = kw.get("past_key_values")
        past_len = past.get_seq_length() if past is not None else 0
        mask, pos = kw.get("attention_mask"), kw.get("position_ids")
        if past_len == 0:
            call = Call(self, dec, orig, kw)
            prompt = self.prompt_embeds(call)
            emb = kw.pop("inputs_embeds", None)
            ids = kw.pop("input_ids", None)
            if emb is None:
                emb = dec.get_input_embeddings()(ids)
            B, L = emb.shape[:2]
            if prompt.shape[:2] != (B, P):
                raise PromptError(f"prompt of shape {tuple(prompt.shape)} for a batch of {B} rows and {P} prompt tokens")
            kw["inputs_embeds"] = torch.cat([prompt.to(emb.dtype), emb], dim=1)
            kw["attention_mask"] = _prefill_mask(mask, P)
            if pos is not None:
                kw["position_ids"] = torch.cat([torch.arange(P, device=pos.device).expand(pos.shape[0], P), pos + P], 1)
            out = orig(dec, **kw)
            out.last_hidden_state = out.last_hidden_state[:, P:]
            if getattr(out, "hidden_states", None) is not None:
                out.hidden_states = tuple(h[:, P:] for h in out.hidden_states)
            return out
        if past_len < P:
            raise PromptError(f"a KV cache of {past_len} positions cannot hold the {P}-token prompt")
        kw["attention_mask"] = _step_mask(mask, P)
        if pos is not None:
            kw["position_ids"] = pos + P
        return orig(dec, **kw)


class Call:
    """One prefill forward as the injector sees it: the decoder, its unprompted forward
    (`plain(**kw)`), the caller's arguments, and `context_weights()`: (B, L) float weights, 1 on
    the positions of each row's context (the real tokens before the first target or
    continuation), 0 elsewhere."""

    def __init__(self, injector, dec, orig, kw):
        self.injector, self.dec, self._orig, self.kw = injector, dec, orig, dict(kw)

    def plain(self, **kw):
        return self._orig(self.dec, **kw)

    def hidden(self) -> torch.Tensor:
        """The unprompted decoder's last hidden states of this call's input (no cache, no grad)."""
        kw = {k: v for k, v in self.kw.items() if k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")}
        with torch.no_grad():
            return self.plain(**kw, use_cache=False).last_hidden_state

    def context_weights(self, L: int, device) -> torch.Tensor:
        mask = self.kw.get("attention_mask")
        lengths = self.injector._context
        if lengths is None and not self.kw.get("use_cache"):
            raise PromptError(
                f"{type(self.injector).__name__} chooses its prompt from each row's context, and this forward does "
                "not say where the contexts end (clbench.method.prompting.context_lengths): clbench's training, prefix-shared "
                "evaluation and generation do; lm-eval's own log-likelihood path (CLBENCH_EVAL_PREFIX_SHARING=0) "
                "and direct model calls do not")
        if mask is not None and mask.dim() == 2:
            real = mask[:, -L:].to(device).bool()
        else:  # 4-D (packed, no left padding) or none: every position is real
            real = torch.ones((_rows(self.kw), L), dtype=torch.bool, device=device)
        if lengths is not None:
            n = torch.as_tensor(lengths, device=device).reshape(-1, 1).clamp(min=1)
            real = real & (real.long().cumsum(1) <= n)
        return real.float()


def _rows(kw) -> int:
    x = kw.get("input_ids")
    return (x if x is not None else kw["inputs_embeds"]).shape[0]


def _prefill_mask(mask, P):
    if mask is None:
        return None
    if mask.dim() == 2:
        return torch.cat([torch.ones((mask.shape[0], P), dtype=mask.dtype, device=mask.device), mask], 1)
    if mask.dim() != 4:
        raise PromptError(f"attention mask of {mask.dim()} dimensions")
    B, H, Q, K = mask.shape
    if mask.dtype == torch.bool:
        yes, no = True, False
    else:  # additive: 0 attends, the dtype's minimum does not
        yes, no = 0.0, torch.finfo(mask.dtype).min
    out = torch.full((B, H, P + Q, P + K), no, dtype=mask.dtype, device=mask.device)
    tri = torch.ones((P, P), dtype=torch.bool, device=mask.device).tril()
    out[:, :, :P, :P] = torch.where(tri, torch.tensor(yes, dtype=mask.dtype, device=mask.device),
                                    torch.tensor(no, dtype=mask.dtype, device=mask.device))
    out[:, :, P:, :P] = yes
    out[:, :, P:, P:] = mask
    return out


def _step_mask(mask, P):
    if mask is None:
        return None
    if mask.dim() == 2:
        return torch.cat([torch.ones((mask.shape[0], P), dtype=mask.dtype, device=mask.device), mask], 1)
    yes = True if mask.dtype == torch.bool else 0.0
    front = torch.full((*mask.shape[:3], P), yes, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], -1)


def attach(model: torch.nn.Module, injector: PromptInjector) -> torch.nn.Module:
    """Make `injector` the prompt of every forward of `model` (a transformers causal LM with a
    separate decoder); returns the model."""
    if prompted(model):
        raise PromptError("the model already has a prompt")
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        raise PromptError(f"{type(model).__name__} has no separate decoder to prompt")
    model.add_module(ATTR, injector)
    injector.__dict__["_decoder"] = dec  # not a submodule: the decoder stays where it is in the state dict
    dec.forward = types.MethodType(PromptInjector._decoder_forward, injector)
    return model


def injector_of(model) -> PromptInjector | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inj = getattr(base, ATTR, None)
    return inj if isinstance(inj, PromptInjector) else None


def prompted(model) -> bool:
    """Whether the model's forwards carry a soft prompt (a fast path that packs several rows into
    one sequence cannot serve it)."""
    return injector_of(model) is not None


def needs_context(model) -> bool:
    inj = injector_of(model)
    return inj is not None and inj.needs_context


@contextlib.contextmanager
def context_lengths(model, lengths):
    """The forwards inside score rows whose contexts end after lengths() tokens (a callable, run
    only for a model whose prompt depends on the context; a list or tensor of one length per row)."""
    inj = injector_of(model)
    if inj is None or not inj.needs_context:
        yield
        return
    before = inj._context
    inj._context = lengths() if callable(lengths) else lengths
    try:
        yield
    finally:
        inj._context = before
