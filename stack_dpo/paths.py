"""The contract paths (docs/design.md), named once; dvc.yaml lists the same ones (tests/test_layout.py)."""

from pathlib import Path

SOURCES = Path("data/sources")            # sources: dataset.json, model.json (what the inputs are now)
RAW = Path("data/raw")                   # fetch: {finetune,rl,evaluation}/ parquet shards
SFT_DATA = Path("data/processed/sft")    # prepare: {train,eval}/ with column `text`
DPO_DATA = Path("data/processed/dpo")    # prepare: {train,eval}/ with prompt, chosen, rejected
REFERENCE = Path("data/processed/reference")  # reference: {train,eval}/ ref_chosen_logps, ref_rejected_logps
SFT_ADAPTER = Path("models/sft")
DPO_ADAPTER = Path("models/dpo")
MERGED = Path("models/merged")
CHECKPOINTS = Path("checkpoints")        # {sft,dpo}/: DVC `persist` outputs, resumed from
DVCLIVE = Path("dvclive")                # {sft,dpo}/: training curves, DVC `persist` outputs
METRICS = Path("metrics")                # {prepare,sft,dpo,merge,evaluate}.json
EVAL_REPORT = Path("reports/evaluate.md")
EVAL_SCORES = Path("metrics/evaluate_pairs.parquet")  # evaluate: the log-probs behind every figure, per pair
PUSH_REPORT = Path("reports/push.json")
