"""checkpoint_steps: a run killed in the middle of a stage resumes at the last step checkpoint,
not the stage's beginning, and ends with the numbers of an uninterrupted run."""

import json
import os
import subprocess
import sys
import textwrap

import yaml

from conftest import REPO

# full_ft and lora as built in, plus a process that dies (os._exit: no handler runs, as a kill)
# in the 5th optimizer step of stage 2 (after the checkpoint of step 4), once per method: the marker file says it died before
DYING = textwrap.dedent("""
    import os
    from pathlib import Path

    from clbench import paths
    from clbench.method import method_module, register

    def dying(base):
        class Dying(base):
            def after_step(self, model, stage):
                super().after_step(model, stage)
                folder = os.environ.get("CLBENCH_TEST_DIE")
                marker = Path(folder or ".") / f"died-{self.name}-rank{os.environ.get('RANK', '0')}"
                if folder and stage.stage == 2 and stage.global_step == 4 and not marker.exists():
                    marker.touch()
                    os._exit(3)
        return Dying

    register("ft_dies")(dying(method_module(paths.BUILTIN_METHODS_DIR / "full_ft.py").FullFT))
    register("lora_dies")(dying(method_module(paths.BUILTIN_METHODS_DIR / "lora.py").LoRA))
""")


def _config(tmp_path, methods):
    (tmp_path / "dying.py").write_text(DYING)
    cfg = {"model": "tiny", "tasks": ["tiny_parity", "tiny_compare"], "task_dirs": [str(REPO / "configs" / "tiny_tasks")],
           "method_files": [str(tmp_path / "dying.py")], "methods": methods, "seeds": [0], "threads": 1,
           "train": {"steps": 6, "lr": 3e-3, "batch_size": 8, "max_length": 64},
           "eval": {"limit": 8, "batch_size": 16, "log_samples": False}, "precision": "fp32",
           "checkpoint_interval": 0, "checkpoint_steps": 2}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path, out, die_in=None, ranks=None, strategy="fsdp"):
    """`clbench run` in a process of its own; ranks: under torchrun, sharded (distributed.strategy
    fsdp) or replicated (strategy ddp)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CLBENCH_TEST_DIE", None)
    if die_in is not None:
        env["CLBENCH_TEST_DIE"] = str(die_in)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks else [sys.executable]
    extra = ["--set", f"distributed.strategy={strategy}"] if ranks else []
    return subprocess.run([*launch, "-m", "clbench", "run", str(path), "--output-dir", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=600)


def _said(proc) -> str:
    return " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines


def _numbers(out):
    res = json.loads((out / "results.json").read_text())
    return {m: (e["seeds"]["0"]["matrix"], [(s["first_loss"], s["last_loss"], s["steps"]) for s in e["seeds"]["0"]["stages"]])
            for m, e in res["methods"].items()}


def test_a_run_killed_inside_a_stage_resumes_at_its_step_checkpoint(tmp_path):
    path = _config(tmp_path, [{"name": "ft_dies"}, {"name": "lora_dies", "train": {"lr": 3e-2}}])
    ref = _run(path, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    first = _run(path, out, die_in=tmp_path)  # full FT dies in step 5 of stage 2
    assert first.returncode == 3
    assert (out / "checkpoints" / "ft_dies" / "seed0" / "stage2.steps.pt").is_file()
    second = _run(path, out, die_in=tmp_path)  # full FT resumes at step 4 and ends; then LoRA dies the same way
    assert second.returncode == 3
    assert "[ft_dies seed 0] stage 2 tiny_compare: resumed at step 4 of 6" in _said(second)
    third = _run(path, out, die_in=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "[lora_dies seed 0] stage 2 tiny_compare: resumed at step 4 of 6" in _said(third)
    assert _numbers(out) == _numbers(tmp_path / "ref")  # matrices and every stage's losses, exactly
    assert not list(out.glob("checkpoints/**/*.steps.pt"))  # recorded stages leave no step checkpoint behind


def test_a_method_with_state_inside_a_stage_restarts_the_stage_and_says_so(tmp_path, run_cli, one_thread):
    path = _config(tmp_path, [{"name": "ewc"}])
    code, out, err = run_cli("run", path, "--output-dir", tmp_path / "out")
    assert code == 0, err
    assert "checkpoint_steps: not used, a stage restarts from its beginning (not verified" in " ".join((out + err).split())
    assert not list((tmp_path / "out").glob("checkpoints/**/*.steps*"))


def test_under_fsdp_the_step_checkpoint_is_sharded_and_resumes(tmp_path):
    """Two sharded processes: each rank writes its shards of the model and of AdamW's state through
    torch.distributed.checkpoint (stage2.steps.dcp); killed in step 5 of stage 2, the run resumes at
    step 4 with the numbers of an uninterrupted sharded run."""
    path = _config(tmp_path, [{"name": "ft_dies"}])
    ref = _run(path, tmp_path / "ref", ranks=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "out"
    first = _run(path, out, die_in=tmp_path, ranks=2)
    assert first.returncode != 0
    assert (out / "checkpoints" / "ft_dies" / "seed0" / "stage2.steps.dcp" / "meta.pt").is_file()
    second = _run(path, out, die_in=tmp_path, ranks=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[ft_dies seed 0] stage 2 tiny_compare: resumed at step 4 of 6" in _said(second)
    assert _numbers(out) == _numbers(tmp_path / "ref")
    assert not list(out.glob("checkpoints/**/*.steps.dcp"))


def test_under_ddp_rank_zero_writes_the_step_checkpoint_and_every_rank_resumes_from_it(tmp_path):
    """Two replicated processes: rank 0 writes stage2.steps.pt (model, AdamW, scheduler, RNG) and
    every rank reads it; killed in step 5 of stage 2, the run resumes at step 4 with the numbers of
    an uninterrupted replicated run."""
    path = _config(tmp_path, [{"name": "ft_dies"}])
    ref = _run(path, tmp_path / "ref", ranks=2, strategy="ddp")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "out"
    first = _run(path, out, die_in=tmp_path, ranks=2, strategy="ddp")
    assert first.returncode != 0
    assert (out / "checkpoints" / "ft_dies" / "seed0" / "stage2.steps.pt").is_file()
    second = _run(path, out, die_in=tmp_path, ranks=2, strategy="ddp")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[ft_dies seed 0] stage 2 tiny_compare: resumed at step 4 of 6" in _said(second)
    assert _numbers(out) == _numbers(tmp_path / "ref")
    assert not list(out.glob("checkpoints/**/*.steps.pt"))
