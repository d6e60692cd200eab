"""Multiple-choice exam builders over ochat 3.6.1's evaluation data: BIG-Bench Hard and MMLU."""

from __future__ import annotations

import re
from random import Random

from clbench.errors import DataError
from .core import clean_text, dedupe, jsonl_lines, log, register_builder


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
        out.append(clean_text(text))
    return out


def _mc_dedupe_and_shuffle(docs: list[dict], shuffle: bool, rng: Random) -> list[dict]:
    """Docs {input, choices, _gold}: drop repeats of (input, choice set) (both copies if their
    answers differ), shuffle each document's choices with the rng if asked, set `label`."""
    docs = dedupe(docs, key=lambda d: (d["input"], tuple(sorted(d["choices"]))), label="_gold")
    for d in docs:
        gold = d.pop("_gold")
        if shuffle:
            rng.shuffle(d["choices"])
        d["label"] = d["choices"].index(gold)
    return docs


def _question_text(text: str) -> str:
    """Whitespace normalised within lines; line breaks kept, blank lines dropped (as _bb_input)."""
    return "\n".join(clean_text(line) for line in text.strip().splitlines() if line.strip())


BBH_DIR = "ochat/evaluation/eval_data/zs/bbh_mc_orca/"
# tasks whose files list the gold answer first (date_understanding: 246 of 250; temporal_sequences:
# 250 of 250): their choices are shuffled by default; in the others the position is not biased
BBH_ANSWER_FIRST = frozenset({"date_understanding", "temporal_sequences"})


def _ochat_rows(files: dict, member: str):
    """(where, question, options, label) of each line of an ochat evaluation file (BBH and MMLU
    share the {question, options, label} row shape); `where` is "member:line" for errors."""
    for n, row in jsonl_lines(files, member):
        where = f"{member}:{n}"
        try:
            yield where, row["question"], row["options"], row["label"]
        except (TypeError, KeyError):
            raise DataError(f"{where}: expected {{question, options, label}}") from None


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
    for where, q, letters, gold in _ochat_rows(files, member):
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
        docs.append({"input": text, "description": clean_text(m.group(1)), "choices": choices,
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
        for where, q, options, label in _ochat_rows(files, member):
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
