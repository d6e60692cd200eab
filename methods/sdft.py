"""SDFT, Self-Distillation Fine-Tuning (Yang et al. 2024, arXiv 2402.13669, ACL 2024; code
sail-sg/sdft).

Idea: fine-tuning on a dataset whose answers are written in another model's words moves the
model away from its own output distribution, and that shift is what erases earlier skills.
Before fine-tuning, the seed model therefore rewrites each target y of a training pair (x, y)
in its own words, with y in view:
    y~ = decode_theta( prompt_distill(x, y) )
y~ replaces y when it passes the checks, else y is kept; then ordinary SFT on (x, y~) with the
task's own template.

How it maps onto clbench:
- stage_examples (before stage_start, at the weights the stage starts from): every training
  pair of the stage's task, as (context, target) strings from RunContext.pairs (checked to be
  the strings the stage's Examples were tokenized from), is rewritten by
  clbench.method.generation.generate on the in-process model and re-tokenized with RunContext.tokenize.
  Continual use (a choice; the paper fine-tunes once): each stage's targets are rewritten by
  the model as it stands at that stage's start, so stage 1 rewrites with the base model.
- Multiple-choice and other log-likelihood scored tasks keep their targets: the trained target
  must stay the string lm-eval scores, so on such a task SDFT is plain SFT (stage_examples
  returns None and the stage's stats say so). A stream with no generation task (every stage
  would be plain SFT: exactly full fine-tuning, or the base method) or with a raw-text task
  (no target to rewrite) is refused at planning (stream_refusal), one line naming the tasks.
  A mixed stream runs: its log-likelihood stages are plain SFT (method_stats rewritten_fraction
  is 0 there).
- Generation tasks: instruction = the rendered context, reference = the target without its
  target delimiter and EOS. The rewrite is decoded up to EOS or max_new_tokens, its leading
  whitespace dropped (after "### Response:\n" models start with a newline, the usual `until`),
  cut before the task's first `until` string (what the task's own generation would keep),
  stripped (the authors strip predictions, eval/gen_distilled_data.py), and trained as
  target_delimiter + rewrite + EOS, the form of every generation target in clbench.
- Checks, in order (a failed one keeps the original target, bit-identical):
  empty        the stripped rewrite is empty;
  phrase       it contains one of `reject_phrases` (case-insensitive) or starts with one of
               `reject_prefixes` (the authors' verify(), eval/gen_distilled_data.py:54-68);
  answer       (accept: task_score) the task's own scoring (its first filter pipeline and first
               metric, clbench.method.generation.TaskView.score) gives the rewrite less than it gives
               the reference: exact-match tasks keep a rewrite only if the task still extracts
               the label from it. This generalises the authors' math check (last integer equal
               to the reference's, eval/eval_math.py:33-42); accept: phrases skips it, the
               authors' rule for open-ended data (check_func = lambda x: True);
  context      the re-tokenized example's prompt differs from the original's (the longer
               target would cut the context at the run's max_length).
- Stats: `self.stats[stage] = {task, total, rewritten, fraction, rejected: {reason: n}}` (also
  logged, and kept in state_dict, so a resumed run reports the earlier stages too).
- State: the stats and the base's state. Nothing else: after a resume the restored weights
  rewrite the resumed stage again (greedy: the same text; sampling: the same seed).
- base (optional): wrap another method for the training itself (the paper trains LoRA on q,v:
  `base: lora`, `base_options: {r: 8, target_modules: [q_proj, v_proj]}`); without one every
  parameter trains. A base whose stage_examples changes the stage's data is refused (SDFT
  rewrites the task's own pairs).

Options (defaults and sources):
  template "using"  the distill prompt: "using" (sail-sg/sdft main.py:36-44, used for Alpaca,
                    Dolly, LIMA, OpenHermes in scripts/*/sdft.sh), "refer" (main.py:26-34,
                    OpenFunction, Magicoder), "gsm8k" (main.py:79-84 with Llama-2's [INST] and
                    <<SYS>> wrapping). The alpaca-style ones are rendered as system + "\\n\\n" +
                    user, as alpaca's own template does; the authors' registered system strings
                    carry no separator and how LLaMA-Factory joined them there is unverified.
                    gsm8k is rendered without the BOS token its template starts with (clbench
                    encodes prompts without special tokens, as lm-eval does).
  prompt None       a custom distill prompt with {instruction} and {reference}; replaces template
  do_sample true, temperature 0.95, top_p 0.7, top_k 50, repetition_penalty 1.0
                    LLaMA-Factory's generation defaults, which the authors' runs use (no decoding
                    flags in scripts/*/sdft.sh; sail-sg/sdft#12; values read in the LLaMA-Factory
                    copy of DeepLearnXMU/SSR, src/llmtuner/hparams/generating_args.py). Draws are
                    seeded from the run seed and the stage. do_sample false: greedy.
  max_new_tokens None  the task's max_gen_toks (a rewrite the task's own generation could not
                    produce is no target for it); LLaMA-Factory's default is 512.
  accept "task_score"  see the checks; "phrases" for tasks without a usable answer check
  reject_phrases, reject_prefixes  the authors' lists (see the checks)
  batch_size 16     prompts per generation batch (a cost setting; sampled rewrites depend on it)
  base, base_options  none: full fine-tuning
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from clbench.method import MethodError, register
from clbench.method import generation
from clbench.method import wrapping
from clbench.method.masking import derive_seed

log = logging.getLogger(__name__)

SALT_SAMPLE = 41

_ALPACA_USER = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n"
TEMPLATES = {
    "using": ("Below are an instruction that describes a task along with a reference answer. "
              "Using the reference answer as a guide, write your own response.\n\n" + _ALPACA_USER),
    "refer": ("Below are an instruction that describes a task along with a reference answer. "
              "Refer to the reference answer and write your own response.\n\n" + _ALPACA_USER),
    "gsm8k": ("[INST] <<SYS>>\nYou are an expert in math. Below are a math question and its reference answer. "
              "Refer to the reference answer and write a response that appropriately answers the question.\n"
              "<</SYS>>\n\n{instruction}\n\n{reference} [/INST] Great! Let's think step by step. "),
}
REJECT_PHRASES = ["reference answer", "your response", "my response", "your own response", "now it's your turn"]
REJECT_PREFIXES = ["Your turn"]


class SdftOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: Literal["using", "refer", "gsm8k"] = Field("using", description="the paper's distill prompt")
    prompt: Optional[str] = Field(None, description="a custom distill prompt with {instruction} and {reference}")
    do_sample: bool = True
    temperature: float = Field(0.95, gt=0)
    top_p: float = Field(0.7, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    max_new_tokens: Optional[int] = Field(None, gt=0, description="none: the task's max_gen_toks")
    accept: Literal["task_score", "phrases"] = Field("task_score", description="which checks a rewrite must pass")
    reject_phrases: list[str] = Field(default_factory=lambda: list(REJECT_PHRASES))
    reject_prefixes: list[str] = Field(default_factory=lambda: list(REJECT_PREFIXES))
    batch_size: int = Field(16, gt=0, description="prompts per generation batch")
    base: wrapping.BaseName = wrapping.BASE_FIELD
    base_options: wrapping.BaseOptions = wrapping.BASE_OPTIONS_FIELD


@register("sdft")
class Sdft(wrapping.Wrapping):
    Options = SdftOptions

    def __init__(self, options: SdftOptions):
        super().__init__(options)
        if options.prompt is not None:
            try:
                options.prompt.format(instruction="", reference="")
            except (KeyError, IndexError, ValueError) as e:
                raise MethodError(f"sdft: prompt must be a format string with {{instruction}} and {{reference}} only: {e}")
        self.run = None
        self.stats: dict[int, dict] = {}
        self.last_rewrites: list[str] = []  # the stage's rewrites as checked, in example order (inspection)

    def setup(self, model, run):
        self.run = run
        return super().setup(model, run)

    def _render(self, instruction: str, reference: str) -> str:
        return (self.options.prompt or TEMPLATES[self.options.template]).format(instruction=instruction,
                                                                                 reference=reference)

    def _why_rejected(self, rewrite: str, view, doc, reference: str) -> str | None:
        o = self.options
        if not rewrite:
            return "empty"
        low = rewrite.lower()
        if any(p.lower() in low for p in o.reject_phrases) or any(rewrite.startswith(p) for p in o.reject_prefixes):
            return "phrase"
        if o.accept == "task_score" and view.score(doc, view.delimiter + rewrite) < view.score(doc, view.delimiter + reference):
            return "answer"
        return None

    def fsdp_refusal(self):
        # the rewrites are generated on the gathered model (clbench.method.generation under fsdp.unsharded), the
        # same on every rank; sharded it is its base method's (tests/distributed/test_fsdp_methods.py)
        return self._inner("fsdp_refusal")

    def stream_refusal(self, output_types):
        """SDFT rewrites generation targets: refused on a stream without one, or with raw text."""
        text = [t for t, kind in output_types.items() if kind == "loglikelihood_rolling"]
        if text:
            return f"sdft rewrites (context, target) pairs; raw-text task(s) {', '.join(text)} have none"
        if output_types and not any(kind == "generate_until" for kind in output_types.values()):
            return ("sdft rewrites generated targets, and every task of this stream is scored by log-likelihood "
                    f"({', '.join(f'{t}: {k}' for t, k in output_types.items())}), whose targets it keeps: it would be "
                    "plain fine-tuning (full_ft, or its base method); use a stream with generation tasks")
        return self._inner("stream_refusal", output_types)

    def stage_examples(self, model, stage):
        if self._inner("stage_examples", model, stage) is not None:
            raise MethodError("sdft: the base method changes the stage's examples; SDFT rewrites the task's own pairs")
        run = self.run
        if run is None or run.task is None or run.pairs is None or run.tokenize is None:
            raise MethodError("sdft needs the loop's RunContext (task, pairs, tokenize)")
        if stage.task not in run.tasks:  # a joint multitask stage: no single task's pairs to rewrite
            return None
        view = generation.TaskView(run.task(stage.task))
        examples = list(stage.examples)
        pairs = run.pairs(stage.task)[:len(examples)]
        if len(pairs) != len(examples) or run.tokenize(pairs) != examples:
            raise MethodError(f"sdft: stage {stage.stage} ({stage.task}): the stage's examples are not the task's "
                              "training pairs in order")
        st = {"task": stage.task, "total": len(examples), "rewritten": 0, "fraction": 0.0, "rejected": {}}
        self.stats[stage.stage] = st
        if view.output_type != "generate_until":  # scored by log-likelihood: the target must stay the scored string
            st["multiple_choice"] = True
            log.info("sdft stage %d (%s): %s, targets kept (plain SFT)", stage.stage, stage.task, view.output_type)
            return None
        eos = run.tokenizer.eos_token
        refs = []
        for _, target in pairs:
            ref = target[len(view.delimiter):] if target.startswith(view.delimiter) else target
            refs.append((ref[:-len(eos)] if eos and ref.endswith(eos) else ref).strip())
        o = self.options
        rewrites = generation.generate(model, run.tokenizer, [self._render(ctx, ref) for (ctx, _), ref in zip(pairs, refs)],
                              max_new_tokens=o.max_new_tokens or view.max_gen_toks,
                              do_sample=o.do_sample, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                              repetition_penalty=o.repetition_penalty,
                              seed=derive_seed(stage.seed, stage.stage, SALT_SAMPLE), batch_size=o.batch_size,
                              autocast=run.autocast)
        self.last_rewrites = [generation.cut_at_stop(r[0].lstrip(), view.until)[0].strip() for r in rewrites]
        out = []
        for ex, (ctx, _), ref, doc, rewrite in zip(examples, pairs, refs, view.docs, self.last_rewrites):
            why = self._why_rejected(rewrite, view, doc, ref)
            new = None
            if why is None:
                new = run.tokenize([(ctx, f"{view.delimiter}{rewrite}{eos or ''}")])[0]
                if new.input_ids[:new.n_prompt] != ex.input_ids[:ex.n_prompt]:
                    why, new = "context", None
            if why is None:
                st["rewritten"] += 1
                out.append(new)
            else:
                st["rejected"][why] = st["rejected"].get(why, 0) + 1
                out.append(ex)
        st["fraction"] = st["rewritten"] / max(1, st["total"])
        log.info("sdft stage %d (%s): %d of %d targets rewritten; kept originals: %s", stage.stage, stage.task,
                 st["rewritten"], st["total"], st["rejected"] or "none")
        return out

    def stage_stats(self, stage):
        """rewritten_fraction: the share of the stage's targets replaced by the model's rewrite (a
        base method's own stats alongside)."""
        mine = {}
        st = self.stats.get(stage.stage)
        if st is not None and st.get("task") == stage.task:
            mine["rewritten_fraction"] = float(st["fraction"])
        return {**(self._inner("stage_stats", stage) or {}), **mine} or None

    def state_dict(self):
        return {"stats": {int(k): v for k, v in self.stats.items()}, "base": self._base_state()}

    def load_state_dict(self, state):
        self.stats = {int(k): v for k, v in (state.get("stats") or {}).items()}
        self._load_base_state(state.get("base"))
