"""fetch: stack-exchange-paired (Hub id or a local mirror) -> data/raw/{finetune,rl,evaluation}.

One code path for both: `datasets.load_dataset(source, data_dir=..., streaming=True)`, read in
record batches and cut at the per-split row caps, so memory stays bounded and only what the
caps need is read, whether the source has thousands or tens of millions of rows.
metrics/fetch.json records the rows per split and, for a Hub id, the dataset revision (commit
sha) it resolved to when the Hub answered.

    python -m stages.fetch     (or: dvc repro fetch)
"""

from __future__ import annotations

from stack_dpo.dataset import SPLITS
from stack_dpo.entrypoint import main
from stack_dpo.fetch import fetch_split
from stack_dpo.hub import hub_revision
from stack_dpo.outputs import atomic_dir, write_json_atomic
from stack_dpo.params import Params
from stack_dpo.paths import METRICS, RAW


def run(params: Params) -> dict:
    with atomic_dir(RAW, stale=METRICS / "fetch.json") as tmp:
        rows = {split: fetch_split(params, split, tmp) for split in SPLITS}
        metrics = {"rows": rows, "source": params.data.source,
                   "revision": hub_revision(params.data.source, "dataset")}  # None: local, or the Hub did not answer
    write_json_atomic(METRICS / "fetch.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run)

