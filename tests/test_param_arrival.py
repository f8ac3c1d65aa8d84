"""Every param of the training sections reaches what acts on it: each set to a value that is
neither its default nor the library's, then read back from TRL's configs and PEFT's config
(which params reach which stage's outputs: tests/test_layout.py against dvc.yaml)."""

from __future__ import annotations

import pytest

from stack_dpo.dpo import dpo_config
from stack_dpo.fit import Plan
from stack_dpo.modeling import lora_config
from stack_dpo.params import TrainingParams, flatten, validate
from stack_dpo.sft import sft_config
from tests.conftest import DEFAULT_PARAMS

# TrainingParams set here, the keys its schema has, each with a value no default has
TRAIN = {"learning_rate": 3.3e-4, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 7, "max_steps": 23,
         "per_device_train_batch_size": 3, "per_device_eval_batch_size": 5, "gradient_accumulation_steps": 2,
         "weight_decay": 0.03, "optim": "adafactor", "gradient_checkpointing": True, "use_liger_kernel": True,
         "logging_steps": 3, "eval_steps": 11, "save_steps": 13, "save_total_limit": 4, "seed": 1234}
FIT = Plan(micro_batch=3, accumulation=2, checkpointing=True, estimated_gib=1.0, budget_gib=2.0, budget="test")
# TrainingArguments' name for the schema's key where they differ (the fit decides the batch sizes)
CONFIG_NAME = {"gradient_checkpointing": "activation_checkpointing"}


def nondefault_params():
    raw = {**DEFAULT_PARAMS}
    raw["prepare"] = {**raw["prepare"], "max_length": 777}
    raw["reference"] = {"batch_size": 9}
    raw["model"] = {**raw["model"], "dtype": "bfloat16"}
    raw["sft"] = {**raw["sft"], "seq_length": 96, "packing": False, "packing_strategy": "bfd",
                  "lora": {"r": 6, "alpha": 12, "dropout": 0.15, "target_modules": ["q_proj", "o_proj"]},
                  "train": TRAIN}
    raw["dpo"] = {**raw["dpo"], "beta": 0.37, "group_by_length": False, "loss_type": ["sigmoid", "sft"],
                  "loss_weights": [0.7, 0.3], "train": {**TRAIN, "learning_rate": 4.4e-6, "seed": 99}}
    return validate(raw)


def test_the_training_schema_is_what_this_test_sets():
    assert set(TRAIN) | {"global_batch_size"} == set(TrainingParams.model_fields)  # a new key needs a check here


def check_training(config, train: dict) -> None:
    for key, value in train.items():
        assert getattr(config, CONFIG_NAME.get(key, key)) == value, key


def test_every_sft_param_arrives_in_sftconfig_and_the_lora_config(tmp_path):
    params = nondefault_params()
    config = sft_config(params, tmp_path, FIT)
    assert (config.max_length, config.packing, config.packing_strategy) == (96, False, "bfd")
    assert config.bf16 and config.output_dir == str(tmp_path)
    check_training(config, TRAIN)
    lora = lora_config(params.sft.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (6, 12, 0.15,
                                                                                      {"q_proj", "o_proj"})
    checked = {"sft.seq_length", "sft.packing", "sft.packing_strategy", "sft.lora.r", "sft.lora.alpha",
               "sft.lora.dropout", "sft.lora.target_modules", *(f"sft.train.{key}" for key in TRAIN)}
    assert checked | {"sft.train.global_batch_size"} == set(flatten(params.model_dump()["sft"], "sft."))


def test_every_dpo_param_arrives_in_dpoconfig(tmp_path):
    params = nondefault_params()
    config = dpo_config(params, tmp_path, FIT)
    assert config.beta == pytest.approx(0.37)
    assert list(config.loss_type) == ["sigmoid", "sft"] and list(config.loss_weights) == [0.7, 0.3]
    assert config.train_sampling_strategy == "random"  # group_by_length: false
    assert config.max_length == 777 and config.precompute_ref_log_probs and config.precompute_ref_batch_size == 9
    check_training(config, {**TRAIN, "learning_rate": 4.4e-6, "seed": 99})
    checked = {"dpo.beta", "dpo.group_by_length", "dpo.loss_type", "dpo.loss_weights",
               *(f"dpo.train.{key}" for key in TRAIN)}
    assert checked | {"dpo.train.global_batch_size"} == set(flatten(params.model_dump()["dpo"], "dpo."))
    grouped = params.model_copy(update={"dpo": params.dpo.model_copy(update={"group_by_length": True})})
    assert dpo_config(grouped, tmp_path, FIT).train_sampling_strategy == "group_by_length"


def test_every_data_param_arrives_in_what_fetch_and_prepare_write(tmp_path):
    """fetch and prepare with every length, cap and size away from its default, checked against
    what they wrote: row caps, shard sizes, the token limits recounted with the tokenizer (as
    TRL counts: special tokens, prompt + answer + EOS), and the SFT eval share."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from stages import fetch, prepare
    from tests.conftest import REPO, inside, make_workspace

    caps = {"finetune": 120, "rl": 90, "evaluation": 40}
    limits = {"max_prompt_length": 100, "max_length": 220, "max_sft_length": 200}
    ws = make_workspace(tmp_path / "ws", {"fetch": {"max_rows": caps, "shard_rows": 25, "streaming": False},
                                          "prepare": {**limits, "sft_eval_fraction": 0.3, "batch_rows": 17,
                                                      "num_proc": 1}})
    with inside(ws) as params:
        fetch.run(params)
        metrics = prepare.run(params)
    for split, cap in caps.items():
        shards = sorted((ws / f"data/raw/{split}").glob("*.parquet"))
        assert sum(pq.read_metadata(s).num_rows for s in shards) == cap
        assert max(pq.read_metadata(s).num_rows for s in shards) == 25  # fetch.shard_rows
    for folder in ("sft/train", "dpo/train", "dpo/eval"):
        assert max(pq.read_metadata(s).num_rows for s in (ws / "data/processed" / folder).glob("*.parquet")) <= 25
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/sample/tiny-llama")

    def tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    eos = tokenizer.eos_token
    for raw, name in (("rl", "dpo/train"), ("evaluation", "dpo/eval")):
        want = {"prompt_too_long": 0, "chosen_too_long": 0, "rejected_too_long": 0}
        for row in pq.read_table(ws / f"data/raw/{raw}").to_pylist():
            prompt = "Question: " + row["question"] + "\n\nAnswer: "
            if tokens(prompt) > limits["max_prompt_length"]:
                want["prompt_too_long"] += 1
            elif tokens(prompt + row["response_j"] + eos) > limits["max_length"]:
                want["chosen_too_long"] += 1
            elif tokens(prompt + row["response_k"] + eos) > limits["max_length"]:
                want["rejected_too_long"] += 1
        dropped = metrics[name]["dropped"]
        assert {rule: dropped[rule] for rule in want} == want, name
        assert all(want.values()) and sum(dropped.values()) == sum(want.values())  # each limit bit; no other rule
    sft_long = sum(tokens("Question: " + row["question"] + "\n\nAnswer: " + row["response_j"] + eos)
                   > limits["max_sft_length"] for row in pq.read_table(ws / "data/raw/finetune").to_pylist())
    assert metrics["sft"]["dropped"]["text_too_long"] == sft_long > 0
    share = metrics["sft"]["eval"] / (metrics["sft"]["train"] + metrics["sft"]["eval"])
    assert 0.15 < share < 0.45  # sft_eval_fraction 0.3 (the default holds out 0.05)
