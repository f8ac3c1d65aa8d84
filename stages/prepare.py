"""prepare: data/raw -> data/processed/sft/{train,eval} (text) and
data/processed/dpo/{train,eval} (prompt, chosen, rejected).

The seed's mapping, exactly: prompt = "Question: " + question + "\\n\\nAnswer: ",
chosen = response_j, rejected = response_k, SFT text = prompt + response_j. DPO pairs are
filtered by token counts of the base model's tokenizer, counted the way TRL's DPOTrainer
tokenizes (prompt <= max_prompt_length, prompt + response + EOS <= max_length), so no pair is
truncated in training. Every dropped row is counted by reason in metrics/prepare.json.
Works batch by batch (pyarrow), so memory does not grow with the number of rows, and spreads
the DPO batches over prepare.num_proc worker processes (tokenizing is the costly part); a
text too long in characters to fit in tokens is dropped without being tokenized.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
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
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies
log = logging.getLogger("stages.prepare")


def seed_prompts(questions: list[str]) -> list[str]:
    return ["Question: " + question + "\n\nAnswer: " for question in questions]


def raw_shards(split: str):
    """(path, ParquetFile) of each shard of a raw split, checked for the columns the mapping needs."""
    for path in parquet_files(RAW / split):
        file = pq.ParquetFile(path)
        missing = [c for c in REQUIRED if c not in file.schema_arrow.names]
        if missing:
            raise InvalidInput(f"{path}: missing columns {missing}; expected the columns {RAW_SCHEMA.names}")
        yield path, file


def raw_batches(split: str, batch_rows: int):
    for _, file in raw_shards(split):
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


def text_reasons(batch: pa.RecordBatch, eval_qids: np.ndarray | None
                 ) -> tuple[pa.RecordBatch, list[tuple[str, np.ndarray]]]:
    """The readable batch and, in order, each reason a row is dropped before tokenizing."""
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
    return batch, reasons


def _hashes(rows) -> np.ndarray:
    """A stable 64-bit hash of each row (a tuple of texts), the same in every process."""
    hashes = []
    for row in rows:
        digest = hashlib.blake2b(digest_size=8)
        for text in row:
            digest.update(b"\x00" if text is None else text.encode("utf-8", "surrogatepass") + b"\x01")
        hashes.append(int.from_bytes(digest.digest(), "little"))
    return np.array(hashes, dtype=np.uint64)


def passes_every_reason(reasons: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Which rows no reason in `reasons` drops."""
    return ~np.logical_or.reduce([bad for _, bad in reasons])


def pair_hashes(batch: pa.RecordBatch) -> np.ndarray:
    """The hash of each (question, response_j, response_k)."""
    return _hashes(zip(*(batch.column(c).to_pylist() for c in TEXT_COLUMNS)))


def sft_hashes(batch: pa.RecordBatch) -> np.ndarray:
    """The hash of each SFT text, (question, response_j)."""
    return _hashes(zip(*(batch.column(c).to_pylist() for c in ("question", "response_j"))))


class SeenPairs:
    """The pairs met so far in a split, as a sorted array of 8-byte hashes (not Python objects)."""

    def __init__(self):
        self.sorted = np.empty(0, dtype=np.uint64)

    def duplicates(self, hashes: np.ndarray) -> np.ndarray:
        """Which rows repeat a pair met before (in earlier batches or earlier in this one); adds the new ones."""
        unique, first = np.unique(hashes, return_index=True)
        duplicate = np.ones(len(hashes), dtype=bool)
        duplicate[first] = False
        at = np.searchsorted(self.sorted, unique)
        seen = (at < len(self.sorted)) & (self.sorted[np.minimum(at, len(self.sorted) - 1)] == unique) \
            if len(self.sorted) else np.zeros(len(unique), dtype=bool)
        duplicate[first[seen]] = True
        self.sorted = np.insert(self.sorted, at[~seen], unique[~seen])
        return duplicate


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token stands for: a text of more than
    limit x this many characters cannot fit in `limit` tokens, so it need not be tokenized."""
    return max(len(tokenizer.decode([i])) for i in range(len(tokenizer))) + 1


def token_counts(tokenizer, texts: list[str], chunk: int = 256) -> np.ndarray:
    """len(tokenizer(text)["input_ids"]) of each text, special tokens included, from the fast
    tokenizer's own encodings in small chunks: no Python lists of ids, so memory stays small."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()  # count every token, whatever a tokenizer.json sets
    backend.no_padding()
    encode = backend.encode_batch_fast  # lengths only: no offsets needed
    return np.array([len(encoding) for start in range(0, len(texts), chunk)
                     for encoding in encode(texts[start:start + chunk], add_special_tokens=True)], dtype=np.int64)


def length_reasons(tokenizer, prompts, chosen, rejected, params: Params, max_chars: int
                   ) -> list[tuple[str, np.ndarray]]:
    """prompt_too_long, chosen_too_long, rejected_too_long, each computed only for the rows the
    earlier ones kept (a row is counted under its first reason)."""

    def too_long(texts: list[str], todo: np.ndarray, limit: int) -> np.ndarray:
        bad = np.zeros(len(texts), dtype=bool)
        fits = [i for i in np.flatnonzero(todo) if len(texts[i]) <= limit * max_chars]
        bad[todo] = True  # too many characters to fit, unless tokenized below
        if fits:
            bad[fits] = token_counts(tokenizer, [texts[i] for i in fits]) > limit
        return bad

    eos = tokenizer.eos_token  # prompt + answer + EOS, as DPOTrainer tokenizes it
    prompt_long = too_long(prompts, np.ones(len(prompts), dtype=bool), params.prepare.max_prompt_length)
    chosen_long = too_long([p + a + eos for p, a in zip(prompts, chosen)], ~prompt_long, params.prepare.max_length)
    rejected_long = too_long([p + a + eos for p, a in zip(prompts, rejected)], ~prompt_long & ~chosen_long,
                             params.prepare.max_length)
    return [("prompt_too_long", prompt_long), ("chosen_too_long", chosen_long), ("rejected_too_long", rejected_long)]


TOKENIZATION_SAMPLE = 64  # rl pairs whose tokenization is checked before any work


def check_tokenization(tokenizer, prompts: list[str], answers: list[str]) -> None:
    """The contract the length filter and TRL's DPOTrainer share, on a sample of pairs: prompt +
    answer + EOS (as TRL tokenizes it) starts with at most one BOS and ends with exactly one
    EOS, and the tokenized prompt is a prefix of it up to whitespace that merges into the
    answer's first token (TRL then starts the answer where the two diverge). A tokenizer that
    adds its own EOS or BOS again, or a prompt template whose end merges with the answers,
    would make every count and every log-prob wrong, so it stops prepare before any work."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    problems: Counter[str] = Counter()
    for prompt, answer in zip(prompts, answers):
        full = tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"]
        prompt_ids = tokenizer(prompt)["input_ids"]
        shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), len(prompt_ids))
        problems["a doubled BOS"] += bos is not None and full[:2] == [bos, bos]
        problems["a doubled EOS"] += full[-2:] == [eos, eos]
        problems["no EOS at the end"] += full[-1] != eos
        problems["a prompt/answer boundary inside the prompt"] += bool(tokenizer.decode(prompt_ids[shared:]).strip())
    found = ", ".join(f"{n} of {len(prompts)} sample pairs ({problem})" for problem, n in problems.items() if n)
    if found:
        raise InvalidInput(f"model.name_or_path = {tokenizer.name_or_path!r}: its tokenizer breaks the tokenization "
                           f"contract on {found}; expected prompt + answer + EOS to start with one BOS, end with "
                           "one EOS and keep the prompt's tokens")


def sample_pairs(n: int) -> tuple[list[str], list[str]]:
    """(prompts, preferred answers) of the first n readable, non-empty rl rows."""
    prompts, answers = [], []
    for batch in raw_batches("rl", n):
        batch, reasons = text_reasons(batch, None)
        batch = batch.filter(pa.array(passes_every_reason(reasons)))
        prompts += seed_prompts(batch.column("question").to_pylist())
        answers += batch.column("response_j").to_pylist()
        if len(prompts) >= n:
            break
    return prompts[:n], answers[:n]


def is_sft_eval(qids: np.ndarray, fraction: float) -> np.ndarray:
    """A stable pseudo-random split by question, so one question's pairs stay together."""
    mixed = qids.astype(np.uint64) * np.uint64(11400714819323198485)
    return (mixed >> np.uint64(40)).astype(np.float64) / float(1 << 24) < fraction


def prepare_sft(params: Params, eval_qids: np.ndarray, out: Path) -> dict:
    drops = Drops()
    train = ShardWriter(out / "train", SFT_SCHEMA, params.fetch.shard_rows)
    evaluation = ShardWriter(out / "eval", SFT_SCHEMA, params.fetch.shard_rows)
    seen = SeenPairs()
    for batch in raw_batches("finetune", params.prepare.batch_rows):
        batch, reasons = text_reasons(batch, eval_qids)
        # one question with several pairs repeats its preferred answer: train on each text once
        valid = passes_every_reason(reasons)
        duplicate = np.zeros(batch.num_rows, dtype=bool)
        duplicate[valid] = seen.duplicates(sft_hashes(batch.filter(pa.array(valid))))
        keep = drops.keep(batch.num_rows, [*reasons, ("duplicate_text", duplicate)])
        batch = batch.filter(pa.array(keep))
        prompts = seed_prompts(batch.column("question").to_pylist())
        texts = pa.array([p + a for p, a in zip(prompts, batch.column("response_j").to_pylist())], pa.string())
        to_eval = is_sft_eval(batch.column("qid").to_numpy(False), params.prepare.sft_eval_fraction)
        train.write(pa.table({"text": texts.filter(pa.array(~to_eval))}))
        evaluation.write(pa.table({"text": texts.filter(pa.array(to_eval))}))
    train.close()
    evaluation.close()
    return {**drops.summary(), "train": train.rows, "eval": evaluation.rows}


_worker: dict = {}  # what each worker process holds: the tokenizer, params, evaluation qids


def _start_worker(params: Params, eval_qids: np.ndarray | None) -> None:
    tokenizer = load_tokenizer(params.model.name_or_path)
    _worker.update(tokenizer=tokenizer, params=params, eval_qids=eval_qids, max_chars=max_token_chars(tokenizer))


def assess_dpo_batch(batch: pa.RecordBatch) -> tuple[int, pa.Table, np.ndarray, list, np.ndarray]:
    """One batch's work that needs no other batch: (rows, the seed-mapped pairs that pass every
    check but the duplicate one, which rows those are, the drop reasons, the pair hashes)."""
    batch, reasons = text_reasons(batch, _worker["eval_qids"])
    valid = passes_every_reason(reasons)
    pairs = pa.table(
        {
            "prompt": seed_prompts(batch.column("question").filter(pa.array(valid)).to_pylist()),
            "chosen": batch.column("response_j").filter(pa.array(valid)),
            "rejected": batch.column("response_k").filter(pa.array(valid)),
        },
        schema=DPO_SCHEMA,
    )
    texts = (pairs.column(c).to_pylist() for c in DPO_SCHEMA.names)
    fits = np.ones(len(pairs), dtype=bool)
    for reason, too_long in length_reasons(_worker["tokenizer"], *texts, _worker["params"], _worker["max_chars"]):
        bad = np.zeros(batch.num_rows, dtype=bool)
        bad[valid] = too_long
        reasons.append((reason, bad))
        fits &= ~too_long
    passing = valid.copy()
    passing[valid] = fits
    return batch.num_rows, pairs.filter(pa.array(fits)), passing, reasons, pair_hashes(batch)


def assess_row_group(task: tuple[str, int]) -> tuple[int, pa.Table, np.ndarray, list, np.ndarray]:
    """assess_dpo_batch over one row group of a raw shard, read by the worker itself (only the
    pairs that may be kept travel back), in batches of at most prepare.batch_rows."""
    path, group = task
    file = pq.ParquetFile(path)
    parts = [assess_dpo_batch(batch) for batch in
             file.iter_batches(batch_size=_worker["params"].prepare.batch_rows, row_groups=[group], columns=REQUIRED)]
    if not parts:
        return 0, DPO_SCHEMA.empty_table(), np.zeros(0, bool), [], np.zeros(0, np.uint64)
    reasons = [(name, np.concatenate([part[3][i][1] for part in parts])) for i, (name, _) in enumerate(parts[0][3])]
    return (sum(part[0] for part in parts), pa.concat_tables([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts]), reasons, np.concatenate([part[4] for part in parts]))


def row_groups(split: str) -> list[tuple[str, int]]:
    """(shard, row group) of a raw split: the units of work handed to the workers."""
    return [(str(path), group) for path, file in raw_shards(split) for group in range(file.num_row_groups)]


def _worker_process(parent: int, start, start_args) -> None:
    """Set up a worker that dies with its parent: a prepare killed outright (SIGKILL, the OOM
    killer) must not leave workers behind that wait forever and hold its output pipes open."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    start(*start_args)


def in_order(fn, items, workers: int, start, start_args):
    """fn over items in order: in this process, or in `workers` processes with a bounded
    number of batches in flight (memory stays flat however many rows there are)."""
    if workers == 1:
        start(*start_args)
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork")  # the workers inherit the imported modules
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_process,
                             initargs=(os.getpid(), start, start_args)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare_dpo(params: Params, split: str, eval_qids: np.ndarray | None, folder: Path) -> dict:
    drops = Drops()
    writer = ShardWriter(folder, DPO_SCHEMA, params.fetch.shard_rows)
    seen = SeenPairs()
    for rows, pairs, passing, reasons, hashes in in_order(assess_row_group, row_groups(split), num_workers(params),
                                                           _start_worker, (params, eval_qids)):
        if not rows:
            continue
        duplicate = seen.duplicates(hashes)  # needs every earlier batch, so it is decided here
        position = next(i for i, (reason, _) in enumerate(reasons) if reason == "prompt_too_long")
        reasons.insert(position, ("duplicate_pair", duplicate))
        keep = drops.keep(rows, reasons)
        writer.write(pairs.filter(pa.array(keep[passing])))
    writer.close()
    return drops.summary()


def num_workers(params: Params) -> int:
    return params.prepare.num_proc or os.cpu_count() or 1


def check_not_empty(metrics: dict) -> None:
    for name, counts in metrics.items():
        rows = counts.get("train", counts["kept"]) if name == "sft" else counts["kept"]
        if rows == 0 or (name == "sft" and counts["eval"] == 0):
            raise InvalidInput(
                f"prepare: no rows left for {name} (input {counts['input']} rows, dropped {counts['dropped']}); "
                "check data.source, fetch.max_rows and the prepare length limits in params.yaml"
            )


def run(params: Params) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # prepare.num_proc is the one knob for cores
    check_tokenization(load_tokenizer(params.model.name_or_path), *sample_pairs(TOKENIZATION_SAMPLE))
    eval_qids = np.unique(
        np.concatenate([b.column("qid").to_numpy(False) for b in raw_batches("evaluation", params.prepare.batch_rows)])
    )
    metrics: dict = {}
    with atomic_dir(SFT_DATA) as sft_tmp, atomic_dir(DPO_DATA) as dpo_tmp:
        for name, work in (("sft", lambda: prepare_sft(params, eval_qids, sft_tmp)),
                           ("dpo/train", lambda: prepare_dpo(params, "rl", eval_qids, dpo_tmp / "train")),
                           ("dpo/eval", lambda: prepare_dpo(params, "evaluation", None, dpo_tmp / "eval"))):
            started = time.perf_counter()
            metrics[name] = work()
            log.info("%s: %d rows in %.1f s", name, metrics[name]["input"], time.perf_counter() - started)
        check_not_empty(metrics)
    write_json_atomic(METRICS / "prepare.json", metrics)
    for name, counts in metrics.items():
        log.info("%s: %s", name, counts)
    return metrics


if __name__ == "__main__":
    main(run)
