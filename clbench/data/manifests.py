"""The one check of a prepared task's data against its manifest (<cache>/data/<task>/manifest.json),
for registry builds (clbench.data.prepare) and local releases (clbench.data.presets) alike: the manifest is
there and readable, was made for the same spec, lists the expected splits, and every split file's
sha256 matches it. Written by hand: the manifest layout is clbench's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from clbench.files import sha256_file


def read_manifest(out_dir: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why it cannot be used)."""
    mpath = out_dir / "manifest.json"
    if not mpath.is_file():
        return None, "not prepared yet"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest {mpath} ({e})"
    if not isinstance(m, dict):
        return None, f"unreadable manifest {mpath} (not a JSON object)"
    return m, None


def stale_reason(out_dir: Path, key: dict, splits: list[str] | None = None) -> str | None:
    """None if the prepared files in out_dir can be reused for `key` (the spec they were made
    from), else why not. `splits`: the split names expected (None: whatever the manifest lists)."""
    m, why = read_manifest(out_dir)
    if m is None:
        return why
    if m.get("spec") != key:
        return "the task's data spec, seed or builder changed since it was prepared"
    files = m.get("files")
    if not isinstance(files, dict) or (splits is not None and set(files) != set(splits)):
        return "the manifest lists other splits"
    for split, rec in files.items():
        p = out_dir / (rec.get("path") or f"{split}.jsonl") if isinstance(rec, dict) else None
        if p is None or not p.is_file():
            return f"{p or out_dir / (split + '.jsonl')} is missing"
        if sha256_file(p) != rec.get("sha256"):
            return f"{p} does not match the sha256 in its manifest (modified or corrupt)"
    return None
