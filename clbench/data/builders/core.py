"""The builder registry and the helpers every builder shares (decoding, one-line cleaning, de-duplication,
JSON lines). Written by hand: no library turns these packages' files into task documents."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from random import Random
from typing import Any, Callable, Iterable

from clbench.errors import DataError

log = logging.getLogger("clbench.data.builders")

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


def decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # a few legacy files carry cp1252 bytes (e.g. \x92 apostrophes)
        log.debug("%s is not UTF-8; decoding as cp1252", what)
        return data.decode("cp1252", errors="replace")


def clean_text(text: str, max_chars: int | None = None) -> str:
    """One line of plain text, cut at a word boundary to at most max_chars (+ "...")."""
    text = re.sub(r"\s+", " ", text).strip()
    if max_chars and len(text) > max_chars:
        cut = text[: max_chars - 3]
        if " " in cut[max_chars // 2:]:
            cut = cut[: cut.rfind(" ")]
        text = cut.rstrip(" ,;:") + "..."
    return text


def dedupe(docs: list[dict], key: Callable[[dict], Any], label: str | None = "label") -> list[dict]:
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


def jsonl_lines(files: dict, member: str) -> Iterable[tuple[int, Any]]:
    """(line number, object) for each non-empty line of a JSON-lines member."""
    data = files[member]
    if data.startswith(b"version https://git-lfs"):
        raise DataError(f"{member}:1: a git-LFS pointer, not the data (the package shipped the pointer file)")
    for n, line in enumerate(decode_text(data, member).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except ValueError as e:
            raise DataError(f"{member}:{n}: not valid JSON ({e})") from None
