"""Canonical continual-learning stream presets read from the ORIGINAL RELEASES on the user's disk.

The presets (tasks/presets/streams.yaml) are the streams of the LLM continual-learning papers:

  std-cl-o1/o2/o3     Standard CL benchmark (dbpedia, amazon, yahoo, agnews), orders 1-3
  long-seq-o4/o5/o6   Long Sequence benchmark (15 tasks), orders 4-6
  trace               TRACE (8 tasks)
  superni-o1          SuperNI order 1 of SSR (10 tasks); superni-o2 / -o3 are its first and
                      last five tasks (shorter streams for quick runs; not from a paper)

None of this data is on a package registry, so clbench reads it where the user keeps it: the
*data root* (`data_root:` in the run config, relative to the config file; else the
environment variable CLBENCH_DATA_ROOT; `clbench data prepare --data-root DIR` overrides
both). Under it, each release keeps the folder layout its authors published:

  o-lora   <root>/CL_Benchmark/<Group>/<task>/{train,dev,test}.json + labels.json
           (github.com/cmnfriend/O-LoRA). Each split is a JSON list of
           {"sentence": str, "label": str}; labels.json is the list of label words. Groups:
           TC (dbpedia, yahoo, agnews), SC (amazon, yelp, IMDB, SST-2), NLI (MNLI, CB, RTE),
           QQP/QQP, BoolQA/BoolQA, COPA/COPA, MultiRC/MultiRC, WiC/WiC.
  trace    <root>/LLM-CL-Benchmark_5000/<Task>/{train,eval,test}.json
           (github.com/BeyonderXX/TRACE). Each split is a JSON list of
           {"prompt": str, "answer": str}.
  superni  <root>/natural-instructions/tasks/taskNNN_<name>.json
           (github.com/allenai/natural-instructions). {"Definition": [str],
           "Instances": [{"id", "input", "output": [str, ...]}], ...}.

`clbench data prepare <preset>` turns a release into the project's normal prepared form,
<cache>/data/<task>/{train,test}.jsonl + manifest.json (sha256, size and mtime of every source
file read), so the rest of the harness (lm-eval task YAMLs with `clbench:` blocks) is the same
as for registry tasks. A second call reuses the files when the spec, the seed and the source
files are unchanged. Sampling, seeded by the config's `data_seed`:

  o-lora   train: at most `train_per_class` (1,000) examples per label, drawn per label
           with the seed from the release's train.json (O-LoRA's released train files
           already are ~1,000-per-class random samples, not exact ones: e.g. agnews has
           968..1,040 per class, so a class may have fewer than 1,000). test: all of
           test.json (7,600 for the four standard tasks), seeded shuffle so that
           `eval.limit` takes a random subset; examples whose label is not in labels.json
           are dropped with a warning (MNLI's test.json has 131 with label "-").
  trace    train: at most `train` (5,000) from train.json; test: all of test.json.
  superni  the task file's instances (deduplicated by input) are shuffled with the seed;
           the first `test` (500) are the test split and the next `train` (2,000) the
           train split. This is a seeded draw like SSR's, not SSR's own instance
           selection (which is not in the SuperNI release).

The leakage check (clbench/data/leakage.py) runs on every preparation: overlapping inputs
between the prepared train and test splits, and byte-identical source split files (every
O-LoRA task: dev.json == test.json). Findings are warnings and go into the manifest.

A preset whose release is missing fails at `clbench data prepare` and when `clbench run`
plans (before any model is loaded) with the exact path expected and the layout.
Getting the data from a hub instead is possible by hand (download the release into the
data root); clbench does not automate it.
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
from typing import Any, Callable, Iterable

from clbench import paths
from clbench.data import leakage, manifests
from clbench.data.splits import carve_validation
from clbench.errors import DataError
from clbench.files import atomic_write as _write_atomic
from clbench.files import sha256_file as _sha256_file

RELEASE_PREFIX = "release:"  # clbench.data.source of a preset: read from a release on the user's disk

log = logging.getLogger(__name__)

ENV_VAR = "CLBENCH_DATA_ROOT"
READER_VERSION = 2  # bump when the documents a reader makes change (re-prepares the data); 2: validation split
DEFAULT_VALIDATION = 200  # validation examples per task (at most the test size) unless clbench.data.validation says


class ReleaseDataError(DataError):
    """A release is missing, malformed, or no data root is set (the message says what to do)."""


# --------------------------------------------------------------------------------------
# Release layouts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    url: str
    layout: str  # one line for error messages
    options: frozenset  # keys a task's clbench.data block may have besides source and path


LAYOUTS: dict[str, Layout] = {
    "o-lora": Layout(
        "o-lora", "O-LoRA CL_Benchmark (Standard CL + Long Sequence)", "https://github.com/cmnfriend/O-LoRA",
        "O-LoRA layout: <root>/CL_Benchmark/<Group>/<task>/{train,dev,test}.json, each a JSON list of "
        '{"sentence", "label"}, plus labels.json, the list of label words; copy the CL_Benchmark folder '
        "of github.com/cmnfriend/O-LoRA",
        frozenset({"train_per_class", "test", "validation"})),
    "trace": Layout(
        "trace", "TRACE LLM-CL-Benchmark_5000", "https://github.com/BeyonderXX/TRACE",
        "TRACE layout: <root>/LLM-CL-Benchmark_5000/<Task>/{train,eval,test}.json, each a JSON list of "
        '{"prompt", "answer"}; unzip the benchmark linked from github.com/BeyonderXX/TRACE',
        frozenset({"train", "test", "validation"})),
    "superni": Layout(
        "superni", "Super-NaturalInstructions", "https://github.com/allenai/natural-instructions",
        "SuperNI layout: <root>/natural-instructions/tasks/taskNNN_<name>.json with "
        '"Definition" and "Instances": [{"input", "output": [...]}]; clone github.com/allenai/natural-instructions',
        frozenset({"superni_task", "train", "test", "validation"})),
}


def layout_of(spec: dict) -> Layout:
    src = str(spec.get("source", ""))
    name = src[len(RELEASE_PREFIX):] if src.startswith(RELEASE_PREFIX) else None
    if name not in LAYOUTS:
        raise ReleaseDataError(f"unknown release source {src!r}; known: "
                               + ", ".join(RELEASE_PREFIX + k for k in LAYOUTS))
    return LAYOUTS[name]


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data root: the explicit value (config `data_root` / --data-root), else $CLBENCH_DATA_ROOT."""
    root = explicit or os.environ.get(ENV_VAR)
    return Path(root).expanduser().resolve() if root else None


def config_data_root(cfg, config_dir: Path) -> Path | None:
    """A run config's data root (`data_root` is relative to the config file)."""
    value = getattr(cfg, "data_root", None)
    return data_root((Path(config_dir) / value) if value else None)


def _where(root: Path | None, rel: str) -> str:
    return str(root / rel) if root else f"<data root>/{rel}"


def source_files(spec: dict, root: Path | None) -> tuple[dict[str, Path], list[str]]:
    """({role: path} of the release files a task reads, [missing paths]). Roles: the split
    names of the release plus "labels" (O-LoRA); optional files (dev/eval) are included only
    when present, since they are read for the leakage check alone."""
    lay = layout_of(spec)
    rel = str(spec["path"]).strip("/")
    base = root / rel if root else None
    missing: list[str] = []

    def need(name: str) -> Path | None:
        if base is None or not (base / name).is_file():
            missing.append(_where(root, f"{rel}/{name}"))
            return None
        return base / name

    files: dict[str, Path] = {}
    if lay.name in ("o-lora", "trace"):
        names = ["train.json", "test.json"] + (["labels.json"] if lay.name == "o-lora" else [])
        for n in names:
            p = need(n)
            if p:
                files[n[:-5]] = p
        extra = "dev.json" if lay.name == "o-lora" else "eval.json"
        if base is not None and (base / extra).is_file():
            files[extra[:-5]] = base / extra
    else:
        task = str(spec["superni_task"])
        hits = sorted(base.glob(f"{task}_*.json")) if base is not None and base.is_dir() else []
        if len(hits) > 1:
            raise ReleaseDataError(f"{base}: several files match {task}_*.json: {', '.join(h.name for h in hits)}")
        if hits:
            files["task"] = hits[0]
        else:
            missing.append(_where(root, f"{rel}/{task}_*.json"))
    return files, missing


def missing_message(task: str, spec: dict, root: Path | None, missing: list[str]) -> str:
    lay = layout_of(spec)
    head = (f"task {task}: no data root is set (set `data_root:` in the run config, pass --data-root, "
            f"or export {ENV_VAR}=DIR); " if root is None else f"task {task}: release data missing; ")
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"{head}expected {missing[0]}{more} ({lay.layout})"


# --------------------------------------------------------------------------------------
# Readers: release files -> (train, test) documents
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise ReleaseDataError(f"{path}: unreadable ({e})") from e
    except ValueError as e:
        raise ReleaseDataError(f"{path}: not valid JSON ({e})") from e


def _records(path: Path, fields: tuple[str, ...]) -> list[dict]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise ReleaseDataError(f"{path}: expected a JSON list of objects with {', '.join(fields)}, "
                               f"got {type(data).__name__}")
    for i, r in enumerate(data):
        if not isinstance(r, dict) or any(not isinstance(r.get(f), str) for f in fields):
            raise ReleaseDataError(f"{path}: entry {i} is not an object with string fields "
                                   f"{', '.join(fields)}: {str(r)[:120]}")
    return data


def read_olora(files: dict[str, Path], spec: dict, rng: Random, task: str) -> dict[str, list[dict]]:
    labels = _read_json(files["labels"])
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ReleaseDataError(f"{files['labels']}: expected a JSON list of label words")
    options = ", ".join(labels)
    out = {}
    for split in ("train", "test"):
        docs, dropped = [], {}
        for r in _records(files[split], ("sentence", "label")):
            if r["label"] not in labels:
                dropped[r["label"]] = dropped.get(r["label"], 0) + 1
                continue
            docs.append({"sentence": r["sentence"], "label": r["label"], "options": options})
        if dropped:
            log.warning("task %s: dropped %s %s examples whose label is not in labels.json (%s)", task,
                        sum(dropped.values()), split, ", ".join(f"{k!r}: {v}" for k, v in sorted(dropped.items())))
        out[split] = docs
    per_class = int(spec.get("train_per_class", 1000))
    by_label: dict[str, list[dict]] = {}
    for d in out["train"]:
        by_label.setdefault(d["label"], []).append(d)
    train, rest = [], []
    for lab in labels:  # labels.json order: deterministic
        group = by_label.get(lab, [])
        rng.shuffle(group)
        train += group[:per_class]
        rest += group[per_class:]
    rng.shuffle(train)
    test = list(out["test"])
    rng.shuffle(test)
    if spec.get("test"):
        test = test[: int(spec["test"])]
    return {"train": train, "test": test, "rest": rest}


def read_trace(files: dict[str, Path], spec: dict, rng: Random, task: str) -> dict[str, list[dict]]:
    out = {}
    for split in ("train", "test"):
        docs = [{"prompt": r["prompt"], "answer": r["answer"]} for r in _records(files[split], ("prompt", "answer"))]
        empty = [d for d in docs if not d["answer"].strip()]
        if empty:
            log.warning("task %s: dropped %d %s examples with an empty answer", task, len(empty), split)
            docs = [d for d in docs if d["answer"].strip()]
        rng.shuffle(docs)
        cap = spec.get(split)
        out[split] = docs[: int(cap)] if cap else docs
        if split == "train":
            out["rest"] = docs[int(cap):] if cap else []
    return out


def read_superni(files: dict[str, Path], spec: dict, rng: Random, task: str) -> dict[str, list[dict]]:
    path = files["task"]
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        raise ReleaseDataError(f"{path}: expected a SuperNI task object with an `Instances` list")
    definition = data.get("Definition") or [""]
    definition = definition[0] if isinstance(definition, list) else str(definition)
    docs, seen = [], set()
    for i, inst in enumerate(data["Instances"]):
        outs = inst.get("output") if isinstance(inst, dict) else None
        outs = [outs] if isinstance(outs, str) else outs
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not outs \
                or not all(isinstance(o, str) for o in outs):
            raise ReleaseDataError(f"{path}: instance {i} is not {{'input': str, 'output': [str, ...]}}")
        key = leakage.normalize(inst["input"])
        if key in seen:
            continue
        seen.add(key)
        outs = [o.strip() for o in outs if o.strip()] or [""]
        docs.append({"id": str(inst.get("id", i)), "definition": definition.strip(), "input": inst["input"],
                     "target": outs[0], "outputs": outs})
    docs = [d for d in docs if d["target"]]
    rng.shuffle(docs)
    n_test = int(spec.get("test", 500))
    n_train = int(spec.get("train", 2000))
    return {"test": docs[:n_test], "train": docs[n_test:n_test + n_train], "rest": docs[n_test + n_train:]}


READERS: dict[str, Callable[[dict, dict, Random, str], dict[str, list[dict]]]] = {
    "o-lora": read_olora, "trace": read_trace, "superni": read_superni,
}
DEV_ROLE = {"o-lora": "dev", "trace": "eval"}  # the release's own validation split, where it has one


def validation_split(lay: Layout, files: dict[str, Path], spec: dict, splits: dict[str, list[dict]], rng: Random,
                     task: str) -> tuple[list[dict], list[dict], dict]:
    """(train, validation, manifest entry): the release's own dev split where it is a file distinct from
    test.json (read like test.json, seeded shuffle, capped at clbench.data.validation), else carved from
    the training source (clbench.data.splits.carve_validation: its unused documents first, class-balanced
    for O-LoRA's label words) with the reason recorded."""
    n = int(spec.get("validation", min(DEFAULT_VALIDATION, len(splits["test"]))))
    role = DEV_ROLE.get(lay.name)
    dev = files.get(role) if role else None
    if dev is not None and _sha256_file(dev) != _sha256_file(files["test"]):
        docs = READERS[lay.name]({**files, "test": dev}, {**spec, "test": n}, rng, task)["test"]
        return splits["train"], docs, {"source": f"the release's {dev.name}", "count": len(docs)}
    why = (f"{dev.name} is byte-identical to test.json (selecting on it would be selecting on the test set)"
           if dev is not None else f"the release has no {role}.json" if role else "the release has no validation split")
    pool = splits["train"] + splits["rest"]
    train, val, how = carve_validation(pool, splits["train"], [], n, rng, "balanced" if lay.name == "o-lora" else "random")
    return train, val, {"source": how, "why": why, "count": len(val)}


# --------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------


def _spec_key(spec: dict, seed: int) -> dict:
    return {"format": 1, "data": json.loads(json.dumps(spec, sort_keys=True)), "seed": seed,
            "reader_version": READER_VERSION}


def _reuse(out_dir: Path, key: dict, files: dict[str, Path]) -> str | None:
    """None if the prepared files can be reused, else why not: the one manifest check, then the
    release files themselves (size and mtime, else their sha256) against what they were."""
    why = manifests.stale_reason(out_dir, key)
    if why is not None:
        return why
    m, _ = manifests.read_manifest(out_dir)
    old = {r["role"]: r for r in m.get("source", {}).get("files", [])}
    if set(old) != set(files):
        return "the release files changed"
    for role, p in files.items():
        st = p.stat()
        r = old[role]
        if (r.get("size"), r.get("mtime_ns")) != (st.st_size, st.st_mtime_ns) and _sha256_file(p) != r.get("sha256"):
            return f"release file {p} changed since it was prepared"
    return None


def prepare_release_tasks(names: Iterable[str], task_yamls: dict[str, dict], cache: Path, seed: int,
                          force: bool = False, root: str | os.PathLike | None = None) -> dict[str, dict[str, Path]]:
    """Prepare release tasks into <cache>/data/<task>/; returns {task: {"train": path, "test": path}}."""
    root_path = data_root(root)
    result = {}
    for name in names:
        spec = task_yamls[name]["clbench"]["data"]
        lay = layout_of(spec)
        unknown = set(spec) - {"source", "path"} - lay.options
        if unknown:
            raise ReleaseDataError(f"task {name}: unknown key(s) {', '.join(sorted(unknown))} in clbench.data "
                                   f"(allowed: {', '.join(sorted({'source', 'path'} | lay.options))})")
        files, missing = source_files(spec, root_path)
        out_dir = paths.data_dir(cache) / name
        out = {s: out_dir / f"{s}.jsonl" for s in ("train", "validation", "test")}
        key = _spec_key(spec, seed)
        if missing:
            raise ReleaseDataError(missing_message(name, spec, root_path, missing))
        reason = "forced" if force else _reuse(out_dir, key, files)
        if reason is None:
            result[name] = out
            continue
        if reason not in ("not prepared yet", "forced"):
            log.warning("task %s: %s; preparing it again", name, reason)
        log.info("preparing task %s from %s (%s layout, seed %d)", name, root_path / spec["path"], lay.name, seed)
        rng = Random(seed)
        splits = READERS[lay.name](files, spec, rng, name)
        splits["train"], splits["validation"], val_entry = validation_split(lay, files, spec, splits, rng, name)
        splits.pop("rest")
        for s in ("train", "test"):  # (validation may be empty: too few training documents to spare)
            if not splits[s]:
                raise ReleaseDataError(f"task {name}: the {s} split is empty after reading {root_path / spec['path']}")
        findings = leakage.check_splits(name, splits)
        split_files = {r: p for r, p in files.items() if r != "labels"}
        findings += leakage.check_files(name, split_files)
        written = {}
        for s, p in out.items():
            body = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in splits[s]).encode("utf-8")
            _write_atomic(p, body)
            written[s] = {"path": p.name, "sha256": hashlib.sha256(body).hexdigest(), "lines": len(splits[s])}
        label_counts = None
        if lay.name == "o-lora":
            label_counts = {s: _count(d["label"] for d in splits[s]) for s in out}
        manifest = {
            "task": name,
            "spec": key,
            "source": {
                "release": lay.name, "title": lay.title, "url": lay.url, "data_root": str(root_path),
                "files": [{"role": r, "path": str(p.relative_to(root_path)), "sha256": _sha256_file(p),
                           "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                          for r, p in sorted(files.items())],
            },
            "seed": seed,
            "counts": {s: len(splits[s]) for s in out},
            "validation": val_entry,
            "label_counts": label_counts,
            "leakage": findings,
            "files": written,
            "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
        result[name] = out
    return result


def _count(items: Iterable[str]) -> dict[str, int]:
    c: dict[str, int] = {}
    for x in items:
        c[x] = c.get(x, 0) + 1
    return dict(sorted(c.items()))


# --------------------------------------------------------------------------------------
# What the catalogue and the CLI say about a preset's data
# --------------------------------------------------------------------------------------


def not_prepared_message(task: str, spec: dict, root: Path | None, stream: str | None = None) -> str:
    """Why a preset task has no prepared data, and what to do: where its release is expected, or
    the `clbench data prepare` command that reads it."""
    root = data_root(root)
    _, missing = source_files(spec, root)
    if missing:
        return missing_message(task, spec, root, missing)
    what = f"clbench data prepare {stream}" if stream else f"clbench data prepare --tasks {task}"
    return f"task {task} is not prepared (its release is at {root / spec['path']}): run `{what} --config <this config>`"


def stream_status(stream: dict, tasks: dict, root: Path | None, cache: Path) -> str:
    """One line for `clbench list streams`: the release, and whether its data is present."""
    names = list(dict.fromkeys(t for o in stream["orders"].values() for t in o))
    lay = LAYOUTS[stream["preset"]]
    missing = []
    for n in names:
        missing += source_files(tasks[n].clbench["data"], root)[1]
    prepared = all(f.is_file() for n in names for f in tasks[n].data_files(cache).values())
    if root is None:
        state = f"data root not set (data_root: in the config or {ENV_VAR})"
    elif missing:
        state = f"release data MISSING: expected {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    else:
        state = f"release data present under {root}"
    return f"  source: {lay.title} ({lay.url}); {state}; {'prepared' if prepared else 'not prepared'}"
