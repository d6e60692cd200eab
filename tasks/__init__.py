"""clbench's built-in task YAML, streams.yaml and the presets (clbench.data.tasks reads them as files);
installed as the data package clbench_builtin.tasks (pyproject.toml)."""
