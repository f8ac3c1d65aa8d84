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
from stack_dpo.faults import TransientError, no_space, transient, with_retries
from stack_dpo.outputs import ShardWriter
from stack_dpo.params import InvalidInput, Params

BATCH_ROWS = 10_000
log = logging.getLogger("stack_dpo.fetch")


def read_footers(folder: Path) -> tuple[list[str], list[str]]:
    """(the shards with rows, the shards whose footer cannot be read and why), each shard checked
    for every raw column before any is read: a column missing from a later shard would
    otherwise be read as nulls and its rows dropped as empty."""
    with_rows, bad = [], []
    for path in sorted(folder.glob("*.parquet")):
        try:
            footer = pq.read_metadata(path)
            names = footer.schema.to_arrow_schema().names
        except (pa.ArrowException, OSError) as exc:
            bad.append(f"{path} ({exc})")
            continue
        missing = [name for name in RAW_SCHEMA.names if name not in names]
        if missing:
            raise InvalidInput(f"{path}: missing columns {missing}; expected every shard to have {RAW_SCHEMA.names}")
        if footer.num_rows:  # a shard of zero rows is valid and adds nothing
            with_rows.append(str(path))
    return with_rows, bad


def read_failure(source: str, folder: Path, exc: Exception) -> Exception:
    """What a failure to read the source is: invalid input (the shards themselves), unless it
    is a fault of the network, the Hub or the disk, which a retry may get past."""
    if isinstance(exc, InvalidInput) or no_space(exc):
        return exc
    if transient(exc):
        return TransientError(f"{source}: {type(exc).__name__}: {exc}")
    named = read_footers(folder)[1] if folder.is_dir() else []
    return InvalidInput(f"{source}: cannot be read as parquet shards: {'; '.join(named) or exc}")


def open_split(params: Params, source: str, data_dir: str):
    """The split as a `datasets` dataset. A local mirror is read from its checked shards with
    rows (the Hub's parquet builder reads the same files, but fails on a shard of zero rows)."""
    local = Path(params.data.source) / data_dir
    if not Path(params.data.source).is_dir():
        return with_retries(f"{source}: opening the dataset on the Hub", lambda: load_dataset(
            params.data.source, data_dir=data_dir, split="train", streaming=params.fetch.streaming))
    if not local.is_dir():
        raise InvalidInput(f"{source}: split folder {local} does not exist; expected parquet shards in it")
    shards, corrupt = read_footers(local)
    if corrupt:
        raise InvalidInput(f"{source}: cannot be read as parquet shards: {'; '.join(corrupt)}")
    if not shards:
        raise InvalidInput(f"{source}: the split has no rows; expected at least one")
    return load_dataset("parquet", data_files=shards, split="train", streaming=params.fetch.streaming)


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
    try:
        dataset = open_split(params, source, data_dir)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise read_failure(source, local, exc) from None
    check_columns(source, dataset)
    if cap is not None:
        dataset = dataset.take(cap)
    writer = ShardWriter(out_dir / split, RAW_SCHEMA, params.fetch.shard_rows)
    # Close the stream here, not at interpreter exit: a reader left suspended by the row cap
    # was once torn down during shutdown and aborted the process after the data was written.
    with contextlib.closing(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)) as batches:
        while True:
            try:  # a failure to read is the source's; one to write (a full disk) is not
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise read_failure(source, local, exc) from None
            if batch is None:
                break
            writer.write(batch.select(RAW_SCHEMA.names))
    writer.close()
    del dataset
    gc.collect()
    if writer.rows == 0:
        raise InvalidInput(f"{source}: the split has no rows; expected at least one")
    log.info("%s: %d rows", source, writer.rows)
    return writer.rows
