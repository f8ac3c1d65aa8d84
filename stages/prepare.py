"""prepare: data/raw -> data/processed/sft/{train,eval} (text) and
data/processed/dpo/{train,eval} (prompt, chosen, rejected).

The seed's mapping, exactly: prompt = "Question: " + question + "\\n\\nAnswer: ",
chosen = response_j, rejected = response_k, SFT text = prompt + response_j. DPO pairs are
filtered by token counts of the base model's tokenizer, counted the way TRL's DPOTrainer
tokenizes (prompt <= max_prompt_length, prompt + response + EOS <= max_length), so no pair is
truncated in training. Every dropped row is counted by reason in metrics/prepare.json.
Works batch by batch (pyarrow), so memory does not grow with the number of rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.cli import main
from stages.fetch import SCHEMA as RAW_SCHEMA
from stages.modeling import load_tokenizer
from stages.outputs import ShardWriter, atomic_dir, parquet_files, write_json_atomic
from stages.params import InvalidInput, Params
from stages.paths import DPO_DATA, METRICS, RAW, SFT_DATA

SFT_SCHEMA = pa.schema([("text", pa.string())])
DPO_SCHEMA = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
REQUIRED = ["qid", "question", "response_j", "response_k"]
TEXT_COLUMNS = ("question", "response_j", "response_k")
CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # not tab, newline or carriage return
log = logging.getLogger("stages.prepare")


def seed_prompts(questions: list[str]) -> list[str]:
    return ["Question: " + question + "\n\nAnswer: " for question in questions]


def raw_batches(split: str, batch_rows: int):
    """Record batches of a raw split, checked for the columns the mapping needs."""
    for path in parquet_files(RAW / split):
        file = pq.ParquetFile(path)
        missing = [c for c in REQUIRED if c not in file.schema_arrow.names]
        if missing:
            raise InvalidInput(f"{path}: missing columns {missing}; expected the columns {RAW_SCHEMA.names}")
        yield from file.iter_batches(batch_size=batch_rows, columns=REQUIRED)


class Drops:
    """Keeps rows batch by batch and counts each dropped row under the first reason that applies."""

    def __init__(self):
        self.input = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()

    def keep(self, n: int, reasons: list[tuple[str, np.ndarray]]) -> np.ndarray:
        keep = np.ones(n, dtype=bool)
        for reason, bad in reasons:
            newly = keep & bad
            self.dropped[reason] += int(newly.sum())
            keep &= ~bad
        self.input += n
        self.kept += int(keep.sum())
        return keep

    def summary(self) -> dict:
        return {"input": self.input, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


def _decodes(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def invalid_utf8(column: pa.Array) -> np.ndarray:
    try:
        column.validate(full=True)  # fast path: the whole column is valid UTF-8
        return np.zeros(len(column), dtype=bool)
    except pa.ArrowInvalid:
        return np.array([v is not None and not _decodes(v) for v in column.view(pa.binary()).to_pylist()])


def readable(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray]:
    """The batch with invalid UTF-8 texts (lone surrogates, stray bytes) set to null, so the
    text kernels can read it, and which rows had them."""
    bad = np.zeros(batch.num_rows, dtype=bool)
    columns = []
    for name in batch.schema.names:
        column = batch.column(name)
        if name in TEXT_COLUMNS:
            invalid = invalid_utf8(column)
            if invalid.any():
                column = pc.if_else(pa.array(invalid), pa.scalar(None, pa.string()), column)
                bad |= invalid
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema), bad


def text_reasons(batch: pa.RecordBatch, eval_qids: np.ndarray | None,
                 seen_pairs: set[int] | None) -> tuple[pa.RecordBatch, list[tuple[str, np.ndarray]]]:
    """The readable batch and, in order, each reason a row is dropped before tokenizing.
    With `seen_pairs`, a pair (question, both answers) met before in the split is a duplicate
    (DPO only: in SFT a question's best answer recurs once per pair, as in the real data)."""
    batch, bad_utf8 = readable(batch)

    def empty(name):
        col = batch.column(name)
        return pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), True).to_numpy(False)

    def control(name):
        return pc.fill_null(pc.match_substring_regex(batch.column(name), CONTROL_CHARACTERS), False).to_numpy(False)

    reasons = [
        ("invalid_utf8", bad_utf8),
        ("empty_question", empty("question")),
        ("empty_response_j", empty("response_j")),
        ("empty_response_k", empty("response_k")),
        ("control_characters", control("question") | control("response_j") | control("response_k")),
        ("chosen_equals_rejected",
         pc.fill_null(pc.equal(batch.column("response_j"), batch.column("response_k")), False).to_numpy(False)),
    ]
    if eval_qids is not None:  # a question in the evaluation split must not be trained on
        reasons.append(("qid_in_evaluation", np.isin(batch.column("qid").to_numpy(False), eval_qids)))
    if seen_pairs is not None:
        duplicate = np.zeros(batch.num_rows, dtype=bool)
        for i, pair in enumerate(zip(*(batch.column(c).to_pylist() for c in TEXT_COLUMNS))):
            fingerprint = hash(pair)
            duplicate[i] = fingerprint in seen_pairs
            seen_pairs.add(fingerprint)
        reasons.append(("duplicate_pair", duplicate))
    return batch, reasons


def length_reasons(tokenizer, prompts, chosen, rejected, params: Params) -> list[tuple[str, np.ndarray]]:
    def tokens(texts: list[str]) -> np.ndarray:
        return np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])

    def with_answer(answers: list[str]) -> np.ndarray:  # prompt + answer + EOS, as DPOTrainer tokenizes it
        return tokens([p + a + tokenizer.eos_token for p, a in zip(prompts, answers)])

    limit = params.prepare.max_length
    return [
        ("prompt_too_long", tokens(prompts) > params.prepare.max_prompt_length),
        ("chosen_too_long", with_answer(chosen) > limit),
        ("rejected_too_long", with_answer(rejected) > limit),
    ]


def is_sft_eval(qids: np.ndarray, fraction: float) -> np.ndarray:
    """A stable pseudo-random split by question, so one question's pairs stay together."""
    mixed = qids.astype(np.uint64) * np.uint64(11400714819323198485)
    return (mixed >> np.uint64(40)).astype(np.float64) / float(1 << 24) < fraction


def prepare_sft(params: Params, eval_qids: np.ndarray, out: Path) -> dict:
    drops = Drops()
    train = ShardWriter(out / "train", SFT_SCHEMA, params.fetch.shard_rows)
    evaluation = ShardWriter(out / "eval", SFT_SCHEMA, params.fetch.shard_rows)
    for batch in raw_batches("finetune", params.prepare.batch_rows):
        batch, reasons = text_reasons(batch, eval_qids, seen_pairs=None)
        keep = drops.keep(batch.num_rows, reasons)
        batch = batch.filter(pa.array(keep))
        prompts = seed_prompts(batch.column("question").to_pylist())
        texts = pa.array([p + a for p, a in zip(prompts, batch.column("response_j").to_pylist())], pa.string())
        to_eval = is_sft_eval(batch.column("qid").to_numpy(False), params.prepare.sft_eval_fraction)
        train.write(pa.table({"text": texts.filter(pa.array(~to_eval))}))
        evaluation.write(pa.table({"text": texts.filter(pa.array(to_eval))}))
    train.close()
    evaluation.close()
    return {**drops.summary(), "train": train.rows, "eval": evaluation.rows}


def prepare_dpo(params: Params, tokenizer, split: str, eval_qids: np.ndarray | None, folder: Path) -> dict:
    drops = Drops()
    writer = ShardWriter(folder, DPO_SCHEMA, params.fetch.shard_rows)
    seen_pairs: set[int] = set()
    for batch in raw_batches(split, params.prepare.batch_rows):
        batch, reasons = text_reasons(batch, eval_qids, seen_pairs)
        valid = ~np.logical_or.reduce([bad for _, bad in reasons])
        pairs = pa.table(
            {
                "prompt": seed_prompts(batch.column("question").filter(pa.array(valid)).to_pylist()),
                "chosen": batch.column("response_j").filter(pa.array(valid)),
                "rejected": batch.column("response_k").filter(pa.array(valid)),
            },
            schema=DPO_SCHEMA,
        )
        for reason, too_long in length_reasons(tokenizer, *(pairs.column(c).to_pylist() for c in DPO_SCHEMA.names),
                                               params):
            bad = np.zeros(batch.num_rows, dtype=bool)
            bad[valid] = too_long
            reasons.append((reason, bad))
        keep = drops.keep(batch.num_rows, reasons)
        writer.write(pairs.filter(pa.array(keep[valid])))
    writer.close()
    return drops.summary()


def check_not_empty(metrics: dict) -> None:
    for name, counts in metrics.items():
        rows = counts.get("train", counts["kept"]) if name == "sft" else counts["kept"]
        if rows == 0 or (name == "sft" and counts["eval"] == 0):
            raise InvalidInput(
                f"prepare: no rows left for {name} (input {counts['input']} rows, dropped {counts['dropped']}); "
                "check data.source, fetch.max_rows and the prepare length limits in params.yaml"
            )


def run(params: Params) -> dict:
    tokenizer = load_tokenizer(params.model.name_or_path)
    eval_qids = np.unique(
        np.concatenate([b.column("qid").to_numpy(False) for b in raw_batches("evaluation", params.prepare.batch_rows)])
    )
    metrics: dict = {}
    with atomic_dir(SFT_DATA) as sft_tmp, atomic_dir(DPO_DATA) as dpo_tmp:
        metrics["sft"] = prepare_sft(params, eval_qids, sft_tmp)
        metrics["dpo/train"] = prepare_dpo(params, tokenizer, "rl", eval_qids, dpo_tmp / "train")
        metrics["dpo/eval"] = prepare_dpo(params, tokenizer, "evaluation", None, dpo_tmp / "eval")
        check_not_empty(metrics)
    write_json_atomic(METRICS / "prepare.json", metrics)
    for name, counts in metrics.items():
        log.info("%s: %s", name, counts)
    return metrics


if __name__ == "__main__":
    main(run)
