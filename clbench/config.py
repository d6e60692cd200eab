"""The experiment config: YAML + `--set key.path=value` overrides, validated strictly.

Every unknown key fails naming the key and the allowed ones; every wrong type fails
naming the field path. The resolved config (every default filled in) is saved with the
results as config.yaml.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clbench.errors import ConfigError
from clbench.schedule import check as check_schedule

# The trackers a config may name and the package each needs (clbench/run/trackers.py runs them).
TRACKERS = ("tensorboard", "wandb")
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install 'clbench[sweep]' (or: pip install tensorboard)"),
                     "wandb": ("wandb", "pip install 'clbench[wandb]' (or: pip install wandb)")}


def check_trackers(names) -> list[str]:
    """Raise ConfigError naming the missing package for each configured tracker that cannot be imported."""
    for name in names:
        if name not in _TRACKER_PACKAGES:
            raise ConfigError(f"trackers: unknown tracker {name!r}; available: {', '.join(TRACKERS)}")
        module, how = _TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"trackers: {name} needs the {module!r} package, which is not installed: {how}")
    return list(names)


# Fields that never change results: they may differ when a run directory is resumed.
NON_RESULT_FIELDS = ("cache_dir", "threads", "keep_checkpoints", "checkpoint_interval", "checkpoint_steps", "trackers",
                     "distributed")


def comparable_config(cfg: dict) -> dict:
    """A config as compared between runs: JSON values, without the fields that do not change results."""
    import json

    cfg = json.loads(json.dumps(cfg))
    for ignore in NON_RESULT_FIELDS:
        cfg.pop(ignore, None)
    return cfg


# A seed seeds numpy's generator too, which takes 0..2**32-1 only: anything else failed after training.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainOverrides(Strict):
    """Per-method or per-stage overrides of TrainConfig (None = inherit)."""

    lr: Optional[float] = Field(None, gt=0, description="peak learning rate")
    steps: Optional[int] = Field(None, gt=0, description="optimizer steps per stage")
    epochs: Optional[float] = Field(None, gt=0, description="epochs per stage (instead of steps)")
    batch_size: Optional[int] = Field(None, gt=0)
    grad_accum: Optional[int] = Field(None, gt=0)
    max_length: Optional[int] = Field(None, gt=8)
    weight_decay: Optional[float] = Field(None, ge=0)
    max_grad_norm: Optional[float] = Field(None, gt=0)
    warmup_steps: Optional[int] = Field(None, ge=0)
    warmup_fraction: Optional[float] = Field(None, gt=0, lt=1)
    lr_schedule: Optional[Literal["constant", "linear", "cosine", "wsd"]] = None
    min_lr_ratio: Optional[float] = Field(None, ge=0, lt=1)
    decay_fraction: Optional[float] = Field(None, gt=0, le=1)
    decay_shape: Optional[Literal["linear", "cosine", "1-sqrt"]] = None
    max_train_examples: Optional[int] = Field(None, gt=0)
    optimizer: Optional[Literal["adamw", "sgd", "rmsprop"]] = None
    momentum: Optional[float] = Field(None, ge=0, lt=1)


class TrainConfig(Strict):
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    steps: Optional[int] = Field(40, gt=0, description="optimizer steps per stage (used when epochs is null)")
    epochs: Optional[float] = Field(None, gt=0, description="epochs per stage; overrides steps when set")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_length: int = Field(256, gt=8, description="prompt+target tokens; longer examples are cut from the left of the prompt")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="global gradient-norm clip; null = none")
    warmup_steps: int = Field(0, ge=0)
    warmup_fraction: Optional[float] = Field(None, gt=0, lt=1, description="warmup over this share of each stage's "
                                             "steps instead of warmup_steps (Ibrahim et al. 2024: 0.01)")
    lr_schedule: Literal["constant", "linear", "cosine", "wsd"] = Field(
        "constant", description="per stage, after the warmup: constant, linear or cosine decay, or wsd "
        "(warmup-stable-decay); every stage re-warms and re-decays (clbench/schedule.py)")
    min_lr_ratio: float = Field(0.0, ge=0, lt=1, description="linear, cosine, wsd: decay towards this share of lr "
                                "(Ibrahim et al. 2024: 0.1)")
    decay_fraction: Optional[float] = Field(None, gt=0, le=1, description="wsd: share of the stage's steps in the "
                                            "final decay (default 0.1, MiniCPM)")
    decay_shape: Optional[Literal["linear", "cosine", "1-sqrt"]] = Field(None, description="wsd: the decay's shape "
                                                                          "(default linear)")
    max_train_examples: Optional[int] = Field(None, gt=0, description="cap on training examples per task")
    head_only_targets: bool = Field(True, description="compute the LM head and loss only at target positions")
    optimizer: Optional[Literal["adamw", "sgd", "rmsprop"]] = Field(
        None, description="adamw, sgd or rmsprop; null: the optimizer the method names (Method.optimizer_name, "
        "from its paper's code), else adamw. Recorded per stage in results.json")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd and rmsprop: momentum (adamw ignores it)")

    @model_validator(mode="after")
    def _check_schedule(self):
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError("set warmup_steps or warmup_fraction, not both")
        if self.min_lr_ratio and self.lr_schedule == "constant":
            raise ValueError("min_lr_ratio needs a decaying lr_schedule (linear, cosine or wsd), not constant")
        if self.lr_schedule != "wsd" and (self.decay_fraction is not None or self.decay_shape is not None):
            raise ValueError(f"decay_fraction and decay_shape belong to lr_schedule wsd, not {self.lr_schedule}")
        why = check_schedule(self, self.steps) if self.epochs is None and self.steps else None
        if why:
            raise ValueError(why.replace("train.", ""))
        return self

    def merged(self, *overrides: Optional[TrainOverrides]) -> "TrainConfig":
        data = self.model_dump()
        for o in overrides:
            if o is not None:
                data.update({k: v for k, v in o.model_dump().items() if v is not None})
                if o.epochs is not None:
                    data["epochs"] = o.epochs
                elif o.steps is not None:
                    data["epochs"] = None
                if o.warmup_fraction is not None:  # one way of giving the warmup wins, as steps/epochs
                    data["warmup_steps"] = 0
                elif o.warmup_steps is not None:
                    data["warmup_fraction"] = None
        return TrainConfig(**data)


class DistributedConfig(Strict):
    """How several processes share the training (clbench/distributed/collectives.py, clbench/distributed/fsdp.py)."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp = every rank holds the whole model, gradients summed; fsdp = parameters, gradients and "
        "optimizer state sharded over the ranks (torch FSDP2, one unit per decoder layer); also set by "
        "accelerate's FSDP version 2 launch (ACCELERATE_USE_FSDP, FSDP_VERSION=2). Same results either way")


class EvalConfig(Strict):
    limit: Optional[int] = Field(None, gt=0, description="evaluate at most this many test examples per task")
    batch_size: Union[int, Literal["auto"]] = Field(16, description="lm-eval batch size")
    log_samples: bool = Field(True, description="write lm-eval's per-example records to samples/")
    offdiag_limit: Optional[int] = Field(
        None, gt=0, description="evaluate cells off the diagonal and before the final row on the first N test examples only "
        "(ACC, BWT, LA stay exact; FWT and forgetting become estimates)")
    bootstrap_iters: int = Field(0, ge=0, description="lm-eval stderr bootstrap (0 = skip)")
    other_kind: bool = Field(
        False, description="also score every stream task its other way after every stage: a generation task "
        "(`<task>_gen`, exact match) by its log-likelihood twin `<task>` and the reverse; never trained, "
        "reported as a second matrix (docs/metrics.md)")

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return v

    @model_validator(mode="after")
    def _offdiag_within_limit(self):
        if self.offdiag_limit is not None and self.limit is not None and self.offdiag_limit > self.limit:
            raise ValueError(f"eval.offdiag_limit ({self.offdiag_limit}) is above eval.limit ({self.limit}): "
                             "the cells off the diagonal are a subset of the examples every cell is scored on")
        return self


class MergeSpec(Strict):
    """One merged model, evaluated after the last stage as the extra row `merged:<label>`."""

    how: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties", "lota_additive"] = Field(
        description="peft's merges (clbench/method/merging.py): task_arithmetic (theta_0 + lam * sum tau), ties (trim, elect "
        "sign, disjoint mean), dare_linear / dare_ties (drop entries at random with probability 1 - density, rescale "
        "by 1/density, then sum / TIES; seeded by the (method, seed)'s seed); or lota_additive (theta_0 + sum tau, LoTA's merge "
        "of sparse task vectors)")
    lam: float = Field(1.0, description="scaling of the (merged) task vectors: every merge but lota_additive")
    density: float = Field(0.2, gt=0, le=1, description="ties: share of each task vector's entries kept by trimming; "
                           "dare_*: probability that an entry is kept")
    scope: Literal["tensor", "global"] = Field("tensor", description="ties: trim per tensor or over the whole model")
    label: Optional[str] = Field(None, description="row name after 'merged:' (default: how)")

    @property
    def row_name(self) -> str:
        return f"merged:{self.label or self.how}"

    @model_validator(mode="after")
    def _check(self):
        if self.how == "lota_additive" and self.lam != 1.0:
            raise ValueError("lota_additive has no lam (it adds the task vectors as they are); use task_arithmetic")
        if "density" in self.model_fields_set and self.how in ("task_arithmetic", "lota_additive"):
            raise ValueError(f"{self.how} has no density (it keeps every entry); density is for ties, dare_linear "
                             "and dare_ties")
        if self.scope == "global" and self.how != "ties":
            raise ValueError(f"scope: global is for ties only (its trim ranks magnitudes over the whole model); "
                             f"{self.how} works tensor by tensor")
        return self


class MethodSpec(Strict):
    name: str = Field(description="registered method name (clbench list methods)")
    label: Optional[str] = Field(None, description="name in the results (default: name); lets one method run with two option sets")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options (validated by the method)")
    train: Optional[TrainOverrides] = Field(None, description="training overrides for this method (e.g. a higher lr for LoRA)")
    mode: Literal["sequential", "multitask", "single"] = Field(
        "sequential", description="sequential: the continual stream; multitask: one joint training on all tasks, "
        "shuffled together, with the stream's total budget (the reference for intransigence); single: each task "
        "trained alone from the base model (per-task upper bounds)")
    merge: list[MergeSpec] = Field(
        default_factory=list, description="merge the per-stage task vectors after the last stage (sequential: "
        "tau_t = theta_t - theta_{t-1}; single: tau_t = theta_t - theta_0); each merged model is evaluated as the "
        "row `merged:<how>`")

    @model_validator(mode="after")
    def _check_merge(self):
        names = [m.row_name for m in self.merge]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two merges share the row name {dup}: give one a `label`")
        if self.merge and self.mode == "multitask":
            raise ValueError("merge needs per-stage task vectors; mode multitask trains one joint model")
        if self.mode == "sequential" and any(m.how == "lota_additive" for m in self.merge):
            raise ValueError("lota_additive needs mode: single (each stage's sparse task vector from the base model); "
                             "in the sequential stream theta_0 + sum_t (theta_t - theta_{t-1}) is just the final model")
        return self

    @property
    def run_name(self) -> str:
        return self.label or self.name


class RunConfig(Strict):
    name: str = "run"
    model: str = Field("smollm2-135m-instruct", description="alias, local folder or hub id")
    stream: Optional[str] = Field(None, description="a stream name (clbench list streams)")
    order: str = Field("1", description="which of the stream's orders")
    tasks: Optional[list[str]] = Field(None, description="explicit task list instead of stream/order")
    heldout: list[str] = Field(default_factory=list, description="held-out general-ability tasks evaluated after every stage, never trained")
    task_dirs: list[str] = Field(default_factory=list, description="extra folders of task YAMLs (relative to the config file)")
    method_files: list[str] = Field(default_factory=list, description="extra method files (relative to the config file)")
    methods: list[MethodSpec] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, description="each in 0..2**32-1")
    data_seed: Seed = Field(1234, description="seed of the train/test splits made by `data prepare`")
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: dict[str, TrainOverrides] = Field(default_factory=dict, description="per-stage overrides keyed by task name or stage number")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast where supported, fp32 master weights")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    cache_dir: Optional[str] = Field(None, description="clbench cache (default $CLBENCH_CACHE or ~/.cache/clbench)")
    data_root: Optional[str] = Field(  # a local path that never changes results (manifests vouch for the data): not saved or hashed
        None, exclude=True, description="folder holding the original releases read by the presets (CL_Benchmark/, "
        "LLM-CL-Benchmark_5000/, natural-instructions/), relative to the config file; default $CLBENCH_DATA_ROOT")
    offline: bool = Field(True, description="forbid hub access (HF_HUB_OFFLINE=1)")
    chat_template: bool = Field(
        False, description="render training examples and evaluation requests through the tokenizer's chat template "
        "(lm-eval's apply_chat_template; the loss on the assistant turn only)")
    system_instruction: Optional[str] = Field(
        None, description="lm-eval's system_instruction: the system turn under chat_template, else text before the prompt")
    keep_checkpoints: Literal["last", "all", "none"] = Field(
        "last", description="stage checkpoints for resume: last = the latest one per (method, seed) while it runs, "
        "deleted when it completes; all = every stage's, kept; none = no checkpoints (a crash restarts that method)")
    checkpoint_interval: float = Field(
        60.0, ge=0, description="keep_checkpoints last: write a stage checkpoint once at least this many seconds of "
        "training and evaluation have passed since the last one (0 = after every stage); a crash redoes at most that "
        "much work, and stages cheaper than their checkpoint do not pay for one")
    checkpoint_steps: Optional[int] = Field(
        None, gt=0, description="also checkpoint inside a stage every this many optimizer steps (model, optimizer, "
        "scheduler, RNG; clbench/training/midstage.py), so a run killed mid-stage resumes at that step; for methods with no "
        "state of their own inside a stage (Method.step_resume_refusal), others restart the stage")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="experiment trackers fed the per-step loss and lr and each stage's scores "
        "(clbench/run/trackers.py); never change results")

    @field_validator("trackers")
    @classmethod
    def _trackers_installed(cls, v):
        try:
            return check_trackers(dict.fromkeys(v))
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("trackers: ")) from None

    @model_validator(mode="after")
    def _check(self):
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("`tasks` is empty: a stream needs at least one task")
            dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            if dup:
                raise ValueError(f"duplicate task(s) in the stream: {', '.join(dup)}")
        elif self.stream is None:
            raise ValueError("set either `stream` (with `order`) or a non-empty `tasks` list")
        names = [m.run_name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two methods share the result name {dup}: give one a `label`")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("`seeds` has duplicates")
        overrides = [(f"methods.{i}.train", m.train) for i, m in enumerate(self.methods) if m.train]
        for where, o in overrides + [(f"stages.{k}", v) for k, v in self.stages.items()]:
            try:  # the merged train settings of a method or stage, checked now rather than when it trains
                self.train.merged(o)
            except ValidationError as e:
                raise ValueError(f"{where} with train: " + "; ".join(err["msg"] for err in e.errors())) from None
        return self

    def stage_overrides(self, stage: int, task: str) -> Optional[TrainOverrides]:
        return self.stages.get(task) or self.stages.get(str(stage))

    def hash(self) -> str:
        """Hash of the resolved config, minus fields that do not change results."""
        d = self.model_dump(mode="json")
        for k in NON_RESULT_FIELDS:
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --- loading -------------------------------------------------------------------------


def method_index(methods: list, key: str) -> int | None:
    """The index of the method whose result name (label or name) is `key`, or `key` as an index."""
    for i, m in enumerate(methods):
        if isinstance(m, dict) and (m.get("label") or m.get("name")) == key:
            return i
    if key.isdigit() and int(key) < len(methods):
        return int(key)
    return None


def set_path(d: dict, dotted: str, value: Any, where: str = "--set", missing_method: str = "error") -> bool:
    """Set a key path (`train.lr`, `methods.1.options.r`, `methods.lora.options.r`: a method by index
    or result name) in a raw config, creating mappings on the way. A path through a scalar, or an
    index past a list, fails naming the path; a method the config does not hold fails, or with
    missing_method="skip" returns False (a sweep axis of a method that is not in this run)."""
    keys = dotted.split(".")
    cur: Any = d
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(cur, list):
            j = method_index(cur, k) if i and keys[i - 1] == "methods" else _index(cur, k, dotted, where)
            if j is None:
                if missing_method == "skip":
                    return False
                what = f"{k!r} is not an index of a list of length {len(cur)}" if k.isdigit() else f"no method {k!r}"
                raise ConfigError(f"{where} {dotted}: {what} (methods are named by label, name or index)")
            if last:
                cur[j] = value
                return True
            cur = cur[j]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"{where} {dotted}: {'.'.join(keys[:i])} is {cur!r}, not a mapping with key {k!r}")
        if last:
            cur[k] = value
            return True
        if k not in cur or cur[k] is None:
            cur[k] = {}
        cur = cur[k]
    return True


def _index(lst: list, k: str, dotted: str, where: str = "--set") -> int | None:
    if not k.isdigit() or int(k) >= len(lst):
        raise ConfigError(f"{where} {dotted}: {k!r} is not an index of a list of length {len(lst)}")
    return int(k)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v) if v != "" else None))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {k}: value {v!r} is not valid YAML: {e}") from None
    return out


def load_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (YAML) file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None


def format_validation_error(e: ValidationError, source: str, model: type[BaseModel] = None) -> str:
    lines = [f"{source}: invalid config"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1]) if model else []
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  unknown key '{loc}'{hint}")
        elif err["type"] == "missing":
            lines.append(f"  missing required key '{loc}'")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {loc}: {err['msg']}{got_s}")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc) -> list[str]:
    cur = model
    for part in loc:
        if isinstance(part, int) or cur is None:
            continue
        field = cur.model_fields.get(part)
        if field is None:
            return []
        cur = _inner_model(field.annotation)
    return sorted(cur.model_fields) if cur is not None else []


def _inner_model(ann):
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _inner_model(a)
        if m is not None:
            return m
    return None


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, Path]:
    """Read, override and validate a config. Returns (config, config_dir)."""
    path = Path(path)
    raw = load_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping, got {type(raw).__name__}")
    for k, v in parse_overrides(overrides or []):
        set_path(raw, k, v)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), RunConfig)) from None
    return cfg, path.resolve().parent


# --- environment variables clbench reads: checked when a command starts, not when one is first used ---


def _positive_int(v: str) -> None:
    if not (v.strip().isdigit() and int(v) > 0):
        raise ValueError("a whole number > 0")


def _positive_number(v: str) -> None:
    try:
        ok = float(v) > 0 and float(v) != float("inf")
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("a number > 0")


def _switch(v: str) -> None:
    if v not in ("0", "1"):
        raise ValueError("0 or 1")


def _folder(v: str) -> None:
    if not v.strip():
        raise ValueError("a folder path (it is empty)")
    if Path(v).exists() and not Path(v).is_dir():
        raise ValueError("a folder (it names a file)")


ENVIRONMENT = {  # name: (check, what it does)
    "CLBENCH_LOG_EVERY": (_positive_int, "a plain progress line every N training steps"),
    "CLBENCH_DIST_TIMEOUT_MIN": (_positive_number, "minutes a process waits for the others"),
    "CLBENCH_EVAL_PREFIX_SHARING": (_switch, "0 scores multiple choice through lm-eval's own path"),
    "CLBENCH_EVAL_FAST_GENERATE": (_switch, "0 generates through lm-eval's own path"),
    "CLBENCH_CACHE": (_folder, "clbench's cache folder"),
    "CLBENCH_DATA_ROOT": (_folder, "the folder of the presets' releases"),
}


def check_environment(environ=None) -> None:
    """Every CLBENCH_* variable clbench reads, checked once: a bad value is one line naming it."""
    environ = os.environ if environ is None else environ
    for name, (check, what) in ENVIRONMENT.items():
        v = environ.get(name)
        if v is None:
            continue
        try:
            check(v)
        except ValueError as e:
            raise ConfigError(f"environment variable {name}={v!r} must be {e} ({what})") from None
