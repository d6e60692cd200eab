"""The one training loop and what drives it; it knows nothing of run directories or results.

    train       train_stage (the loop), the LM helpers (split_head, lm_loss, Forward), collation
    stage       one stage of a method, driven the one way the loop, the tests and the benchmark use
    midstage    checkpoints inside a stage (`checkpoint_steps`)
"""
