"""The bad-input catalogue: every case ends in a clear error naming the file, row or key and
what was expected, or in a drop counted by reason with input rows = kept + dropped.

Cases tested elsewhere: missing column (test_fetch, test_prepare), null or empty question or
answers, chosen identical to rejected, evaluation qid in training (test_prepare), rows beyond
max_length (test_prepare), zero rows left after filtering (test_prepare), params with an
unknown key, a wrong type, beta/learning rate/LoRA r <= 0, batch size 0 (test_params).
"""

import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stack_dpo.dataset import RAW_SCHEMA
from stack_dpo.faults import NO_SPACE_EXIT
from stack_dpo.modeling import load_tokenizer
from stack_dpo.params import InvalidInput
from stages import fetch, prepare
from tests.conftest import REPO, inside, make_workspace, refused, subprocess_env, writable_copy

SAMPLE = REPO / "data/sample/stack-exchange-paired"


def mirror_with(tmp_path, split, change):
    """A copy of the sample with `change(table) -> table | None` applied to one split's shards
    (None removes the split's folder)."""
    mirror = tmp_path / "mirror"
    shutil.copytree(SAMPLE, mirror)
    folder = mirror / "data" / split
    table = change(pq.read_table(folder))
    shutil.rmtree(folder)
    if table is not None:
        folder.mkdir()
        pq.write_table(table, folder / "train-00000-of-00001.parquet")
    return make_workspace(tmp_path / "ws", {"data": {"source": str(mirror)}})


def fetch_error(ws) -> str:
    with inside(ws) as params, pytest.raises(InvalidInput) as err:
        fetch.run(params)
    assert not (ws / "data/raw").exists()  # nothing half-written
    return str(err.value)


def test_extra_columns_are_ignored(tmp_path):
    ws = mirror_with(tmp_path, "rl", lambda t: t.append_column("score", pa.array([1] * t.num_rows)))
    with inside(ws) as params:
        fetch.run(params)
    assert pq.read_table(ws / "data/raw/rl").column_names == RAW_SCHEMA.names


def test_wrong_column_type_is_named(tmp_path):
    ws = mirror_with(tmp_path, "rl", lambda t: t.set_column(0, "qid", t.column("qid").cast(pa.string())))
    assert "(data/rl): wrong column types: qid is Value('string'), expected Value('int64')" in fetch_error(ws)


def test_missing_split_directory_is_named(tmp_path):
    ws = mirror_with(tmp_path, "evaluation", lambda t: None)
    assert "split folder" in (message := fetch_error(ws)) and "data/evaluation does not exist" in message


def test_empty_split_is_refused(tmp_path):
    ws = mirror_with(tmp_path, "rl", lambda t: t.slice(0, 0))
    assert "(data/rl): the split has no rows" in fetch_error(ws)


def test_corrupt_parquet_names_the_file(tmp_path):
    ws = mirror_with(tmp_path, "finetune", lambda t: t)
    shard = next((tmp_path / "mirror/data/finetune").glob("*.parquet"))
    shard.write_bytes(b"PAR1 this is not parquet")
    message = fetch_error(ws)
    assert "cannot be read as parquet shards" in message and shard.name in message


def _raw_workspace(tmp_path):
    ws = make_workspace(tmp_path, {"prepare": {"max_prompt_length": 10_000, "max_length": 10_000}})
    with inside(ws) as params:
        fetch.run(params)
    return ws


def _rewrite_rl(ws, rows_or_table):
    shard = ws / "data/raw/rl/part-00000.parquet"
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else pa.Table.from_pylist(rows_or_table,
                                                                                              schema=RAW_SCHEMA)
    pq.write_table(table, shard)


def test_control_characters_duplicates_and_invalid_utf8_are_dropped_by_reason(tmp_path):
    ws = _raw_workspace(tmp_path)
    rows = pq.read_table(ws / "data/raw/rl").to_pylist()
    rows[0]["question"] += "\x00\x07"
    rows[1]["response_k"] = "bell \x1b[31m escape"
    rows[5] = dict(rows[4])  # the same pair twice
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    # a lone surrogate as it arrives from a bad encoder: bytes that are not UTF-8
    broken = table.column("response_j").combine_chunks().view(pa.binary()).to_pylist()
    broken[2] = b"half a character \xed\xa0\x80 here"
    table = table.set_column(4, "response_j", pa.array(broken, pa.binary()).view(pa.string()))
    _rewrite_rl(ws, table)
    with inside(ws) as params:
        counts = prepare.run(params)["dpo/train"]
    dropped = counts["dropped"]
    assert (dropped["control_characters"], dropped["duplicate_pair"], dropped["invalid_utf8"]) == (2, 1, 1)
    assert counts["input"] == len(rows) == counts["kept"] + sum(dropped.values())
    kept = pq.read_table(ws / "data/processed/dpo/train")
    kept.validate(full=True)  # every kept text is valid UTF-8
    assert not any("\x00" in q for q in kept.column("prompt").to_pylist())


def test_base_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(InvalidInput, match=r"model.name_or_path = 'data/sample/no-such-model': no such folder"):
        load_tokenizer("data/sample/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="the folder has no config.json"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_without_pad_token_pads_with_eos():
    tokenizer = load_tokenizer(REPO / "data/sample/tiny-llama")  # like Llama-2, it ships no pad token
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_a_run_that_asks_for_a_gpu_on_a_machine_without_one_is_a_clear_error(workspace, monkeypatch):
    from stack_dpo.machine import check_machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine, GPU hosts too
    with inside(workspace) as params:
        on_gpu = params.model_copy(update={"launch": params.launch.model_copy(update={"device": "cuda"})})
        check_machine(params)  # launch.device: auto runs here
        with pytest.raises(InvalidInput, match=r"launch.device = 'cuda': this machine has no CUDA GPU .* set "
                                               "launch.device: auto to run on the CPU"):
            check_machine(on_gpu)


def test_more_processes_than_devices_is_refused_before_any_work(tmp_path):
    ws = make_workspace(tmp_path, {"launch": {"num_processes": 512}})
    result = subprocess.run([sys.executable, "-m", "stages.sft"], cwd=ws, env=subprocess_env(), capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "launch.num_processes = 512: this machine has" in result.stderr and "at most one process per device" \
        in result.stderr
    assert not (ws / "checkpoints").exists()


def test_reference_log_probs_that_do_not_match_the_pairs_are_refused(trained, tmp_path):
    ws = tmp_path / "ws"
    writable_copy(trained, ws, checkpoints=False)
    shard = ws / "data/processed/reference/eval/part-00000.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 5), shard)  # a stale reference of other pairs
    from stack_dpo import pairs

    with inside(ws) as params, pytest.raises(InvalidInput, match=r"reference/eval: 5 rows for the \d+ pairs they "
                                                                    r"were computed for; rerun the reference"):
        pairs.with_stored_reference(pairs.load_pairs(params))


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_refused_run_leaves_the_checkpoints_as_they_were(trained, tmp_path, monkeypatch, stage):
    from stages import dpo, sft

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine: a GPU run is refused
    ws = tmp_path / "ws"
    writable_copy(trained, ws)

    def snapshot():
        return {p: p.read_bytes() for p in sorted((ws / "checkpoints").rglob("*")) if p.is_file()}

    before = snapshot()
    assert any(f"checkpoints/{stage}/checkpoint-" in str(p) for p in before)
    with inside(ws) as params:
        on_gpu = params.model_copy(update={"launch": params.launch.model_copy(update={"device": "cuda"}),
                                           "model": params.model.model_copy(update={"quantization": "4bit"})})
        with pytest.raises(InvalidInput, match="launch.device = 'cuda': this machine has no CUDA GPU"):
            {"sft": sft, "dpo": dpo}[stage].run(on_gpu)
    assert snapshot() == before


def _mirror_with_second_shard(tmp_path, split, second):
    """The sample with one split cut into two shards, the second changed by `second(table)`."""
    ws = mirror_with(tmp_path, split, lambda table: table)
    folder = tmp_path / "mirror/data" / split
    table = pq.read_table(folder)
    half = table.num_rows // 2
    shutil.rmtree(folder)
    folder.mkdir()
    pq.write_table(table.slice(0, half), folder / "train-00000-of-00002.parquet")
    pq.write_table(second(table.slice(half)), folder / "train-00001-of-00002.parquet")
    return ws, folder / "train-00001-of-00002.parquet", table.num_rows


def test_a_column_missing_from_a_later_shard_names_the_file_and_column(tmp_path):
    ws, shard, _ = _mirror_with_second_shard(tmp_path, "rl", lambda t: t.drop_columns(["response_k"]))
    message = fetch_error(ws)
    assert f"{shard}: missing columns ['response_k']" in message


@pytest.mark.parametrize("streaming", [True, False])
def test_a_shard_of_zero_rows_adds_nothing(tmp_path, streaming):
    ws, shard, rows = _mirror_with_second_shard(tmp_path, "rl", lambda t: t.slice(0, 0))
    with inside(ws) as params:
        uncapped = params.fetch.max_rows.model_copy(update={"rl": None})
        fetched = params.model_copy(update={"fetch": params.fetch.model_copy(
            update={"streaming": streaming, "max_rows": uncapped})})
        try:
            metrics = fetch.run(fetched)
        except InvalidInput as exc:
            pytest.fail(f"a shard of zero rows was refused instead of adding nothing: {exc}")
    assert metrics["rows"]["rl"] == rows // 2 == pq.read_table(ws / "data/raw/rl").num_rows


def test_invisible_texts_whitespace_only_differences_and_missing_qids_are_dropped_by_reason(tmp_path):
    ws = _raw_workspace(tmp_path)
    rows = pq.read_table(ws / "data/raw/rl").to_pylist()
    rows[0]["question"] = "\ufeff\u200b \u200d"  # a byte-order mark and zero-width characters only
    rows[1]["response_j"] = "\u2060\u00a0\n"
    rows[2]["response_k"] = "  " + rows[2]["response_j"].replace(" ", " \t ") + "\n"  # the same words
    rows[3]["qid"] = None
    _rewrite_rl(ws, rows)
    with inside(ws) as params:
        counts = prepare.run(params)["dpo/train"]
    dropped = counts["dropped"]
    assert (dropped["empty_question"], dropped["empty_response_j"], dropped["chosen_equals_rejected"],
            dropped["missing_qid"]) == (1, 1, 1, 1)
    assert counts["input"] == len(rows) == counts["kept"] + sum(dropped.values())
    kept = pq.read_table(ws / "data/processed/dpo/train").to_pylist()
    assert not any(pair["chosen"] == rows[1]["response_j"] or pair["rejected"] == rows[2]["response_k"]
                   for pair in kept)


def test_an_sft_text_over_the_token_limit_is_dropped_by_reason(tmp_path):
    ws = _raw_workspace(tmp_path)
    shard = next((ws / "data/raw/finetune").glob("*.parquet"))
    rows = pq.read_table(shard).to_pylist()
    rows[0]["response_j"] = "word " * 200_000  # one huge answer would be most of the SFT tokens
    rows[1]["response_j"] = "word " * 1500  # over a limit of 1,000 tokens, within 10,000
    pq.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), shard)
    with inside(ws) as params:
        counts = prepare.run(params)["sft"]
        assert counts["dropped"]["text_too_long"] == 1  # the default limit: prepare.max_length (10,000 here)
        limited = params.model_copy(update={"prepare": params.prepare.model_copy(update={"max_sft_length": 1000})})
        counts = prepare.run(limited)["sft"]
    assert counts["dropped"]["text_too_long"] == 2
    assert counts["input"] == counts["kept"] + sum(counts["dropped"].values())
    texts = pq.read_table(ws / "data/processed/sft").column("text").to_pylist()
    assert max(len(text) for text in texts) < len(rows[1]["response_j"])


def test_a_tokenizer_without_eos_is_refused_before_prepare_starts_workers(tmp_path):
    model = tmp_path / "no-eos"
    shutil.copytree(REPO / "data/sample/tiny-llama", model)
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"eos_token": "</s>"', '"eos_token": null'))
    assert load_tokenizer(REPO / "data/sample/tiny-llama").eos_token == "</s>"
    ws = _raw_workspace(tmp_path / "ws")
    with inside(ws) as params:
        other = params.model_copy(update={"model": params.model.model_copy(update={"name_or_path": str(model)})})
        with refused(InvalidInput, match="its tokenizer has no EOS token"):
            prepare.run(other)
    assert not (ws / "data/processed").exists()


def test_an_unknown_lora_target_is_refused_before_sft_touches_its_checkpoints(trained, tmp_path):
    from stages import sft

    ws = tmp_path / "ws"
    writable_copy(trained, ws)

    def snapshot():
        return {p: p.read_bytes() for folder in ("checkpoints", "models", "metrics")
                for p in sorted((ws / folder).rglob("*")) if p.is_file()}

    before = snapshot()
    for targets in (["q_proj", "v_prj"], ["v_prj"]):  # next to a known one PEFT would skip it silently
        with inside(ws) as params:
            lora = params.sft.lora.model_copy(update={"target_modules": targets})
            bad = params.model_copy(update={"sft": params.sft.model_copy(update={"lora": lora})})
            with pytest.raises(InvalidInput, match=r"sft.lora.target_modules: \['v_prj'\] name no module .* 'v_proj'"):
                sft.run(bad)
    assert snapshot() == before


@pytest.mark.parametrize("stage, where", [("fetch", "data/.raw.tmp-"), ("prepare", "metrics/.prepare.json.tmp-")])
def test_a_full_disk_is_reported_as_such_and_retryable(tmp_path, stage, where):
    ws = _raw_workspace(tmp_path) if stage == "prepare" else make_workspace(tmp_path)
    (ws / "metrics").mkdir(exist_ok=True)
    (ws / f"metrics/{stage}.json").write_text('{"from": "an earlier run"}')  # beside that run's outputs
    hook = REPO / "tests/killpoint"  # its sitecustomize fails writes under `where` with ENOSPC
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=ws, capture_output=True, text=True,
                          env=subprocess_env(PYTHONPATH=f"{hook}:{REPO}", STACK_DPO_KILL_POINT=f"no-space:{where}"))
    assert done.returncode == NO_SPACE_EXIT, done.stderr  # not invalid input (2): retried once space is freed
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("stack-dpo: out of disk space, retry when freed: no space left on the device writing ")
    assert where in last and "GiB free there" in last and "Traceback" not in done.stderr
    if stage == "fetch":  # the disk filled before data/raw landed: the earlier run's metrics stay with it
        assert not (ws / "data/raw").exists()
        assert (ws / "metrics/fetch.json").read_text() == '{"from": "an earlier run"}'
    else:  # the new outputs landed, their metrics did not: no metrics (dvc reruns), never the old ones
        assert (ws / "data/processed/dpo/train").is_dir() and not (ws / "metrics/prepare.json").exists()


def test_a_hub_dataset_that_cannot_be_reached_is_retried_then_transient_not_invalid(tmp_path, monkeypatch):
    from stack_dpo import fetch as fetching
    from stack_dpo.faults import TransientError

    attempts = []

    def unreachable(*args, **kwargs):  # what datasets raises when the Hub does not answer
        attempts.append(args[0])
        raise ConnectionError("Couldn't reach 'someone/stack-exchange-paired' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(fetching, "load_dataset", unreachable)
    monkeypatch.setenv("STACK_DPO_RETRY_DELAYS_S", "0,0")
    ws = make_workspace(tmp_path, {"data": {"source": "someone/stack-exchange-paired"}})
    with inside(ws) as params, pytest.raises(TransientError, match=r"Couldn't reach .* \(after 3 attempts\)"):
        fetch.run(params)
    assert attempts == ["someone/stack-exchange-paired"] * 3 and not (ws / "data/raw").exists()
