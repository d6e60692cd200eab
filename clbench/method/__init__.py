"""What a method author imports: the protocol and the registry, and beside them the tools methods
share (import the submodule you need: `from clbench.method import masking`).

    protocol    Method and its hooks, the Stage and RunContext views, `call_hook` (clbench.method re-exports it)
    registry    @register, the built-in package, method files, plugins (clbench.method re-exports it)
    lm          the LM helpers: split_head, the head-only forward (target_logits), lm_loss, Forward
    masking     masked updates: the one implementation of every mask-based method
    adapters    what the peft adapter methods share (continual variants, merges)
    wrapping    a method that changes a stage's data and leaves the training to another (`base:`)
    generation  generation and choice scoring on the in-process model
    prompting   soft prompts in every forward
    merging     model merging over state dicts (task arithmetic, TIES, DARE, LoTA's merge)

Nothing here imports the loop, the run or the results: a method sees the model, its Stage view and
its RunContext, never the run directory.
"""
from clbench.method.protocol import (HOOKS, Method, MethodError, NoOptions, RunContext, Stage, StageMeans, call,
                                     call_hook, check_protocol, count_trainable, default_param_groups, frozen_copy)
from clbench.method.registry import (BUILTIN_PACKAGE, FILE_PREFIX, available, builtin_package, get, load_builtin_methods,
                                     load_method_file, load_plugin_methods, make, make_method, method_module, methods_in, origin,
                                     register)

__all__ = ["HOOKS", "Method", "MethodError", "NoOptions", "RunContext", "Stage", "StageMeans", "call", "call_hook", "check_protocol",
           "count_trainable", "default_param_groups", "frozen_copy", "BUILTIN_PACKAGE", "FILE_PREFIX", "available",
           "builtin_package", "get", "load_builtin_methods", "load_method_file", "load_plugin_methods", "make", "make_method",
           "method_module", "methods_in", "origin", "register"]
