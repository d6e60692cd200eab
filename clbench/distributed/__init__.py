"""Several processes, one run.

    collectives  process group, ranks, data sharding, reductions, the rank check (this package
                 re-exports its functions; clbench itself writes `collectives.rank()`)
    fsdp         sharded training with FSDP2 and torch.distributed.checkpoint
"""
from clbench.distributed.collectives import (all_reduce_sum, barrier, broadcast, check_ranks, enabled, finish, gather,
                                             init, init_group, is_main, local_rank, rank, shard, state_digest,
                                             sum_gradients, world_size)

__all__ = ["all_reduce_sum", "barrier", "broadcast", "check_ranks", "enabled", "finish", "gather", "init", "init_group",
           "is_main", "local_rank", "rank", "shard", "state_digest", "sum_gradients", "world_size"]
