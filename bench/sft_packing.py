"""SFT throughput with and without packing on the bundled sample's varied lengths: the tiny
model, the default sft params, real (non-padding) tokens trained per second in steady state.

    python -m bench.sft_packing [--steps 20] [--warmup-steps 5] [--repeats 3]

Without packing each example is padded to the longest in its batch (and cut at seq_length);
with packing (the recipe's choice) examples are concatenated into full seq_length rows. Each
setup trains `--steps` steps; the first `--warmup-steps` are not timed. The setups run
interleaved, `--repeats` times after one warm-up round; figures are medians with their range.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from bench.measure import REPO, header, interleaved, ratio_spread, spread, table
from bench.steps import StepTimer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SETUPS = {"no packing (padding)": (False, "bfd"), "packing, wrapped (the recipe's)": (True, "wrapped"),
          "packing, bfd": (True, "bfd")}


def sft_texts():
    import pyarrow.parquet as pq
    from datasets import Dataset

    from stack_dpo.dataset import sft_text

    raw = pq.read_table(REPO / "data/sample/stack-exchange-paired/data/finetune").to_pylist()
    return Dataset.from_dict({"text": [sft_text(r["question"], r["response_j"]) for r in raw]})


def tokens_per_second(packing: bool, strategy: str, steps: int, warmup_steps: int) -> dict:
    from trl import SFTConfig, SFTTrainer

    from stack_dpo import training
    from stack_dpo.modeling import load_base_model, load_tokenizer, lora_config
    from stack_dpo.params import load_params

    params = load_params(REPO / "params.yaml")
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        train = params.sft.train.model_copy(update={"max_steps": steps, "eval_steps": steps, "save_steps": 10**6,
                                                    "logging_steps": 1})
        config = SFTConfig(dataset_text_field="text", max_length=params.sft.seq_length, packing=packing,
                           packing_strategy=strategy, **training.trainer_kwargs(train, params.model, Path(out)))
        config.eval_strategy, config.save_strategy = "no", "no"
        trainer = SFTTrainer(model=load_base_model(params.model), args=config, train_dataset=sft_texts(),
                             processing_class=load_tokenizer(REPO / params.model.name_or_path),
                             peft_config=lora_config(params.sft.lora), callbacks=[timer])
        trainer.train()
    seen = {entry["step"]: entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry}
    tokens = seen[steps] - seen[warmup_steps]  # real tokens of the timed steps (TRL counts non-padding tokens)
    seconds = timer.steady_seconds(warmup_steps)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.chdir(REPO)  # params.yaml names the model by a path relative to the repository
    runs = interleaved({name: (lambda p=packing, s=strategy: tokens_per_second(p, s, args.steps, args.warmup_steps))
                        for name, (packing, strategy) in SETUPS.items()}, args.repeats)
    base = runs["no packing (padding)"]
    print(header(f"SFT on the sample, tiny model, batch 8, seq_length 256: steps {args.warmup_steps + 1}-"
                 f"{args.steps} timed, median (range) of {args.repeats} interleaved runs",
                 f"python -m bench.sft_packing --steps {args.steps} --warmup-steps {args.warmup_steps} "
                 f"--repeats {args.repeats}"))
    print(table(["setup", "real tokens per timed run", "seconds", "real tokens/s", "vs no packing"],
                [[name, spread(r, "tokens", digits=",.0f"), spread(r, "seconds"),
                  spread(r, "tokens_per_s", digits=",.0f"), ratio_spread(r, base, "tokens_per_s")[1]]
                 for name, r in runs.items()]))


if __name__ == "__main__":
    main()
