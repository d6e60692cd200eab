"""`clbench run`: a run, from the plan to the last evaluation. A run is one config run into one run
directory: every (method, seed) of it over the whole stream (docs/runs.md).

    planning    everything cheap validated and resolved before anything expensive starts
    runner      the run directory taken and checked around the loop
    loop        the continual loop: for each method and seed, stage after stage, train then evaluate
    resume      a (method, seed)'s checkpoint policy
    models      an alias, a local folder or a hub id -> (model, tokenizer)
    evaluate    every task of the stream through lm-eval on the live model
    trackers    TensorBoard and Weights & Biases
"""
