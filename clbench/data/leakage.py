"""Leakage checks run whenever task data is prepared (`clbench data prepare`).

Two findings, each logged as a warning naming the task, the splits and the counts, and
recorded under "leakage" in the task's manifest.json:

- ``overlap``: documents of two splits share the same normalised input text (the prompt
  fields: whitespace collapsed, case folded). A test example that was also trained on
  inflates every score on that task.
- ``identical_files``: two source split files are byte-identical (same sha256). O-LoRA's
  released CL_Benchmark has dev.json == test.json for all 15 tasks: model selection on
  "dev" is then selection on the test set.

Both are reported, never repaired: the prepared files stay what the recipe says, so a
reader of the manifest can decide. The checks are linear in the number of documents.
"""

from __future__ import annotations

import hashlib
import logging
import re
from itertools import combinations
from pathlib import Path

log = logging.getLogger(__name__)

# Fields that hold a document's input, in the order they are looked for. Targets and labels
# (label, target, answer, outputs, ...) are never part of the key: two different questions
# with the same answer are not a leak.
INPUT_FIELDS = ("input", "sentence", "text", "prompt", "question", "definition", "choices")
EXAMPLES = 3  # overlapping inputs quoted in the manifest (cut to 120 characters)


def normalize(text: str) -> str:
    """Case-folded text with runs of whitespace collapsed to one space."""
    return re.sub(r"\s+", " ", str(text)).strip().casefold()


def input_key(doc: dict) -> str:
    """The normalised input of a document: its input fields joined in INPUT_FIELDS order."""
    return " | ".join(f"{k}={normalize(doc[k])}" for k in INPUT_FIELDS if k in doc)


def check_splits(task: str, splits: dict[str, list[dict]]) -> list[dict]:
    """Overlap findings between every pair of splits ({split: documents}); logs a warning each."""
    keys = {s: [input_key(d) for d in docs] for s, docs in splits.items()}
    findings = []
    for a, b in combinations(sorted(keys), 2):
        shared = set(keys[a]) & set(keys[b])
        if not shared:
            continue
        f = {
            "kind": "overlap",
            "splits": [a, b],
            "count": len(shared),
            "docs": {a: sum(k in shared for k in keys[a]), b: sum(k in shared for k in keys[b])},
            "examples": [k[:120] for k in sorted(shared)[:EXAMPLES]],
        }
        log.warning("task %s: %d input(s) appear in both %s and %s (%d %s and %d %s documents); "
                    "these test examples were seen in training", task, f["count"], a, b,
                    f["docs"][a], a, f["docs"][b], b)
        findings.append(f)
    return findings


def check_files(task: str, files: dict[str, Path]) -> list[dict]:
    """Byte-identical pairs among source split files ({split: path}); logs a warning each."""
    digests = {}
    for split, p in files.items():
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digests[split] = h.hexdigest()
    findings = []
    for a, b in combinations(sorted(digests), 2):
        if digests[a] == digests[b]:
            log.warning("task %s: source files %s and %s are byte-identical (%s, %s): the %s split "
                        "is the %s split", task, a, b, files[a], files[b], a, b)
            findings.append({"kind": "identical_files", "splits": [a, b],
                             "files": [str(files[a]), str(files[b])], "sha256": digests[a]})
    return findings
