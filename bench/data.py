"""Data at dataset scale: fetch + prepare of the project against the seed recipe's data path
(`load_dataset` of the whole split, `datasets.map` of its mapping, its character-length filter),
on synthetic rows in the exact schema of lvwerra/stack-exchange-paired, read from a local
mirror laid out like the Hub repo.

    python -m bench.data                      # 100k and 1M rows (about 20 GB of disk under --workdir)
    python -m bench.data --rows 20000 100000  # a quicker look

Prints rows per second, peak memory of the whole process tree and rows kept for each, and the
goals: peak memory flat in the row count (1M within 1.2x of 100k), 2 processes >= 1.7x one, and
20k rows capped from the largest source <= 1.5x the cost of a 20k-row source.
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

from bench.measure import GIB, REPO, machine, run, table, verdict
from stages.fetch import SCHEMA

SAMPLE = REPO / "data/sample/stack-exchange-paired/data"
SHARD_ROWS = 50_000
SMALL_SPLIT_ROWS = 2_000  # finetune and evaluation: the benchmark's volume is in rl, as in the real data
RECIPE_LIMITS = {"max_prompt_length": 512, "max_length": 1024}


def corpora() -> tuple[str, list[str]]:
    """Running text and code blocks taken from the bundled sample (markdown, code, six sites)."""
    texts = []
    for path in sorted(SAMPLE.rglob("*.parquet")):
        table_ = pq.read_table(path, columns=["question", "response_j", "response_k"])
        for column in table_.columns:
            texts += column.to_pylist()
    text = "\n\n".join(texts)
    code = re.findall(r"```.*?```", text, flags=re.S) or ["```python\nprint('hello')\n```"]
    return text, code


def synthetic_rows(rows: int, rng: np.random.Generator, text: str, code: list[str], first_qid: int) -> pa.Table:
    """Rows with questions and answers of 0.5 to 5 kB (log-uniform), half with a code block,
    1 to 3 answer pairs per question."""
    def documents(n: int) -> list[str]:
        lengths = np.exp(rng.uniform(np.log(500), np.log(5000), n)).astype(int)
        starts = rng.integers(0, len(text) - 5000, n)
        blocks = rng.integers(0, len(code), n)
        with_code = rng.random(n) < 0.5
        return [text[s:s + n_] + (f"\n\n{code[b]}\n" if c else "")
                for s, n_, b, c in zip(starts, lengths, blocks, with_code)]

    pairs_per_question = rng.integers(1, 4, rows)
    qid_of_row = np.repeat(np.arange(rows), pairs_per_question)[:rows] + first_qid
    questions = documents(rows)
    question_of_row = [questions[q - first_qid] for q in qid_of_row]
    return pa.table({
        "qid": qid_of_row.astype(np.int64),
        "question": question_of_row,
        "date": ["2023/01/01"] * rows,
        "metadata": [[f"https://stackoverflow.com/questions/{q}"] for q in qid_of_row],
        "response_j": documents(rows),
        "response_k": documents(rows),
    }, schema=SCHEMA)


def make_mirror(root: Path, rows: int, seed: int = 0) -> Path:
    """A folder laid out like the Hub dataset repo with `rows` rows in data/rl."""
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng, (text, code) = np.random.default_rng(seed), corpora()
    splits = {"rl": rows, "finetune": SMALL_SPLIT_ROWS, "evaluation": SMALL_SPLIT_ROWS}
    qid = 0
    for split, count in splits.items():
        shards = max(1, -(-count // SHARD_ROWS))
        (root / "data" / split).mkdir(parents=True)
        for shard in range(shards):
            n = min(SHARD_ROWS, count - shard * SHARD_ROWS)
            pq.write_table(synthetic_rows(n, rng, text, code, qid),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cap", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work")
    args = parser.parse_args()
    sizes = sorted(args.rows)
    mirrors = {n: make_mirror(args.workdir / f"mirror-{n}", n) for n in sorted({*sizes, args.cap})}
    results, rows_out = {}, []
    for n in sizes:
        for who, procs in (("project", 1), ("project", 2), ("seed", 1), ("seed", 2)):
            if n != sizes[0] and procs == 1:
                continue  # one-process runs at the smallest size only: the scaling figure
            runner = run_project if who == "project" else run_seed
            r = runner(args.workdir / f"{who}-{n}-{procs}", mirrors[n], procs)
            results[who, n, procs] = r
            rows_out.append([who, f"{n:,}", procs, r["input"] / r["seconds"], r["seconds"], r["peak_rss"] / GIB,
                             r["kept"], f"{r['kept'] / r['input']:.1%}"])
            print(f"{who} {n:,} rows, {procs} proc: {r}", flush=True)
    capped = run_project(args.workdir / "capped", mirrors[sizes[-1]], 2, rl_cap=args.cap)
    small = run_project(args.workdir / "small", mirrors[args.cap], 2)
    print(f"\n## fetch + prepare of the rl split ({machine()})\n")
    print("Project: fetch (streamed, capped) + prepare (token-exact filter, recipe limits 512/1024 tokens of the "
          "tiny tokenizer). Seed: load_dataset + map + character filter (1024 characters).\n")
    print(table(["pipeline", "rows", "processes", "rows/s", "seconds", "peak RSS GiB", "kept", "kept share"],
                rows_out))
    print(f"\nproject drops at {sizes[-1]:,} rows: {results['project', sizes[-1], 2]['dropped']}")
    print(f"\n{args.cap:,} rl rows: capped from {sizes[-1]:,} rows {capped['seconds']:.1f} s, "
          f"from a {args.cap:,}-row source {small['seconds']:.1f} s")
    print("\n## goals\n")
    flat = results["project", sizes[-1], 2]["peak_rss"] / results["project", sizes[0], 2]["peak_rss"]
    print(verdict(f"peak RSS {sizes[-1]:,} / {sizes[0]:,} rows", flat, "<= 1.2", flat <= 1.2))
    speedup = results["project", sizes[0], 1]["seconds"] / results["project", sizes[0], 2]["seconds"]
    print(verdict(f"throughput 2 processes / 1 ({sizes[0]:,} rows)", speedup, ">= 1.7", speedup >= 1.7))
    cap_cost = capped["seconds"] / small["seconds"]
    print(verdict(f"cost of {args.cap:,} rows capped from {sizes[-1]:,} / from {args.cap:,}", cap_cost, "<= 1.5",
                  cap_cost <= 1.5))
    ours, seed = results["project", sizes[-1], 2], results["seed", sizes[-1], 2]
    print(f"- rows/s at {sizes[-1]:,} rows, 2 processes: project {ours['input'] / ours['seconds']:,.0f}, "
          f"seed {seed['input'] / seed['seconds']:,.0f} (ratio {seed['seconds'] / ours['seconds']:.2f}x)")


if __name__ == "__main__":
    main()
