"""Full fine-tuning: every parameter trains, a fresh optimizer per stage.

The baseline every forgetting number is compared against. No options.
"""

from clbench.method import NoOptions, Method, register


@register("full_ft")
class FullFT(Method):
    Options = NoOptions

    def __init__(self, options: NoOptions):
        self.options = options

    def setup(self, model, run):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def fsdp_refusal(self):
        return None  # every parameter trains, sharded like any other (tested in tests/distributed/test_fsdp.py)

    def step_resume_refusal(self):
        return None  # no state besides the weights: checkpoint_steps resumes it inside a stage (tests/training/test_midstage.py)
