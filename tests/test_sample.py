"""The embedded default: the sample data in the Hub dataset's exact layout and schema, and the
tiny Llama in the Hub model-repo layout, both reproducible from their seeded scripts."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO

SAMPLE = REPO / "data" / "sample" / "stack-exchange-paired"
TINY = REPO / "data" / "sample" / "tiny-llama"
HUB_SCHEMA = pa.schema([("qid", pa.int64()), ("question", pa.string()), ("date", pa.string()),
                        ("metadata", pa.list_(pa.string())), ("response_j", pa.string()),
                        ("response_k", pa.string())])


def read(split):
    return pq.read_table(SAMPLE / "data" / split)


def test_sample_has_the_hub_layout_and_schema():
    for split in ("finetune", "rl", "evaluation"):
        shards = sorted((SAMPLE / "data" / split).glob("train-*-of-*.parquet"))
        assert shards, split
        assert read(split).schema.equals(HUB_SCHEMA), split


def test_evaluation_qids_are_unseen_in_training_splits():
    evaluation = set(read("evaluation").column("qid").to_pylist())
    for split in ("finetune", "rl"):
        assert evaluation.isdisjoint(read(split).column("qid").to_pylist())


def test_sample_looks_like_stack_exchange():
    table = read("rl")
    questions = table.column("question").to_pylist()
    sites = {meta[1] for meta in table.column("metadata").to_pylist()}
    assert len(sites) >= 5
    assert all("```" in q for q in questions)  # markdown code blocks
    assert table.num_rows > len(set(table.column("qid").to_pylist()))  # several pairs per question
    assert all(j != k for j, k in zip(table.column("response_j").to_pylist(), table.column("response_k").to_pylist()))


def test_generator_reproduces_the_bundled_sample(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for split in ("finetune", "rl", "evaluation"):
        assert pq.read_table(tmp_path / "data" / split).equals(read(split)), split


def test_tiny_model_loads_like_a_hub_llama():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert (TINY / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token is None  # like Llama-2: the stages pad with EOS
    ids = tokenizer("Question: how?\n\nAnswer: ")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Question: how?\n\nAnswer: "
    # It was pre-trained on the sample: it predicts the recipe's format far better than chance.
    text = read("evaluation").column("question")[0].as_py()
    batch = tokenizer("Question: " + text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 0.5 * torch.log(torch.tensor(float(len(tokenizer)))).item()  # chance: ln(vocabulary)
