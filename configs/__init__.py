"""The shipped run configs (clbench run configs/demo.yaml); installed as the data package
clbench_builtin.configs (pyproject.toml)."""
