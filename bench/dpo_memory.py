"""DPO memory: the project's DPO setup against the seed's, same model, batch 1, length 256, on
CPU, with a randomly initialised Llama of about 300M parameters (the weights dominate, as at 7B),
both with gradient checkpointing as the recipe trains.

- seed: the recipe's setup: the policy (base + a new LoRA adapter via peft_config) and a second
  full copy of the base loaded as model_ref.
- project: the dpo stage's setup: one base with the SFT adapter (trainable) and TRL's frozen copy
  of it as the reference; the reference log-probs are computed once up front (as the reference
  stage does) and read from the data during training.

    python -m bench.dpo_memory [--steps 6] [--warmup-steps 2] [--repeats 3] [--vocab-size N]

Each run is a process of its own; the two setups alternate, `--repeats` times after one warm-up
round, and figures are medians with their range. Figures: the peak resident memory while
training (the kernel's high-water mark, reset once the setup is built), the peak over the whole
process (model loading included, where safetensors' mapped pages briefly count too), what the
process held before loading any model (Python, torch, TRL), and seconds per step after the
first `--warmup-steps`. The model's vocabulary is the tiny tokenizer's unless
`--vocab-size` says otherwise (for example 32000, Llama 2's).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path

from bench.measure import GIB, REPO, header, interleaved, ratio_spread, run, spread, table
from bench.steps import StepTimer

LENGTH = 256


def make_model(folder: Path, vocab_size: int | None) -> Path:
    """A random Llama with ~300M parameters and the tiny model's tokenizer, and a LoRA adapter on it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stack_dpo.modeling import lora_config
    from stack_dpo.params import LoraParams

    if (folder / "adapter" / "adapter_config.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/sample/tiny-llama")
    # By default the vocabulary is the tokenizer's (about 2k): with 32,000 columns the per-token
    # logits TRL builds weigh as much as a 300M model's layers, which they do not at 7B.
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=24 if not vocab_size else 20,  # about 300M parameters either way
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    lora = LoraParams(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    get_peft_model(model, lora_config(lora)).save_pretrained(folder / "adapter")
    return folder


def pairs(n: int):
    """n preference pairs from the bundled sample, long enough to fill 256 tokens."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = pq.read_table(REPO / "data/sample/stack-exchange-paired/data/rl").slice(0, n).to_pylist()
    return Dataset.from_dict({
        "prompt": ["Question: " + r["question"][:600] + "\n\nAnswer: " for r in rows],
        "chosen": [(r["response_j"] * 4)[:1500] for r in rows],
        "rejected": [(r["response_k"] * 4)[:1500] for r in rows],
    })


def train(mode: str, folder: Path, steps: int, warmup_steps: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stack_dpo.compat import StoredReferenceDPOTrainer
    from stack_dpo.modeling import lora_config
    from stack_dpo.params import LoraParams

    torch.manual_seed(0)
    before = current_rss()
    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    tokenizer.pad_token = tokenizer.eos_token
    config = DPOConfig(output_dir=str(folder / f"out-{mode}"), per_device_train_batch_size=1, max_steps=steps,
                       max_length=LENGTH, learning_rate=5e-4, report_to="none", save_strategy="no",
                       disable_tqdm=True, use_cpu=True, precompute_ref_log_probs=mode == "project",
                       gradient_checkpointing=True,  # as the recipe and profiles/llama2-7b.yaml train
                       precompute_ref_batch_size=1)
    base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
    if mode == "seed":
        model_ref = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
        lora = LoraParams(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        trainer = DPOTrainer(model=base, ref_model=model_ref, args=config, train_dataset=pairs(steps),
                             processing_class=tokenizer, peft_config=lora_config(lora))
    else:
        policy = PeftModel.from_pretrained(base, str(folder / "adapter"), is_trainable=True)
        trainer = StoredReferenceDPOTrainer(model=policy, ref_model=None, args=config, train_dataset=pairs(steps),
                                            processing_class=tokenizer)
    timer = StepTimer()
    trainer.add_callback(timer)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: from here on it is training
    trainer.train()
    seconds_per_step = timer.steady_seconds(warmup_steps) / (steps - warmup_steps)
    training_peak = high_water_mark()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    parameters = sum(p.numel() for p in base.parameters())
    return {"mode": mode, "training_peak": training_peak, "peak": peak, "before_models": before,
            "step_s": seconds_per_step, "parameters": parameters, "vocab_size": base.config.vocab_size}


def current_rss() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1]) * 1024


def high_water_mark() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:")).split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, help="the model's vocabulary (default: the tiny tokenizer's)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--mode", choices=["make", "seed", "project"], help=argparse.SUPPRESS)  # child processes
    args = parser.parse_args()
    args.workdir = args.workdir or REPO / f"bench/.work/dpo-memory-{args.vocab_size or 'tiny'}"
    if args.mode == "make":
        make_model(args.workdir, args.vocab_size)
    elif args.mode:
        print("RESULT " + json.dumps(train(args.mode, args.workdir, args.steps, args.warmup_steps)))
    else:
        compare(args)


def compare(args) -> None:
    # every model lives in a child process, so none starts with this one's memory (ru_maxrss survives exec)
    options = ["--workdir", str(args.workdir), *(["--vocab-size", str(args.vocab_size)] if args.vocab_size else [])]
    run([sys.executable, "-m", "bench.dpo_memory", "--mode", "make", *options], REPO)

    def one(mode: str) -> dict:
        out = run([sys.executable, "-m", "bench.dpo_memory", "--mode", mode, "--steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), *options], REPO)
        return json.loads(out.output.split("RESULT ", 1)[1].splitlines()[0])

    runs = interleaved({"seed": lambda: one("seed"), "project": lambda: one("project")}, args.repeats)
    seed, ours = runs["seed"], runs["project"]
    command = (f"python -m bench.dpo_memory --steps {args.steps} --warmup-steps {args.warmup_steps} "
               f"--repeats {args.repeats}" + (f" --vocab-size {args.vocab_size}" if args.vocab_size else ""))
    print(header(f"DPO memory, {seed[0]['parameters'] / 1e6:.0f}M-parameter random Llama (vocabulary "
                 f"{seed[0]['vocab_size']:,}), float32, batch 1, length {LENGTH}, median (range) of {args.repeats} "
                 f"interleaved runs", command))
    print(table(["setup", "training peak GiB", "whole-process peak GiB", "before models GiB",
                 f"s per step (steps {args.warmup_steps + 1}-{args.steps})"],
                [[name, spread(r, "training_peak", GIB), spread(r, "peak", GIB), spread(r, "before_models", GIB),
                  spread(r, "step_s")] for name, r in runs.items()]))
    memory, memory_text = ratio_spread(ours, seed, "training_peak")
    print("\n## goals\n")
    print(f"- peak memory while training, project / seed: {memory_text} (goal <= 0.6): "
          f"{'MET' if memory <= 0.6 else 'NOT MET'}")
    print(f"- whole-process peak (loading included), project / seed: {ratio_spread(ours, seed, 'peak')[1]}")
    print(f"- seconds per step, project / seed: {ratio_spread(ours, seed, 'step_s')[1]}")
    for r in (*seed, *ours):
        r["net"] = r["training_peak"] - r["before_models"]
    print(f"- training peak above what the process held before loading models, project / seed: "
          f"{ratio_spread(ours, seed, 'net')[1]}")


if __name__ == "__main__":
    main()
