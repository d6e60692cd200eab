"""The results of a run directory: what it holds, who writes it, how it is read.

    contract     what a run directory holds; reports and outside tools read only this
    rundir       RunDir: the one owner of a run directory (lock, config.yaml, results.json)
    recorder     the results store of a running run
    rundirs      run directories read through the contract (matrices, summaries)
    resultcheck  a run directory's results checked before they are resumed from or reported
    metrics      continual-learning metrics: pure functions of the accuracy matrix
    stats        paired comparisons with percentile-bootstrap CIs, the learning check
"""
