"""Describing data.source and model.name_or_path as they are now: a local file or folder by the
sha256 of every file in it (cached by size, mtime and inode, so an unchanged model is not read
again), a Hub id by its value."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
