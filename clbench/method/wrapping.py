"""A method that changes a stage's data and leaves the training to another method (`base:`).

SDFT and SSR decide what a stage trains on; how the weights train (full fine-tuning, a LoRA
adapter, a masked update) is a second, independent choice. `Wrapping` holds an optional inner
method built from the options `base` / `base_options` and delegates every hook to it; a
subclass overrides the hooks it needs and calls `self._inner(hook, ...)` where the base must
act too. Without a base every parameter trains (as full_ft). The inner method's state travels
under the key "base" of `_base_state()` / `_load_base_state()`.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from clbench.method import Method, call_hook, make_method
from clbench.errors import ConfigError

BASE_FIELD = Field(None, description="a method to wrap (e.g. lora); none = full fine-tuning")
BASE_OPTIONS_FIELD = Field(default_factory=dict, description="the wrapped method's options")
BaseName = Optional[str]
BaseOptions = dict[str, Any]


class Wrapping(Method):
    def __init__(self, options):
        self.options = options
        self.inner = None
        base = getattr(options, "base", None)
        if base is not None:
            if base == self.name:
                raise ConfigError(f"{self.name}: base cannot be {self.name} itself")
            self.inner = make_method(base, options.base_options, where=f"{self.name} base")
        elif getattr(options, "base_options", None):
            raise ConfigError(f"{self.name}: base_options given without base")

    def _inner(self, hook, *args, default=None):
        if self.inner is None:
            return default
        value = call_hook(self.inner, hook, *args)
        return default if value is None else value

    def needs_tasks(self):
        return self._inner("needs_tasks", default=[])

    def setup(self, model, run):
        if self.inner is not None:
            return call_hook(self.inner, "setup", model, run)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def stage_examples(self, model, stage):
        return self._inner("stage_examples", model, stage)

    def stage_start(self, model, stage):
        return self._inner("stage_start", model, stage, default=model)

    def param_groups(self, model, stage):
        return self._inner("param_groups", model, stage)

    def batch(self, examples, stage):
        return self._inner("batch", examples, stage)

    def extra_loss(self, model, batch, stage, out):
        return self._inner("extra_loss", model, batch, stage, out)

    def after_backward(self, model, stage):
        self._inner("after_backward", model, stage)

    def after_step(self, model, stage):
        self._inner("after_step", model, stage)

    def stage_end(self, model, stage):
        return self._inner("stage_end", model, stage, default=model)

    def stage_stats(self, stage):
        return self._inner("stage_stats", stage)

    def stream_refusal(self, output_types):
        return self._inner("stream_refusal", output_types)

    def trainable_params(self, model):
        return self._inner("trainable_params", model)

    def optimizer_name(self):
        return self._inner("optimizer_name")

    def _base_state(self):
        return self._inner("state_dict")

    def _load_base_state(self, state) -> None:
        if self.inner is not None and state is not None:
            call_hook(self.inner, "load_state_dict", state)
