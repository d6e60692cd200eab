"""Many runs over one base config, each a `clbench run` subprocess.

    sweep   `clbench sweep`: a grid of runs in one sweep directory
    tune    `clbench tune`: each method's setting chosen on validation, the winners run on test
    launch  the launchers: local processes, Ray, Slurm
"""
