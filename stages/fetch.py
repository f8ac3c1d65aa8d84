"""fetch: stack-exchange-paired (Hub id or a local mirror) -> data/raw/{finetune,rl,evaluation}.

One code path for both: `datasets.load_dataset(source, data_dir=..., streaming=True)`, read in
record batches and cut at the per-split row caps, so memory stays bounded and only what the
caps need is read, whether the source has thousands or tens of millions of rows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import pyarrow as pa
from datasets import load_dataset

from stages.cli import main
from stages.outputs import ShardWriter, atomic_dir
from stages.params import InvalidInput, Params
from stages.paths import RAW

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


def fetch_split(params: Params, split: str, out_dir: Path) -> int:
    data_dir = getattr(params.data.splits, split)
    cap = getattr(params.fetch.max_rows, split)
    source = f"{params.data.source} ({data_dir})"
    dataset = load_dataset(params.data.source, data_dir=data_dir, split="train", streaming=params.fetch.streaming)
    missing = [name for name in SCHEMA.names if name not in (dataset.column_names or SCHEMA.names)]
    if missing:
        raise InvalidInput(f"{source}: missing columns {missing}; expected {SCHEMA.names}")
    if cap is not None:
        dataset = dataset.take(cap)
    writer = ShardWriter(out_dir / split, SCHEMA, params.fetch.shard_rows)
    # Close the stream here, not at interpreter exit: a reader left suspended by the row cap
    # was once torn down during shutdown and aborted the process after the data was written.
    with contextlib.closing(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)) as batches:
        for batch in batches:
            writer.write(batch.select(SCHEMA.names))
    writer.close()
    del dataset
    gc.collect()
    log.info("%s: %d rows", source, writer.rows)
    return writer.rows


def run(params: Params) -> dict[str, int]:
    with atomic_dir(RAW) as tmp:
        return {split: fetch_split(params, split, tmp) for split in SPLITS}


if __name__ == "__main__":
    main(run)
