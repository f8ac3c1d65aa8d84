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

import json
import os

from stack_dpo.entrypoint import main
from stack_dpo.outputs import write_json_atomic
from stack_dpo.params import Params
from stack_dpo.paths import SOURCES
from stack_dpo.sources import HASH_CACHE, describe


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

