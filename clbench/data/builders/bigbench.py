"""Builders for BIG-bench task folders (bigbench's task.json files) and squad_shifts paragraphs:
kept for task folders that still carry a bigbench archive; no built-in task uses them."""

from __future__ import annotations

import json

from clbench.errors import DataError
from .core import clean_text, dedupe, decode_text, log, register_builder


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
    text = "\n".join(clean_text(line) for line in str(ex["input"]).strip().splitlines() if line.strip())
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
            choices = [clean_text(c) for c in scores]
            if len(set(choices)) != len(choices):
                skipped += 1
                continue
            if shuffle:
                rng.shuffle(choices)
            docs.append({"input": text, "choices": choices, "label": choices.index(clean_text(gold[0]))})
    if skipped:
        log.info("%s: skipped %d examples (longer than max_chars or no single answer)", _bb_member(spec), skipped)
    key = (lambda d: d["input"]) if labels else (lambda d: (d["input"], tuple(sorted(d["choices"]))))
    return dedupe(docs, key=key, label=None)


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
        refs = [clean_text(r) for r in refs if isinstance(r, str) and r.strip()]
        text = _bb_input(ex, spec)
        if not refs or text is None:
            skipped += 1
            continue
        target = refs[0][:-1] if refs[0].endswith(".") and not refs[0].endswith("..") else refs[0]
        docs.append({"input": text, "target": target.strip(), "answers": refs})
    if skipped:
        log.info("%s: skipped %d examples (longer than max_chars or no target)", _bb_member(spec), skipped)
    return dedupe(docs, key=lambda d: d["input"], label=None)


@register_builder("squad_contexts", members=lambda spec: [BB_TASKS + "squad_shifts/" + _squad_file(spec)],
                  options=("file", "max_chars"))
def build_squad_contexts(files, spec, rng):
    """Plain text for a perplexity probe: the distinct paragraphs (`context`) of a SQuAD-format
    file of BIG-bench's squad_shifts (e.g. new_wiki_v1.0.json: 1,581 Wikipedia paragraphs written
    after SQuAD). Documents are {text}; the questions are not used."""
    data = json.loads(decode_text(next(iter(files.values())), _squad_file(spec)))
    max_chars = spec.get("max_chars")
    docs = []
    for article in data.get("data", []):
        for para in article.get("paragraphs", []):
            text = clean_text(para.get("context") or "", max_chars)
            if text:
                docs.append({"text": text})
    return dedupe(docs, key=lambda d: d["text"], label=None)


def _squad_file(spec: dict) -> str:
    f = spec.get("file")
    if not f or not isinstance(f, str) or "/" in f:
        raise DataError("the squad_contexts builder needs `file`, a file name in bigbench's squad_shifts folder "
                        "(e.g. new_wiki_v1.0.json)")
    return f
