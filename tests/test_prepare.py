import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from stack_dpo.dataset import RAW_SCHEMA, format_prompts, generation_prompt
from stack_dpo.entrypoint import WhitespaceBoundaryWarning
from stack_dpo.modeling import load_tokenizer, pair_token_ids
from stages import fetch, prepare
from tests.conftest import REPO, inside, make_workspace

NO_LIMITS = {"prepare": {"max_prompt_length": 10_000, "max_length": 10_000}}


def return_prompt_and_responses(samples):
    """The seed's mapping, verbatim (with the blog's lost backslashes restored)."""
    return {
        "prompt": ["Question: " + question + "\n\nAnswer: " for question in samples["question"]],
        "chosen": samples["response_j"],
        "rejected": samples["response_k"],
    }


def run_prepare(ws):
    with inside(ws) as params:
        fetch.run(params)
        return params, prepare.run(params)


def test_dpo_pairs_match_the_seed_mapping_exactly(tmp_path):
    ws = make_workspace(tmp_path, NO_LIMITS)
    run_prepare(ws)
    for split, out in (("rl", "train"), ("evaluation", "eval")):
        raw = Dataset(pq.read_table(ws / "data/raw" / split))
        seed = raw.map(return_prompt_and_responses, batched=True, remove_columns=raw.column_names)
        ours = pq.read_table(ws / "data/processed/dpo" / out)
        assert ours.column_names == ["prompt", "chosen", "rejected"]
        assert ours.to_pylist() == seed.to_list(), split


def test_sft_text_is_prompt_plus_preferred_answer(tmp_path):
    ws = make_workspace(tmp_path, NO_LIMITS)
    _, metrics = run_prepare(ws)
    raw = pq.read_table(ws / "data/raw/finetune").to_pylist()
    expected = sorted("Question: " + r["question"] + "\n\nAnswer: " + r["response_j"] for r in raw)
    train = pq.read_table(ws / "data/processed/sft/train").column("text").to_pylist()
    evaluation = pq.read_table(ws / "data/processed/sft/eval").column("text").to_pylist()
    assert sorted(train + evaluation) == expected
    assert set(train).isdisjoint(evaluation)  # split by question, so no text is in both
    assert metrics["sft"]["train"] == len(train) and metrics["sft"]["eval"] == len(evaluation) > 0


def test_length_filters_count_tokens_like_the_trainer_and_count_drops(tmp_path):
    # limits inside the sample's length range, so every filter drops some pairs
    ws = make_workspace(tmp_path, {"fetch": {"max_rows": {"rl": None}},
                                   "prepare": {"max_prompt_length": 95, "max_length": 220}})
    params, metrics = run_prepare(ws)
    tokenizer = load_tokenizer(params.model.name_or_path)
    raw = pq.read_table(ws / "data/raw/rl").to_pylist()
    expected = []
    for row in raw:
        prompt = "Question: " + row["question"] + "\n\nAnswer: "
        p, c = pair_token_ids(tokenizer, prompt, row["response_j"])
        _, r = pair_token_ids(tokenizer, prompt, row["response_k"])
        prompt_tokens = len(tokenizer(prompt)["input_ids"])  # the prompt alone, as it is given at inference
        if (prompt_tokens <= params.prepare.max_prompt_length and len(p) + len(c) <= params.prepare.max_length
                and len(p) + len(r) <= params.prepare.max_length):
            expected.append(prompt + row["response_j"])
    kept = pq.read_table(ws / "data/processed/dpo/train")
    assert [p + c for p, c in zip(kept.column("prompt").to_pylist(), kept.column("chosen").to_pylist())] == expected
    counts = metrics["dpo/train"]
    assert counts["input"] == len(raw) == counts["kept"] + sum(counts["dropped"].values())
    assert counts["kept"] == len(expected) < len(raw)
    assert counts["dropped"]["prompt_too_long"] > 0 and counts["dropped"]["chosen_too_long"] > 0


def test_bad_rows_are_dropped_by_reason(tmp_path):
    ws = make_workspace(tmp_path, NO_LIMITS)
    with inside(ws) as params:
        fetch.run(params)
    rl = ws / "data/raw/rl/part-00000.parquet"
    rows = pq.read_table(rl).to_pylist()
    eval_qid = pq.read_table(ws / "data/raw/evaluation").column("qid")[0].as_py()
    rows[0]["question"] = "   "
    rows[1]["response_j"] = None
    rows[2]["response_k"] = rows[2]["response_j"]
    rows[3]["qid"] = eval_qid
    rows[4]["response_k"] = ""
    rows[5]["response_k"] = rows[5]["response_k"] + " word" * 20_000  # far beyond max_length in tokens
    pq.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), rl)
    with inside(ws) as params:
        metrics = prepare.run(params)
    dropped = metrics["dpo/train"]["dropped"]
    assert (dropped["empty_question"], dropped["empty_response_j"], dropped["chosen_equals_rejected"],
            dropped["qid_in_evaluation"], dropped["empty_response_k"], dropped["rejected_too_long"]) == (1,) * 6
    assert sum(dropped.values()) == 6 and metrics["dpo/train"]["kept"] == len(rows) - 6
    kept = pq.read_table(ws / "data/processed/dpo/train").to_pylist()
    assert all(pair["rejected"] != rows[i]["response_k"] for pair in kept for i in (4, 5))


def test_trl_itself_never_truncates_a_kept_pair_and_no_dropped_pair_would_fit(tmp_path):
    """An oracle independent of the project's own token accounting: TRL's DPOTrainer tokenizes
    the kept pairs and the pairs dropped for length, and its token counts decide."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    ws = make_workspace(tmp_path, {"fetch": {"max_rows": {"rl": None}},
                                   "prepare": {"max_prompt_length": 95, "max_length": 220}})
    params, metrics = run_prepare(ws)
    kept = pq.read_table(ws / "data/processed/dpo/train").to_pylist()
    kept_texts = {(r["prompt"], r["chosen"], r["rejected"]) for r in kept}
    raw = Dataset(pq.read_table(ws / "data/raw/rl"))
    mapped = raw.map(return_prompt_and_responses, batched=True, remove_columns=raw.column_names)
    dropped = [row for row in mapped if (row["prompt"], row["chosen"], row["rejected"]) not in kept_texts]
    too_long = sum(metrics["dpo/train"]["dropped"][r] for r in ("prompt_too_long", "chosen_too_long",
                                                                 "rejected_too_long"))
    assert len(dropped) == too_long > 0  # every raw pair not kept was dropped for its length here
    tokenizer = load_tokenizer(params.model.name_or_path)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(params.model.name_or_path),
        args=DPOConfig(output_dir=str(tmp_path / "out"), max_length=None, report_to="none", use_cpu=True),
        train_dataset=Dataset.from_list(kept), eval_dataset=Dataset.from_list(dropped), processing_class=tokenizer)

    def lengths(row):  # what DPOTrainer feeds the model: prompt, and prompt + answer + EOS
        return len(row["prompt_ids"]), max(len(row["prompt_ids"]) + len(row[k]) for k in ("chosen_ids",
                                                                                         "rejected_ids"))

    limit_prompt, limit = params.prepare.max_prompt_length, params.prepare.max_length
    assert all(p <= limit_prompt and n <= limit for p, n in map(lengths, trainer.train_dataset))
    for row, original in zip(trainer.eval_dataset, dropped):
        prompt_alone = len(tokenizer(original["prompt"])["input_ids"])  # the prompt as given at inference
        assert prompt_alone > limit_prompt or lengths(row)[1] > limit
    # generation starts from exactly the prompt tokens TRL trains on (the recipe's closing space
    # joins the answer's first token, so the model never sees it alone)
    for row, original in zip(trainer.train_dataset, kept):
        assert tokenizer(generation_prompt(original["prompt"]))["input_ids"] == row["prompt_ids"]
        assert tokenizer(original["prompt"])["input_ids"] != row["prompt_ids"]


@pytest.mark.parametrize(("left_out", "shown"), [(" ", False), ("\n ", False), ("Answer: ", True), ("it's", True)])
def test_trls_prompt_boundary_warning_is_dropped_only_for_whitespace(left_out, shown):
    message = ("The tokenized prompt is not a prefix of the tokenized prompt+completion, ... this end of the prompt "
               f"is left out of the training sequence: {left_out!r}. The model is trained on a context ...")
    record = logging.LogRecord("trl.trainer.dpo_trainer", logging.WARNING, __file__, 0, message, None, None)
    assert WhitespaceBoundaryWarning().filter(record) is shown


def test_the_tokenization_check_does_not_warn_about_texts_beyond_the_models_context(caplog):
    """prepare tokenizes only to count; transformers' "will result in indexing errors" would be false."""
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(REPO / "data/sample/tiny-llama")  # a fresh instance: it warns once per instance
    long_question = "Why? " * (2 * tokenizer.model_max_length)
    hf_logging.enable_propagation()  # so that caplog sees transformers' records
    try:
        prepare.check_tokenization(tokenizer, format_prompts([long_question]), ["Because."])
    finally:
        hf_logging.disable_propagation()
    assert not [r for r in caplog.records if "sequence length is longer" in r.getMessage()]


def test_missing_column_names_the_file(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path)
    with inside(ws) as params:
        fetch.run(params)
    shard = ws / "data/raw/rl/part-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["response_j"]), shard)
    expected = r"rl/part-00000.parquet: missing columns \['response_j'\]"
    monkeypatch.setattr(prepare, "prepare_sft", lambda *args: pytest.fail("SFT work began before the checks"))
    with inside(ws) as params, pytest.raises(ValueError, match=expected):
        prepare.run(params)
    assert not (ws / "data/processed").exists()  # refused before any output was started


def test_empty_result_fails_clearly_and_writes_nothing(tmp_path):
    ws = make_workspace(tmp_path, {"prepare": {"max_prompt_length": 5}})
    with inside(ws) as params:
        fetch.run(params)
        with pytest.raises(ValueError, match=r"no rows left for dpo/train .*'prompt_too_long': 160"):
            prepare.run(params)
    assert list((ws / "data/processed").iterdir()) == []
    assert not (ws / "metrics/prepare.json").exists()


def test_workers_and_batch_size_do_not_change_the_output(tmp_path):
    """Pairs spread over worker processes in small batches (duplicates then span batches) give
    the same rows, in the same order, and the same drop counts as one process."""
    results = []
    for num_proc, batch_rows in ((1, 10_000), (2, 7)):
        ws = make_workspace(tmp_path / str(num_proc), {"prepare": {"num_proc": num_proc, "batch_rows": batch_rows}})
        with inside(ws) as params:
            fetch.run(params)
        rl = ws / "data/raw/rl/part-00000.parquet"
        rows = pq.read_table(rl).to_pylist()
        pq.write_table(pa.Table.from_pylist(rows + rows[:20], schema=RAW_SCHEMA), rl)  # 20 repeated pairs
        with inside(ws) as params:
            metrics = prepare.run(params)
        tables = {split: pq.read_table(ws / "data/processed/dpo" / split) for split in ("train", "eval")}
        results.append((metrics, tables))
    (one, one_tables), (two, two_tables) = results
    assert one == two and one["dpo/train"]["dropped"]["duplicate_pair"] >= 20
    assert all(one_tables[split].equals(two_tables[split]) for split in one_tables)


def test_workers_of_a_killed_prepare_do_not_outlive_it(tmp_path):
    """SIGKILL of prepare while its worker processes run (as the OOM killer would): the workers
    die with it instead of waiting forever with the stage's output pipes open."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import subprocess_env

    ws = make_workspace(tmp_path, {"prepare": {"num_proc": 2}})
    with inside(ws) as params:
        fetch.run(params)
    proc = subprocess.Popen([sys.executable, "-m", "stages.prepare"], cwd=ws, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (workers := psutil.Process(proc.pid).children()):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare never started its workers"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], alive
