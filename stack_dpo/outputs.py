"""Crash-safe outputs: every stage writes to a temporary path and renames it into place,
so a killed stage leaves the previous output or none, never a partial one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(target: Path) -> None:
    """Delete the temporary siblings of `target` that a killed writer left behind
    (named `.{name}.tmp-{pid}-...` / `.{name}.old-{pid}`; a live writer's are kept)."""
    for path in target.parent.glob(f".{target.name}.*-*"):
        kind, _, rest = path.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def usual_mode(mode: int) -> int:
    """`mode` less the process's umask. tempfile makes private temporaries (0700, 0600); outputs
    get the usual permissions instead, as a shared DVC cache and the volumes of other users and
    pods need (no output holds a secret)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_dir(target: str | Path, stale: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target`. The
    `stale` file (the metrics of the old output) is removed first, so a failure in between never
    leaves an output beside the metrics of another."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, usual_mode(0o777))
    try:
        yield tmp
        if stale is not None:
            Path(stale).unlink(missing_ok=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        os.chmod(tmp, usual_mode(0o666))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_parquet_atomic(path: str | Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class ShardWriter:
    """Writes record batches to a folder of parquet shards of at most `shard_rows` rows."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_rows: int):
        self.folder, self.schema, self.shard_rows = folder, schema, shard_rows
        self.rows = 0
        self._shard = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                path = self.folder / f"part-{self._shard:05d}.parquet"
                self._writer = pq.ParquetWriter(path, self.schema)
            take = min(self.shard_rows - self._in_shard, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, take))
            offset += take
            self._in_shard += take
            self.rows += take
            if self._in_shard == self.shard_rows:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._shard += 1
            self._in_shard = 0

    def close(self) -> None:
        self._close_shard()
        if self._shard == 0:  # keep the schema even when no row was written
            pq.write_table(self.schema.empty_table(), self.folder / "part-00000.parquet")


def load_splits(folder: str | Path):
    """{"train", "eval"} datasets from `folder`/train and `folder`/eval parquet shards."""
    from datasets import load_dataset

    files = {split: [str(p) for p in parquet_files(Path(folder) / split)] for split in ("train", "eval")}
    return load_dataset("parquet", data_files=files)


def parquet_files(folder: str | Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no parquet files (did the previous stage run?)")
    return files
