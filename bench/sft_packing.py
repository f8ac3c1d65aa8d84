"""SFT throughput with and without packing on the bundled sample's varied lengths: the tiny
model, the default sft params, real (non-padding) tokens trained per second.

    python -m bench.sft_packing [--steps 20]

Without packing each example is padded to the longest in its batch (and cut at seq_length);
with packing (the recipe's choice) examples are concatenated into full seq_length rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from bench.measure import REPO, machine, table

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sft_texts():
    import pyarrow.parquet as pq
    from datasets import Dataset

    raw = pq.read_table(REPO / "data/sample/stack-exchange-paired/data/finetune").to_pylist()
    return Dataset.from_dict({"text": ["Question: " + r["question"] + "\n\nAnswer: " + r["response_j"] for r in raw]})


def tokens_per_second(packing: bool, strategy: str, steps: int) -> dict:
    from trl import SFTConfig, SFTTrainer

    from stages import training
    from stages.modeling import load_base_model, load_tokenizer, lora_config
    from stages.params import load_params

    params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as out:
        train = params.sft.train.model_copy(update={"max_steps": steps, "eval_steps": steps, "save_steps": 10**6})
        config = SFTConfig(dataset_text_field="text", max_length=params.sft.seq_length, packing=packing,
                           packing_strategy=strategy, **training.trainer_kwargs(train, params.model, Path(out)))
        config.eval_strategy, config.save_strategy = "no", "no"
        trainer = SFTTrainer(model=load_base_model(params.model), args=config, train_dataset=sft_texts(),
                             processing_class=load_tokenizer(REPO / params.model.name_or_path),
                             peft_config=lora_config(params.sft.lora))
        result = trainer.train()
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    padded = steps * params.sft.train.per_device_train_batch_size * params.sft.seq_length
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"], "tokens_per_s":
            tokens / result.metrics["train_runtime"], "slots": padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.chdir(REPO)  # params.yaml names the model by a path relative to the repository
    runs = {name: tokens_per_second(packing, strategy, args.steps)
            for name, packing, strategy in (("no packing (padding)", False, "bfd"),
                                            ("packing, wrapped (the recipe's)", True, "wrapped"),
                                            ("packing, bfd", True, "bfd"))}
    base = runs["no packing (padding)"]["tokens_per_s"]
    print(f"\n## SFT on the sample, tiny model, batch 8, seq_length 256, {args.steps} steps ({machine()})\n")
    print(table(["setup", "real tokens", "seconds", "real tokens/s", "vs no packing"],
                [[name, r["tokens"], r["seconds"], r["tokens_per_s"], f"{r['tokens_per_s'] / base:.2f}x"]
                 for name, r in runs.items()]))


if __name__ == "__main__":
    main()
