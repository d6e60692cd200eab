"""clbench's built-in methods: one file per method, loaded by path (clbench.method.load_builtin_methods);
installed as the data package clbench_builtin.methods (pyproject.toml)."""
