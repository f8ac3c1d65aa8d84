"""sources: what data.source and model.name_or_path are right now -> data/sources/dataset.json
and data/sources/model.json.

A local folder (anywhere on disk, inside the repository or not) is recorded by the sha256 of
every file under it, a Hub id by its value. fetch depends on dataset.json and every stage that
reads the base model on model.json, so changing a parquet file in a local mirror or a weight
file of a local model reruns them, while an unchanged source writes the same bytes again and
nothing downstream reruns. DVC runs this stage on every `dvc repro` (always_changed); a
file is hashed again only when its size, mtime or inode changed (cached in .dvc/tmp), so a
no-op repro stays fast however large the model. The revision a Hub id resolved to is recorded
by fetch (dataset) and sft (model) when the Hub answers.

    python -m stages.sources     (or: dvc repro sources)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stages.cli import main
from stages.outputs import write_json_atomic
from stages.params import Params
from stages.paths import SOURCES

HASH_CACHE = Path(".dvc/tmp/stack-dpo-source-hashes.json")


def file_sha256(path: Path, cache: dict) -> str:
    stat = path.stat()
    key, signature = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    if cache.get(key, {}).get("stat") == signature:
        return cache[key]["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    cache[key] = {"stat": signature, "sha256": digest.hexdigest()}
    return cache[key]["sha256"]


def describe(source: str, cache: dict) -> dict:
    """{"source", "local": True, "files": {relative path: sha256}} of a local file or folder,
    or {"source", "local": False} of anything else (a Hub id)."""
    root = Path(source)
    if not root.exists():
        return {"source": source, "local": False}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts)
    return {"source": source, "local": True,
            "files": {str(p.relative_to(root)) if p != root else p.name: file_sha256(p, cache) for p in files}}


def run(params: Params) -> dict:
    try:
        cache = json.loads(HASH_CACHE.read_text())
    except (FileNotFoundError, ValueError):
        cache = {}
    found = {"dataset": describe(params.data.source, cache), "model": describe(params.model.name_or_path, cache)}
    for name, description in found.items():
        write_json_atomic(SOURCES / f"{name}.json", description)
    if HASH_CACHE.parent.is_dir():
        tmp = HASH_CACHE.with_name(f".{HASH_CACHE.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        tmp.replace(HASH_CACHE)
    return found


if __name__ == "__main__":
    main(run)
