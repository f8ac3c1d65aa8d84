"""The benchmarks' own pieces: synthetic data in the dataset's exact schema and layout, and the
pipeline reading it like the Hub dataset."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bench.data import make_mirror, project_workspace
from stack_dpo.dataset import RAW_SCHEMA
from stack_dpo.prepare import SeenPairs
from stages import fetch, prepare
from tests.conftest import REPO, inside, subprocess_env


def test_synthetic_mirror_has_the_schema_layout_and_lengths_of_the_dataset(tmp_path):
    mirror = make_mirror(tmp_path / "mirror", 3000)
    shards = sorted((mirror / "data/rl").glob("train-*-of-*.parquet"))
    table = pq.read_table(shards[0])
    assert table.schema == RAW_SCHEMA and sum(pq.read_metadata(p).num_rows for p in shards) == 3000
    for split in ("finetune", "evaluation"):
        assert list((mirror / "data" / split).glob("train-*.parquet"))
    # the real dataset's lengths, roughly: about 1 kB questions, 1.6 kB answers, a tail of short ones
    for column, mean in (("question", 1000), ("response_j", 1600), ("response_k", 1600)):
        lengths = pc.utf8_length(table.column(column)).to_numpy()
        assert 0.8 * mean <= lengths.mean() <= 1.2 * mean and np.median(lengths) < lengths.mean()
        assert (lengths < 250).mean() > 0.01 and lengths.max() > 4 * mean
    assert any("```" in text for text in table.column("response_j").to_pylist()[:50])
    pairs_per_question = np.unique(table.column("qid").to_numpy(), return_counts=True)[1]
    assert set(pairs_per_question) <= {1, 2, 3} and pairs_per_question.max() > 1
    ws = project_workspace(tmp_path / "ws", mirror, num_proc=1, rl_cap=500)
    with inside(ws) as params:
        assert fetch.run(params)["rows"]["rl"] == 500
        counts = prepare.run(params)["dpo/train"]
    assert counts["input"] == 500 == counts["kept"] + sum(counts["dropped"].values()) and counts["kept"] > 0


def test_seen_pairs_flags_repeats_within_and_across_batches():
    seen = SeenPairs()
    first = seen.duplicates(np.array([5, 3, 5, 9], dtype=np.uint64))
    second = seen.duplicates(np.array([9, 1, 1, 4], dtype=np.uint64))
    assert first.tolist() == [False, False, True, False]
    assert second.tolist() == [True, False, True, False]
    assert seen.sorted.tolist() == [1, 3, 4, 5, 9]


def test_gpu_benchmark_without_cuda_says_it_skipped_and_exits_0():
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")  # no CUDA, on any machine
    done = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SKIPPED: no CUDA device here") and "tokens/s" not in done.stdout


def test_the_benchmarks_memory_figure_is_the_peak_of_the_whole_process_tree(tmp_path):
    """bench.measure.run samples PSS now and then (sparingly: each sample costs CPU); a child's
    256 MiB held for 1.5 s beside its parent's 64 MiB must show in the peak."""
    from bench.measure import run

    child = "import time; block = b'x' * (256 << 20); time.sleep(1.5)"
    parent = ("import subprocess, sys; block = b'y' * (64 << 20); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    measured = run([sys.executable, "-c", parent], tmp_path)
    mib = measured.peak_rss / (1 << 20)
    assert 320 <= mib < 320 + 100, f"{mib:.0f} MiB"  # two interpreters add some tens of MiB


@pytest.mark.slow
def test_the_gpu_acceptance_run_runs_the_stages_on_the_tiny_model_without_a_gpu(tmp_path):
    """`python -m bench.gpu_check --tiny`: the acceptance run's own code, on the CPU (Liger and the
    24 GiB cap, GPU things, are left out there); on a GPU the same code runs the 7B shape."""
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny", "--workdir", str(tmp_path),
                             "--out", str(out)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert [name for name, run in runs.items() if isinstance(run, dict)] == ["sft", "reference", "dpo", "merge"]
    assert not [name for name, run in runs.items() if isinstance(run, dict) and ("failed" in run or "skipped" in run)]
    sft, dpo, merge = runs["sft"], runs["dpo"], runs["merge"]
    assert sft["steady_steps"] == 5 and sft["tokens_per_s"] > 0  # steps 4-8 of 8
    assert sft["metrics"]["fit"]["micro_batch"] * sft["metrics"]["fit"]["accumulation"] == 8
    assert dpo["steady_steps"] == 4 and dpo["examples_per_s"] > 0 and dpo["metrics"]["start_check"]["loss"] > 0
    assert merge["metrics"]["gap/pairs"] == 8 and merge["metrics"]["max_layer_diff"] <= 1e-4
    assert "| sft | 8 x 1 |" in result.stdout and "| merge |" in result.stdout
