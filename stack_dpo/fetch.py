"""Reading stack-exchange-paired (a Hub id or a local mirror laid out like it) into parquet
shards: one split at a time, streamed in record batches and cut at the row cap, so memory stays
bounded and only what the caps need is read. A source that cannot be read, lacks a column or
has no rows is invalid input naming the file."""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, load_dataset

from stack_dpo.dataset import RAW_SCHEMA
from stack_dpo.outputs import ShardWriter
from stack_dpo.params import InvalidInput, Params

BATCH_ROWS = 10_000
log = logging.getLogger("stack_dpo.fetch")


def read_footers(folder: Path) -> tuple[int, list[str]]:
    """(rows in the readable shards, the shards whose footer cannot be read and why)."""
    rows, bad = 0, []
    for path in sorted(folder.glob("*.parquet")):
        try:
            rows += pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError) as exc:
            bad.append(f"{path} ({exc})")
    return rows, bad


def unreadable(source: str, folder: Path, exc: Exception) -> InvalidInput:
    named = read_footers(folder)[1] if folder.is_dir() else []
    return InvalidInput(f"{source}: cannot be read as parquet shards: {'; '.join(named) or exc}")


def check_columns(source: str, dataset) -> None:
    if dataset.features is None:  # a source without a schema: the cast while writing checks types
        return
    missing = [name for name in RAW_SCHEMA.names if name not in dataset.features]
    if missing:
        raise InvalidInput(f"{source}: missing columns {missing}; expected {RAW_SCHEMA.names}")
    expected = Features.from_arrow_schema(RAW_SCHEMA)
    wrong = [f"{name} is {dataset.features[name]}, expected {expected[name]}"
             for name in RAW_SCHEMA.names if dataset.features[name] != expected[name]]
    if wrong:
        raise InvalidInput(f"{source}: wrong column types: {'; '.join(wrong)}")
    extra = [name for name in dataset.features if name not in RAW_SCHEMA.names]
    if extra:
        log.warning("%s: ignoring extra columns %s", source, extra)


def fetch_split(params: Params, split: str, out_dir: Path) -> int:
    data_dir = getattr(params.data.splits, split)
    cap = getattr(params.fetch.max_rows, split)
    source = f"{params.data.source} ({data_dir})"
    local = Path(params.data.source) / data_dir
    if Path(params.data.source).is_dir():
        if not local.is_dir():
            raise InvalidInput(f"{source}: split folder {local} does not exist; expected parquet shards in it")
        rows, corrupt = read_footers(local)
        if rows == 0 and not corrupt:
            raise InvalidInput(f"{source}: the split has no rows; expected at least one")
    try:
        dataset = load_dataset(params.data.source, data_dir=data_dir, split="train", streaming=params.fetch.streaming)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise unreadable(source, local, exc) from None
    check_columns(source, dataset)
    if cap is not None:
        dataset = dataset.take(cap)
    writer = ShardWriter(out_dir / split, RAW_SCHEMA, params.fetch.shard_rows)
    # Close the stream here, not at interpreter exit: a reader left suspended by the row cap
    # was once torn down during shutdown and aborted the process after the data was written.
    try:
        with contextlib.closing(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)) as batches:
            for batch in batches:
                writer.write(batch.select(RAW_SCHEMA.names))
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(source, local, exc) from None
    writer.close()
    del dataset
    gc.collect()
    if writer.rows == 0:
        raise InvalidInput(f"{source}: the split has no rows; expected at least one")
    log.info("%s: %d rows", source, writer.rows)
    return writer.rows
