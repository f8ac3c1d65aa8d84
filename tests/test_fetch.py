import json

import pyarrow.parquet as pq
import pytest

from stack_dpo.dataset import RAW_SCHEMA
from stages import fetch
from tests.conftest import inside, make_workspace


def test_fetch_writes_raw_splits_with_caps(workspace):
    with inside(workspace) as params:
        metrics = fetch.run(params)
    counts = metrics["rows"]
    assert counts == {"finetune": 300, "rl": 160, "evaluation": 64}
    assert metrics["revision"] is None  # a local source has no Hub revision
    assert json.loads((workspace / "metrics/fetch.json").read_text()) == metrics
    for split, n in counts.items():
        table = pq.read_table(workspace / "data" / "raw" / split)
        assert table.num_rows == n
        assert table.schema.equals(RAW_SCHEMA)
    # the first rows of the source, in order: the cap stops reading, it does not sample
    source = pq.read_table(workspace / "data/sample/stack-exchange-paired/data/rl").slice(0, 160)
    assert pq.read_table(workspace / "data/raw/rl").column("qid").equals(source.column("qid"))


def test_fetch_without_caps_reads_whole_splits(tmp_path):
    ws = make_workspace(tmp_path, {"fetch": {"max_rows": {"finetune": None, "rl": None, "evaluation": None},
                                             "shard_rows": 400}})
    with inside(ws) as params:
        counts = fetch.run(params)["rows"]
    assert counts == {"finetune": 1500, "rl": 1500, "evaluation": 300}
    assert len(list((ws / "data/raw/rl").glob("*.parquet"))) == 4  # sharded at 400 rows


def test_fetch_names_missing_columns(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    mirror = tmp_path / "mirror"
    for split in ("finetune", "rl", "evaluation"):
        table = pq.read_table(ws / f"data/sample/stack-exchange-paired/data/{split}").drop_columns(["response_k"])
        (mirror / "data" / split).mkdir(parents=True)
        pq.write_table(table, mirror / "data" / split / "train-00000-of-00001.parquet")
    ws = make_workspace(tmp_path / "ws", {"data": {"source": str(mirror)}})
    with inside(ws) as params, pytest.raises(ValueError, match=r"missing columns \['response_k'\]"):
        fetch.run(params)
    assert not (ws / "data" / "raw").exists()  # nothing half-written
