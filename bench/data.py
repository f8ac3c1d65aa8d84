"""Data at dataset scale: fetch + prepare of the project against the seed recipe's data path
(`load_dataset` of the whole split, `datasets.map` of its mapping, its character-length filter),
on synthetic rows in the exact schema of lvwerra/stack-exchange-paired, read from a local
mirror laid out like the Hub repo.

    python -m bench.data                       # 20k and 80k rows, 3 interleaved repeats (about 15 min)
    python -m bench.data --rows 100000 1000000 --repeats 3   # dataset scale (hours, 10 GB of disk)

Texts are cut from the bundled sample's markdown (code blocks included) with the real dataset's
lengths, roughly (log-normal, no floor: questions about 1 kB and answers about 1.6 kB on
average, a tail of short ones). Token counts are the tiny model's tokenizer's (a BPE of about 2k
tokens trained on the sample; the printout gives its characters per token), which stands in
for the real model's here.

Prints rows per second, peak memory of the whole process tree and rows kept for each, and the
goals: peak memory flat in the row count (the largest size within 1.2x of the smallest), 2
processes >= 1.7x one, and `--cap` rows capped from the largest source <= 1.5x the cost of a
`--cap`-row source. Every figure is the median (range) of `--repeats` runs, interleaved, after
one warm-up round at the smallest size.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from bench.measure import GIB, REPO, header, interleaved, ratio_spread, run, spread, table
from stack_dpo.dataset import RAW_SCHEMA as SCHEMA

SAMPLE = REPO / "data/sample/stack-exchange-paired/data"
SHARD_ROWS = 50_000
SMALL_SPLIT_ROWS = 2_000  # finetune and evaluation: the benchmark's volume is in rl, as in the real data
RECIPE_LIMITS = {"max_prompt_length": 512, "max_length": 1024}


def corpus() -> str:
    """Running text taken from the bundled sample: markdown with code blocks, six sites."""
    texts = []
    for path in sorted(SAMPLE.rglob("*.parquet")):
        table_ = pq.read_table(path, columns=["question", "response_j", "response_k"])
        for column in table_.columns:
            texts += column.to_pylist()
    return "\n\n".join(texts)


# Character lengths of the real dataset's texts, roughly: questions about 1 kB and answers about
# 1.6 kB on average, most shorter than the mean, a tail of short ones and a few very long ones.
# Log-normal with sigma 0.8 (mean = median x 1.38); no floor.
MEDIAN_CHARS = {"question": 730, "answer": 1160}
SIGMA = 0.8
MAX_CHARS = 20_000


def synthetic_rows(rows: int, rng: np.random.Generator, text: str, first_qid: int) -> pa.Table:
    """Rows with log-normal text lengths (MEDIAN_CHARS, SIGMA) cut from `text` at random places,
    1 to 3 answer pairs per question."""
    def documents(n: int, median: int) -> list[str]:
        lengths = np.minimum(rng.lognormal(np.log(median), SIGMA, n), MAX_CHARS).astype(int) + 1
        starts = rng.integers(0, len(text) - MAX_CHARS, n)
        return [text[start:start + length] for start, length in zip(starts, lengths)]

    pairs_per_question = rng.integers(1, 4, rows)
    qid_of_row = np.repeat(np.arange(rows), pairs_per_question)[:rows] + first_qid
    questions = documents(rows, MEDIAN_CHARS["question"])
    question_of_row = [questions[q - first_qid] for q in qid_of_row]
    return pa.table({
        "qid": qid_of_row.astype(np.int64),
        "question": question_of_row,
        "date": ["2023/01/01"] * rows,
        "metadata": [[f"https://stackoverflow.com/questions/{q}"] for q in qid_of_row],
        "response_j": documents(rows, MEDIAN_CHARS["answer"]),
        "response_k": documents(rows, MEDIAN_CHARS["answer"]),
    }, schema=SCHEMA)


def make_mirror(root: Path, rows: int, seed: int = 0) -> Path:
    """A folder laid out like the Hub dataset repo with `rows` rows in data/rl."""
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng, text = np.random.default_rng(seed), corpus()
    splits = {"rl": rows, "finetune": SMALL_SPLIT_ROWS, "evaluation": SMALL_SPLIT_ROWS}
    qid = 0
    for split, count in splits.items():
        shards = max(1, -(-count // SHARD_ROWS))
        (root / "data" / split).mkdir(parents=True)
        for shard in range(shards):
            n = min(SHARD_ROWS, count - shard * SHARD_ROWS)
            pq.write_table(synthetic_rows(n, rng, text, qid),
                           root / "data" / split / f"train-{shard:05d}-of-{shards:05d}.parquet")
            qid += n
    done.touch()
    return root


def project_workspace(root: Path, mirror: Path, num_proc: int, rl_cap: int | None = None) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(mirror)
    params["model"]["name_or_path"] = str(REPO / "data/sample/tiny-llama")
    params["fetch"]["max_rows"] = {"finetune": None, "rl": rl_cap, "evaluation": None}
    params["prepare"].update(RECIPE_LIMITS, num_proc=num_proc)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_project(root: Path, mirror: Path, num_proc: int, rl_cap: int | None = None) -> dict:
    ws = project_workspace(root, mirror, num_proc, rl_cap)
    fetch = run([sys.executable, "-m", "stages.fetch"], ws)
    prepare = run([sys.executable, "-m", "stages.prepare"], ws)
    metrics = yaml.safe_load((ws / "metrics/prepare.json").read_text())
    result = {"seconds": fetch.seconds + prepare.seconds, "fetch_s": fetch.seconds, "prepare_s": prepare.seconds,
              "peak_rss": max(fetch.peak_rss, prepare.peak_rss), "input": metrics["dpo/train"]["input"],
              "kept": metrics["dpo/train"]["kept"], "dropped": metrics["dpo/train"]["dropped"]}
    shutil.rmtree(ws)
    return result


SEED = """
import sys
from datasets import load_dataset

def return_prompt_and_responses(samples):  # the seed's mapping
    return {
        "prompt": ["Question: " + question + "\\n\\nAnswer: " for question in samples["question"]],
        "chosen": samples["response_j"],
        "rejected": samples["response_k"],
    }

source, cache, num_proc, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dataset = load_dataset(source, data_dir="data/rl", split="train", cache_dir=cache)
original_columns = dataset.column_names
dataset = dataset.map(return_prompt_and_responses, batched=True, remove_columns=original_columns, num_proc=num_proc)
dataset = dataset.filter(  # the recipe's filter, in characters
    lambda x: len(x["prompt"]) + len(x["chosen"]) <= max_length and len(x["prompt"]) + len(x["rejected"]) <= max_length,
    num_proc=num_proc,
)
print("KEPT", len(dataset))
"""


def run_seed(root: Path, mirror: Path, num_proc: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    measured = run([sys.executable, "-c", SEED, str(mirror), str(root / "hf-cache"), str(num_proc),
                    str(RECIPE_LIMITS["max_length"])], root, env={"HF_DATASETS_CACHE": str(root / "hf-cache")})
    kept = int(re.search(r"KEPT (\d+)", measured.output).group(1))
    rows = pq.ParquetDataset(mirror / "data/rl").read(columns=["qid"]).num_rows
    shutil.rmtree(root)
    return {"seconds": measured.seconds, "peak_rss": measured.peak_rss, "input": rows, "kept": kept}


def chars_per_token(mirror: Path, rows: int = 2000) -> float:
    from transformers.utils import logging as hf_logging

    from stack_dpo.modeling import load_tokenizer

    hf_logging.set_verbosity_error()  # texts over the tiny model's 2048 positions are only counted here
    tokenizer = load_tokenizer(REPO / "data/sample/tiny-llama")
    table_ = pq.read_table(next((mirror / "data/rl").glob("*.parquet"))).slice(0, rows)
    texts = [t for column in ("question", "response_j", "response_k") for t in table_.column(column).to_pylist()]
    return sum(map(len, texts)) / sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[20_000, 80_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--cap", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work")
    args = parser.parse_args()
    small, large = sorted(args.rows)
    mirrors = {n: make_mirror(args.workdir / f"mirror-{n}", n) for n in sorted({small, large, args.cap})}
    work = args.workdir / "run"

    def setup(who: str, n: int, procs: int, cap: int | None = None):
        if who == "seed":
            return lambda: run_seed(work, mirrors[n], procs)
        return lambda: run_project(work, mirrors[n], procs, cap)

    # one process at the smallest size only: the scaling figure
    at_small = interleaved({f"{who} {procs}": setup(who, small, procs)
                            for who in ("project", "seed") for procs in (1, 2)}, args.repeats)
    at_large = interleaved({f"{who} 2": setup(who, large, 2) for who in ("project", "seed")}, args.repeats,
                           warmup=False)
    caps = interleaved({"capped": setup("project", large, 2, args.cap), "small": setup("project", args.cap, 2)},
                       args.repeats, warmup=False)
    for runs in (*at_small.values(), *at_large.values()):
        for r in runs:
            r["rows_per_s"] = r["input"] / r["seconds"]
    rows_out = []
    for n, results in ((small, at_small), (large, at_large)):
        for name, runs in results.items():
            who, procs = name.split()
            kept = runs[0]["kept"]
            rows_out.append([who, f"{n:,}", procs, spread(runs, "rows_per_s", digits=",.0f"), spread(runs, "seconds"),
                             spread(runs, "peak_rss", GIB), f"{kept:,}", f"{kept / runs[0]['input']:.1%}"])
    print(header(f"fetch + prepare of the rl split, median (range) of {args.repeats} interleaved runs",
                 f"python -m bench.data --rows {small} {large} --cap {args.cap} --repeats {args.repeats}"))
    print(f"Synthetic rows: questions {MEDIAN_CHARS['question']} and answers {MEDIAN_CHARS['answer']} characters "
          f"median (log-normal, sigma {SIGMA}); the tiny tokenizer reads {chars_per_token(mirrors[small]):.2f} "
          "characters per token of them. Project: fetch (streamed, capped) + prepare (token-exact filter, the "
          "recipe's limits 512/1024 tokens). Seed: load_dataset + map + character filter (1024 characters).\n")
    print(table(["pipeline", "rows", "processes", "rows/s", "seconds", "peak memory GiB", "kept", "kept share"],
                rows_out))
    print(f"\nproject drops at {large:,} rows: {at_large['project 2'][0]['dropped']}")
    print(f"\n{args.cap:,} rl rows: capped from {large:,} rows {spread(caps['capped'], 'seconds')} s, "
          f"from a {args.cap:,}-row source {spread(caps['small'], 'seconds')} s")
    print("\n## goals\n")
    flat, flat_text = ratio_spread(at_large["project 2"], at_small["project 2"], "peak_rss")
    print(f"- peak memory {large:,} / {small:,} rows: {flat_text} (goal <= 1.2): {'MET' if flat <= 1.2 else 'NOT MET'}")
    speedup, speedup_text = ratio_spread(at_small["project 2"], at_small["project 1"], "rows_per_s")
    print(f"- throughput 2 processes / 1 ({small:,} rows): {speedup_text} (goal >= 1.7): "
          f"{'MET' if speedup >= 1.7 else 'NOT MET'}")
    cap_cost, cap_text = ratio_spread(caps["capped"], caps["small"], "seconds")
    print(f"- cost of {args.cap:,} rows capped from {large:,} / from {args.cap:,}: {cap_text} (goal <= 1.5): "
          f"{'MET' if cap_cost <= 1.5 else 'NOT MET'}")
    ratio = ratio_spread(at_large["seed 2"], at_large["project 2"], "seconds")[1]
    print(f"- seconds at {large:,} rows, 2 processes, seed / project: {ratio}")


if __name__ == "__main__":
    main()
