"""fetch: stack-exchange-paired (Hub id or a local mirror) -> data/raw/{finetune,rl,evaluation}.

One code path for both: `datasets.load_dataset(source, data_dir=..., streaming=True)`, read in
record batches and cut at the per-split row caps, so memory stays bounded and only what the
caps need is read, whether the source has thousands or tens of millions of rows.
metrics/fetch.json records the rows per split and, for a Hub id, the dataset revision (commit
sha) it resolved to when the Hub answered.

    python -m stages.fetch     (or: dvc repro fetch)
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, load_dataset

from stages.cli import main
from stages.hub import hub_revision
from stages.outputs import ShardWriter, atomic_dir, write_json_atomic
from stages.params import InvalidInput, Params
from stages.paths import METRICS, RAW

SPLITS = ("finetune", "rl", "evaluation")
SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("question", pa.string()),
        ("date", pa.string()),
        ("metadata", pa.list_(pa.string())),
        ("response_j", pa.string()),
        ("response_k", pa.string()),
    ]
)
BATCH_ROWS = 10_000
log = logging.getLogger("stages.fetch")


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
    missing = [name for name in SCHEMA.names if name not in dataset.features]
    if missing:
        raise InvalidInput(f"{source}: missing columns {missing}; expected {SCHEMA.names}")
    expected = Features.from_arrow_schema(SCHEMA)
    wrong = [f"{name} is {dataset.features[name]}, expected {expected[name]}"
             for name in SCHEMA.names if dataset.features[name] != expected[name]]
    if wrong:
        raise InvalidInput(f"{source}: wrong column types: {'; '.join(wrong)}")
    extra = [name for name in dataset.features if name not in SCHEMA.names]
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
    writer = ShardWriter(out_dir / split, SCHEMA, params.fetch.shard_rows)
    # Close the stream here, not at interpreter exit: a reader left suspended by the row cap
    # was once torn down during shutdown and aborted the process after the data was written.
    try:
        with contextlib.closing(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)) as batches:
            for batch in batches:
                writer.write(batch.select(SCHEMA.names))
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(source, local, exc) from None
    writer.close()
    del dataset
    gc.collect()
    if writer.rows == 0:
        raise InvalidInput(f"{source}: the split has no rows; expected at least one")
    log.info("%s: %d rows", source, writer.rows)
    return writer.rows


def run(params: Params) -> dict:
    with atomic_dir(RAW) as tmp:
        rows = {split: fetch_split(params, split, tmp) for split in SPLITS}
        metrics = {"rows": rows, "source": params.data.source,
                   "revision": hub_revision(params.data.source, "dataset")}  # None: local, or the Hub did not answer
        write_json_atomic(METRICS / "fetch.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run)
