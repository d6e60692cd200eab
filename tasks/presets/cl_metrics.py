"""Metrics of the preset tasks that lm-eval does not ship, referenced from the task YAMLs as
`process_results: !function cl_metrics.<name>` (resolved next to the YAML, as lm-eval does).

Each function gets (doc, results) with results[0] the filtered generation (the `strip`
filter: leading/trailing whitespace removed) and returns {metric: score in 0..1}; the
YAML's metric_list aggregates with the mean. How each follows its source, and where not:

- rouge_l (SuperNI, TRACE MeetingBank): ROUGE-L F-measure from `rouge_score` (a dependency of
  lm-eval), max over the references. SuperNI/O-LoRA's compute_metrics uses exactly this
  (RougeScorer(['rougeL'], use_stemmer=True)). TRACE scores MeetingBank with the `rouge`
  package (pltrdy), whose tokenisation differs slightly; scores are close, not identical.
- edit_similarity (TRACE Py150): TRACE's postprocess of <STR_LIT>/<NUM_LIT>/<CHAR_LIT>
  placeholders, then fuzzywuzzy's fuzz.ratio computed as Levenshtein.ratio (InDel
  similarity 2*LCS/(|a|+|b|)), the value fuzzywuzzy gives with python-Levenshtein
  installed, on 0..1 and not rounded to an integer percent as fuzz.ratio does.
- first_char_accuracy (TRACE ScienceQA): TRACE's accuracy on the first character of the
  answer (the option letter). TRACE's BLEU/ROUGE on the reasoning are not computed.
- sari (TRACE 20Minuten): sentence-level SARI (Xu et al. 2016) as in the HF `sari` metric
  TRACE loads: lowercased, sacrebleu 13a-tokenised, n-grams 1..4, keep F1, deletion
  precision, addition F1, averaged; the mean over documents equals HF's corpus value / 100.
  As in TRACE, the source is the whole prompt (instruction included). Written from the
  published algorithm, not checked against HF's scores on real data.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_SCORERS = {}


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time of writing."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()

    def close(self):  # absl closes a stream that is not the current sys.stderr: never close it
        pass


def _rouge_l(pred: str, ref: str, stem: bool) -> float:
    if stem not in _SCORERS:
        from rouge_score import rouge_scorer

        # rouge_score imports absl, whose log handler keeps the sys.stderr of the moment of import
        # and closes it on shutdown when it is no longer the current sys.stderr: a redirected or
        # captured stderr (e.g. pytest's) is then closed under its owner ("lost sys.stderr").
        # Point it at whatever stderr is current instead.
        try:
            import absl.logging

            absl.logging.get_absl_handler().python_handler.stream = _CurrentStderr()
        except (ImportError, AttributeError):
            pass
        _SCORERS[stem] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    return _SCORERS[stem].score(target=ref, prediction=pred)["rougeL"].fmeasure


def rouge_l(doc, results):
    """SuperNI: max ROUGE-L F over doc["outputs"] (stemmed, as SuperNI's own evaluation)."""
    refs = doc.get("outputs") or [doc["target"]]
    return {"rougeL": max(_rouge_l(results[0], r, True) for r in refs)}


def rouge_l_trace(doc, results):
    """TRACE MeetingBank: ROUGE-L F against doc["answer"] (no stemming, like `rouge`)."""
    pred, ref = results[0], doc["answer"]
    if not pred or not ref:
        return {"rougeL": 0.0}  # TRACE skips these but still divides by the full count
    return {"rougeL": _rouge_l(pred, ref, False)}


def _py150_postprocess(code: str) -> str:
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, lit in re.findall(r"<(STR|NUM|CHAR)_LIT:(.*?)>", code, re.S):
        code = code.replace(f"<{kind}_LIT:{lit}>", lit)
    return code


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence (bit-parallel, Hyyro 2004)."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def indel_ratio(a: str, b: str) -> float:
    """Levenshtein.ratio: 1 - InDel distance / (|a| + |b|) = 2 LCS / (|a| + |b|)."""
    total = len(a) + len(b)
    return 1.0 if total == 0 else 2 * lcs_length(a, b) / total


def edit_similarity(doc, results):
    pred, ref = _py150_postprocess(results[0]), _py150_postprocess(doc["answer"])
    if not pred or not ref:
        return {"edit_sim": 0.0}
    return {"edit_sim": indel_ratio(pred, ref)}


def first_char_accuracy(doc, results):
    pred, ref = results[0], doc["answer"]
    return {"acc": float(bool(pred) and bool(ref) and pred[0] == ref[0])}


# --- SARI -----------------------------------------------------------------------------


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p > 0 or r > 0 else 0.0


def _sari_ngram(sgrams, cgrams, rgramslist, numref):
    rgramcounter = Counter(g for rgrams in rgramslist for g in rgrams)
    s_rep = Counter({g: c * numref for g, c in Counter(sgrams).items()})
    c_rep = Counter({g: c * numref for g, c in Counter(cgrams).items()})
    # keep
    keep = s_rep & c_rep
    keep_good = keep & rgramcounter
    keep_all = s_rep & rgramcounter
    k1 = sum(keep_good[g] / keep[g] for g in keep)
    k2 = sum(keep_good[g] for g in keep)
    keep_p = k1 / len(keep) if keep else 1.0
    keep_r = k2 / sum(keep_all.values()) if keep_all else 1.0
    keep_score = _f1(keep_p, keep_r)
    # deletion (precision only)
    dele = s_rep - c_rep
    dele_good = dele - rgramcounter
    d1 = sum(dele_good[g] / dele[g] for g in dele)
    del_p = d1 / len(dele) if dele else 1.0
    # addition
    add = set(c_rep) - set(s_rep)
    add_good = add & set(rgramcounter)
    add_all = set(rgramcounter) - set(s_rep)
    add_p = len(add_good) / len(add) if add else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    return keep_score, del_p, _f1(add_p, add_r)


def _normalize(text: str) -> str:
    try:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        return Tokenizer13a()(text.lower())
    except ImportError:  # sacrebleu comes with lm-eval; whitespace tokens otherwise
        return " ".join(text.lower().split())


def sari_sentence(source: str, prediction: str, references: list[str]) -> float:
    """SARI of one sentence on 0..1."""
    s = _normalize(source).split()
    c = _normalize(prediction).split()
    refs = [_normalize(r).split() for r in references]
    keep, dele, add = [], [], []
    for n in range(1, 5):
        k, d, a = _sari_ngram(_ngrams(s, n), _ngrams(c, n), [_ngrams(r, n) for r in refs], len(refs))
        keep.append(k)
        dele.append(d)
        add.append(a)
    return (sum(keep) / 4 + sum(dele) / 4 + sum(add) / 4) / 3


def sari(doc, results):
    return {"sari": sari_sentence(doc["prompt"], results[0], [doc["answer"]])}
