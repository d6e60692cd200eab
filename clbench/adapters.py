"""What the peft adapter methods (lora, adalora, miss) share: the continual variants.

  seq  one adapter carried through all stages;
  inc  after each stage the adapter is merged into the weights and a fresh one starts.
"""

from __future__ import annotations


def attach(model, config):
    """Wrap `model` with a new peft adapter built from `config`."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def for_stage(model, config, stage, variant: str):
    """The model to train in `stage`: with `inc`, merge the last adapter and attach a fresh one."""
    if variant == "inc" and stage.stage > 1:
        return attach(model.merge_and_unload(), config)
    return model
