"""prepare's work: data/raw -> SFT texts and DPO pairs, with every dropped row counted.

The drop rules come first below (DROP_RULES), in the order they apply: a dropped row is counted
under the first rule that matches it. Text rules look at one row at a time; duplicates need
every earlier row, so they are decided in the main process; token limits are checked last and
only on rows every other rule kept (tokenizing is the costly part, spread over
prepare.num_proc worker processes). Rows stream through batch by batch (pyarrow), so memory
does not grow with the number of rows.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from stack_dpo.dataset import RAW_SCHEMA, format_prompts, sft_text
from stack_dpo.modeling import load_tokenizer
from stack_dpo.outputs import ShardWriter, parquet_files
from stack_dpo.params import InvalidInput, Params
from stack_dpo.paths import RAW

# The drop rules, in the order they apply (a row is counted under the first that matches).
TEXT_RULES = (
    "invalid_utf8",            # a text that is not UTF-8 (lone surrogates, stray bytes)
    "missing_qid",             # no question id: neither the SFT split nor the evaluation overlap can use it
    "empty_question",          # empty, or only whitespace, zero-width characters and byte-order marks
    "empty_response_j",
    "empty_response_k",
    "control_characters",      # control characters other than tab, newline, carriage return
    "chosen_equals_rejected",  # nothing to prefer: the same text up to whitespace
    "qid_in_evaluation",       # a training row whose question is in the evaluation split
)
TOKEN_RULES = ("prompt_too_long", "chosen_too_long", "rejected_too_long")  # prepare.max_prompt_length / max_length
DROP_RULES = {
    # a question's preferred answer is trained on once; text_too_long: prepare.max_sft_length
    "sft": (*TEXT_RULES, "duplicate_text", "text_too_long"),
    "dpo": (*TEXT_RULES, "duplicate_pair", *TOKEN_RULES),
}

SFT_SCHEMA = pa.schema([("text", pa.string())])
DPO_SCHEMA = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
REQUIRED = ["qid", "question", "response_j", "response_k"]
TEXT_COLUMNS = ("question", "response_j", "response_k")
CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # not tab, newline or carriage return
# Unicode whitespace (RE2's \s is ASCII only) and the invisible zero-width characters and BOM
BLANK = r"[\s\x{85}\pZ\x{200B}-\x{200D}\x{2060}\x{FEFF}]"
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies
TOKENIZATION_SAMPLE = 64  # rl pairs whose tokenization is checked before any work
log = logging.getLogger("stack_dpo.prepare")

Masks = dict[str, np.ndarray]  # drop rule -> which rows of a batch it matches


class Drops:
    """Keeps rows batch by batch and counts each dropped row under the first rule (in `rules`
    order) that matches it."""

    def __init__(self, rules: tuple[str, ...]):
        self.rules = rules
        self.input = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter({rule: 0 for rule in rules})

    def keep(self, n: int, masks: Masks) -> np.ndarray:
        if set(masks) != set(self.rules):
            raise ValueError(f"drop masks {sorted(masks)} are not the rules {self.rules}")
        keep = np.ones(n, dtype=bool)
        for rule in self.rules:
            self.dropped[rule] += int((keep & masks[rule]).sum())
            keep &= ~masks[rule]
        self.input += n
        self.kept += int(keep.sum())
        return keep

    def summary(self) -> dict:
        return {"input": self.input, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


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


def rows_progress(split: str) -> tqdm:
    """A progress bar over the raw rows of a split (counted from the shards' footers)."""
    total = sum(file.metadata.num_rows for _, file in raw_shards(split))
    return tqdm(total=total, desc=f"prepare {split}", unit="rows")


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


def text_masks(batch: pa.RecordBatch, eval_qids: np.ndarray | None) -> tuple[pa.RecordBatch, Masks]:
    """The readable batch and the TEXT_RULES masks (without qid_in_evaluation when `eval_qids`
    is None: for the evaluation split itself)."""
    batch, bad_utf8 = readable(batch)

    def empty(name):
        return pc.fill_null(pc.match_substring_regex(batch.column(name), f"^{BLANK}*$"), True).to_numpy(False)

    def words(name):  # the text with each run of blanks as one space, none at the ends
        spaced = pc.replace_substring_regex(batch.column(name), f"{BLANK}+", " ")
        return pc.utf8_trim(spaced, " ")

    def control(name):
        return pc.fill_null(pc.match_substring_regex(batch.column(name), CONTROL_CHARACTERS), False).to_numpy(False)

    masks = {
        "invalid_utf8": bad_utf8,
        "missing_qid": pc.is_null(batch.column("qid")).to_numpy(False),
        "empty_question": empty("question"),
        "empty_response_j": empty("response_j"),
        "empty_response_k": empty("response_k"),
        "control_characters": control("question") | control("response_j") | control("response_k"),
        "chosen_equals_rejected":
            pc.fill_null(pc.equal(words("response_j"), words("response_k")), False).to_numpy(False),
    }
    if eval_qids is not None:
        masks["qid_in_evaluation"] = np.isin(batch.column("qid").to_numpy(False), eval_qids)
    return batch, masks


def passes(masks: Masks) -> np.ndarray:
    """Which rows no mask matches."""
    return ~np.logical_or.reduce(list(masks.values()))


def _hashes(rows) -> np.ndarray:
    """A stable 64-bit hash of each row (a tuple of texts), the same in every process."""
    hashes = []
    for row in rows:
        digest = hashlib.blake2b(digest_size=8)
        for text in row:
            digest.update(b"\x00" if text is None else text.encode("utf-8", "surrogatepass") + b"\x01")
        hashes.append(int.from_bytes(digest.digest(), "little"))
    return np.array(hashes, dtype=np.uint64)


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


def tokenizer_and_max_chars(name_or_path: str):
    """The tokenizer and its max_token_chars, loaded once per process and model folder (a
    relative path is resolved first: tests run workspaces one after another in one process)."""
    local = Path(name_or_path)
    return _load_tokenizer_and_max_chars(str(local.resolve()) if local.exists() else name_or_path)


@functools.cache
def _load_tokenizer_and_max_chars(name_or_path: str):
    tokenizer = load_tokenizer(name_or_path)
    return tokenizer, max_token_chars(tokenizer)


def token_counts(tokenizer, texts: list[str], chunk: int = 256) -> np.ndarray:
    """len(tokenizer(text)["input_ids"]) of each text, special tokens included, from the fast
    tokenizer's own encodings in small chunks: no Python lists of ids, so memory stays small."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()  # count every token, whatever a tokenizer.json sets
    backend.no_padding()
    encode = backend.encode_batch_fast  # lengths only: no offsets needed
    return np.array([len(encoding) for start in range(0, len(texts), chunk)
                     for encoding in encode(texts[start:start + chunk], add_special_tokens=True)], dtype=np.int64)


def longer_than(tokenizer, max_chars: int, texts: list[str], todo: np.ndarray, limit: int) -> np.ndarray:
    """Which of the `todo` texts have more than `limit` tokens; a text of more characters than
    the limit allows for is not tokenized at all."""
    bad = np.zeros(len(texts), dtype=bool)
    fits = [i for i in np.flatnonzero(todo) if len(texts[i]) <= limit * max_chars]
    bad[todo] = True  # too many characters to fit, unless tokenized below
    if fits:
        bad[fits] = token_counts(tokenizer, [texts[i] for i in fits]) > limit
    return bad


def token_masks(tokenizer, prompts, chosen, rejected, params: Params, max_chars: int) -> Masks:
    """The TOKEN_RULES masks, each computed only for the rows the earlier ones kept (a row is
    counted under its first rule), counted as TRL's DPOTrainer tokenizes: prompt, and prompt +
    answer + EOS."""

    def too_long(texts: list[str], todo: np.ndarray, limit: int) -> np.ndarray:
        return longer_than(tokenizer, max_chars, texts, todo, limit)

    eos = tokenizer.eos_token
    prompt_long = too_long(prompts, np.ones(len(prompts), dtype=bool), params.prepare.max_prompt_length)
    chosen_long = too_long([p + a + eos for p, a in zip(prompts, chosen)], ~prompt_long, params.prepare.max_length)
    rejected_long = too_long([p + a + eos for p, a in zip(prompts, rejected)], ~prompt_long & ~chosen_long,
                             params.prepare.max_length)
    return {"prompt_too_long": prompt_long, "chosen_too_long": chosen_long, "rejected_too_long": rejected_long}


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
    merged = 0
    for prompt, answer in zip(prompts, answers):
        # verbose=False: a text beyond the model's context is not an error here (the limits drop it)
        full = tokenizer(prompt + answer + tokenizer.eos_token, verbose=False)["input_ids"]
        prompt_ids = tokenizer(prompt, verbose=False)["input_ids"]
        shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), len(prompt_ids))
        problems["a doubled BOS"] += bos is not None and full[:2] == [bos, bos]
        problems["a doubled EOS"] += full[-2:] == [eos, eos]
        problems["no EOS at the end"] += full[-1] != eos
        problems["a prompt/answer boundary inside the prompt"] += bool(tokenizer.decode(prompt_ids[shared:]).strip())
        merged += shared < len(prompt_ids)
    found = ", ".join(f"{n} of {len(prompts)} sample pairs ({problem})" for problem, n in problems.items() if n)
    if found:
        raise InvalidInput(f"model.name_or_path = {tokenizer.name_or_path!r}: its tokenizer breaks the tokenization "
                           f"contract on {found}; expected prompt + answer + EOS to start with one BOS, end with "
                           "one EOS and keep the prompt's tokens")
    if merged:  # said once here; TRL's own warning in each tokenizing stage is dropped (entrypoint)
        log.info("the prompt's closing whitespace joins the answer's first token in %d of %d sample pairs: training "
                 "and generation see the prompt without it (stack_dpo.dataset.generation_prompt)", merged,
                 len(prompts))


def sample_pairs(n: int) -> tuple[list[str], list[str]]:
    """(prompts, preferred answers) of the first n readable, non-empty rl rows."""
    prompts, answers = [], []
    for batch in raw_batches("rl", n):
        batch, masks = text_masks(batch, None)
        batch = batch.filter(pa.array(passes(masks)))
        prompts += format_prompts(batch.column("question").to_pylist())
        answers += batch.column("response_j").to_pylist()
        if len(prompts) >= n:
            break
    return prompts[:n], answers[:n]


def is_sft_eval(qids: np.ndarray, fraction: float) -> np.ndarray:
    """A stable pseudo-random split by question, so one question's pairs stay together."""
    mixed = qids.astype(np.uint64) * np.uint64(11400714819323198485)
    return (mixed >> np.uint64(40)).astype(np.float64) / float(1 << 24) < fraction


def prepare_sft(params: Params, eval_qids: np.ndarray, out: Path) -> dict:
    """The finetune split -> SFT texts in out/{train,eval}; returns its drop counts."""
    drops = Drops(DROP_RULES["sft"])  # eval_qids is always given: the rule applies
    tokenizer, max_chars = tokenizer_and_max_chars(params.model.name_or_path)
    limit = params.prepare.max_sft_length or params.prepare.max_length
    train = ShardWriter(out / "train", SFT_SCHEMA, params.fetch.shard_rows)
    evaluation = ShardWriter(out / "eval", SFT_SCHEMA, params.fetch.shard_rows)
    seen = SeenPairs()
    progress = rows_progress("finetune")
    for batch in raw_batches("finetune", params.prepare.batch_rows):
        progress.update(batch.num_rows)
        batch, masks = text_masks(batch, eval_qids)
        valid = passes(masks)
        masks["duplicate_text"] = np.zeros(batch.num_rows, dtype=bool)
        masks["duplicate_text"][valid] = seen.duplicates(sft_hashes(batch.filter(pa.array(valid))))
        valid &= ~masks["duplicate_text"]
        pairs = zip(batch.column("question").to_pylist(), batch.column("response_j").to_pylist())
        texts = [sft_text(question, answer) if ok else "" for ok, (question, answer) in zip(valid, pairs)]
        masks["text_too_long"] = longer_than(tokenizer, max_chars, [t + tokenizer.eos_token for t in texts], valid,
                                             limit)
        keep = drops.keep(batch.num_rows, masks)
        batch = batch.filter(pa.array(keep))
        texts = pa.array([text for text, kept in zip(texts, keep) if kept], pa.string())
        to_eval = is_sft_eval(batch.column("qid").to_numpy(False), params.prepare.sft_eval_fraction)
        train.write(pa.table({"text": texts.filter(pa.array(~to_eval))}))
        evaluation.write(pa.table({"text": texts.filter(pa.array(to_eval))}))
    train.close()
    evaluation.close()
    progress.close()
    return {**drops.summary(), "train": train.rows, "eval": evaluation.rows}


class AssessedRows(NamedTuple):
    """What a worker found in some rows of a raw DPO split, for the main process to finish."""
    rows: int
    candidates: pa.Table    # the seed-mapped pairs of the rows every rule but duplicate_pair keeps
    passing: np.ndarray     # which rows those are
    masks: Masks            # every DPO rule's mask but duplicate_pair's (it needs the earlier rows)
    hashes: np.ndarray      # each row's pair hash, for duplicate_pair


@dataclass(frozen=True)
class PairAssessor:
    """The per-row DPO rules: what a worker needs, passed with each task (small: no tokenizer)."""
    params: Params
    eval_qids: np.ndarray | None  # None for the evaluation split itself

    def assess_batch(self, batch: pa.RecordBatch) -> AssessedRows:
        tokenizer, max_chars = tokenizer_and_max_chars(self.params.model.name_or_path)
        batch, masks = text_masks(batch, self.eval_qids)
        valid = passes(masks)
        pairs = pa.table(
            {
                "prompt": format_prompts(batch.column("question").filter(pa.array(valid)).to_pylist()),
                "chosen": batch.column("response_j").filter(pa.array(valid)),
                "rejected": batch.column("response_k").filter(pa.array(valid)),
            },
            schema=DPO_SCHEMA,
        )
        texts = (pairs.column(c).to_pylist() for c in DPO_SCHEMA.names)
        fits = np.ones(len(pairs), dtype=bool)
        for rule, too_long in token_masks(tokenizer, *texts, self.params, max_chars).items():
            masks[rule] = np.zeros(batch.num_rows, dtype=bool)
            masks[rule][valid] = too_long
            fits &= ~too_long
        passing = valid.copy()
        passing[valid] = fits
        return AssessedRows(batch.num_rows, pairs.filter(pa.array(fits)), passing, masks, pair_hashes(batch))

    def assess_row_group(self, task: tuple[str, int]) -> AssessedRows:
        """assess_batch over one row group of a raw shard, read by the worker itself (only the
        candidate pairs travel back), in batches of at most prepare.batch_rows."""
        path, group = task
        parts = [self.assess_batch(batch) for batch in pq.ParquetFile(path).iter_batches(
            batch_size=self.params.prepare.batch_rows, row_groups=[group], columns=REQUIRED)]
        if not parts:
            return AssessedRows(0, DPO_SCHEMA.empty_table(), np.zeros(0, bool), {}, np.zeros(0, np.uint64))
        return AssessedRows(sum(part.rows for part in parts), pa.concat_tables([part.candidates for part in parts]),
                            np.concatenate([part.passing for part in parts]),
                            {rule: np.concatenate([part.masks[rule] for part in parts]) for rule in parts[0].masks},
                            np.concatenate([part.hashes for part in parts]))


def row_groups(split: str) -> list[tuple[str, int]]:
    """(shard, row group) of a raw split: the units of work handed to the workers."""
    return [(str(path), group) for path, file in raw_shards(split) for group in range(file.num_row_groups)]


def _worker_process(parent: int) -> None:
    """Set up a worker that dies with its parent: a prepare killed outright (SIGKILL, the OOM
    killer) must not leave workers behind that wait forever and hold its output pipes open."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def in_order(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items in order: in this process, or in `workers` processes with a bounded
    number of tasks in flight (memory stays flat however many rows there are)."""
    if workers == 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork")  # the workers inherit the imported modules
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_process,
                             initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare_dpo(params: Params, split: str, eval_qids: np.ndarray | None, folder: Path) -> dict:
    """A raw split -> DPO pairs in `folder`; returns its drop counts."""
    rules = DROP_RULES["dpo"]
    if eval_qids is None:  # the evaluation split itself
        rules = tuple(rule for rule in rules if rule != "qid_in_evaluation")
    drops = Drops(rules)
    writer = ShardWriter(folder, DPO_SCHEMA, params.fetch.shard_rows)
    seen = SeenPairs()
    assessor = PairAssessor(params, eval_qids)
    groups = row_groups(split)
    progress = rows_progress(split)
    for rows, pairs, passing, masks, hashes in in_order(assessor.assess_row_group, groups, num_workers(params)):
        progress.update(rows)
        if not rows:
            continue
        masks["duplicate_pair"] = seen.duplicates(hashes)  # needs every earlier row, so it is decided here
        keep = drops.keep(rows, masks)
        writer.write(pairs.filter(pa.array(keep[passing])))
    writer.close()
    progress.close()
    return drops.summary()


def num_workers(params: Params) -> int:
    """prepare.num_proc, or every core this process may use; more processes than cores only thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if (params.prepare.num_proc or 0) > cores:
        raise InvalidInput(f"prepare.num_proc = {params.prepare.num_proc}: this machine has {cores} cores for this "
                           f"process; expected at most {cores} (or no value, to use them all)")
    return params.prepare.num_proc or cores


def check_not_empty(metrics: dict) -> None:
    for name, counts in metrics.items():
        rows = counts.get("train", counts["kept"]) if name == "sft" else counts["kept"]
        if rows == 0 or (name == "sft" and counts["eval"] == 0):
            raise InvalidInput(
                f"prepare: no rows left for {name} (input {counts['input']} rows, dropped {counts['dropped']}); "
                "check data.source, fetch.max_rows and the prepare length limits in params.yaml"
            )
