"""DPO memory: the project's DPO setup against the seed's, same model, batch 1, length 256, on
CPU, with a randomly initialised Llama of about 300M parameters (the weights dominate, as at 7B),
both with gradient checkpointing as the recipe trains.

- seed: the recipe's setup: the policy (base + a new LoRA adapter via peft_config) and a second
  full copy of the base loaded as model_ref.
- project: stages/dpo.py's setup: one base with the SFT adapter (trainable) and TRL's frozen copy
  of it as the reference; the reference log-probs are computed once up front (as the reference
  stage does) and read from the data during training.

    python -m bench.dpo_memory [--steps 3]

Each setup runs in its own process. Figures: the peak resident memory while training (the
kernel's high-water mark, reset once the setup is built), the peak over the whole process
(model loading included, where safetensors' mapped pages briefly count too), and what the
process held before loading any model (Python, torch, TRL).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from bench.measure import GIB, REPO, machine, run, table, verdict

LENGTH = 256


def make_model(folder: Path) -> Path:
    """A random Llama with ~300M parameters and the tiny model's tokenizer, and a LoRA adapter on it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stages.modeling import lora_config
    from stages.params import LoraParams

    if (folder / "adapter" / "adapter_config.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/sample/tiny-llama")
    # The vocabulary is the tokenizer's (1,872): with 32,000 unused rows the per-token logits
    # tensors TRL builds would outweigh a 300M model's layers, which they do not at 7B.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
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


def train(mode: str, folder: Path, steps: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stages.dpo import StoredReferenceDPOTrainer
    from stages.modeling import lora_config
    from stages.params import LoraParams

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
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: from here on it is training
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    training_peak = high_water_mark()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    parameters = sum(p.numel() for p in base.parameters())
    return {"mode": mode, "training_peak": training_peak, "peak": peak, "before_models": before, "train_s": seconds,
            "parameters": parameters}


def current_rss() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1]) * 1024


def high_water_mark() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:")).split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/dpo-memory")
    parser.add_argument("--mode", choices=["make", "seed", "project"], help=argparse.SUPPRESS)  # child processes
    args = parser.parse_args()
    if args.mode == "make":
        make_model(args.workdir)
    elif args.mode:
        print("RESULT " + json.dumps(train(args.mode, args.workdir, args.steps)))
    else:
        compare(args)


def compare(args) -> None:
    # every model lives in a child process, so none starts with this one's memory (ru_maxrss survives exec)
    run([sys.executable, "-m", "bench.dpo_memory", "--mode", "make", "--workdir", str(args.workdir)], REPO)
    results = {}
    for mode in ("seed", "project"):
        out = run([sys.executable, "-m", "bench.dpo_memory", "--mode", mode, "--steps", str(args.steps),
                   "--workdir", str(args.workdir)], REPO)
        results[mode] = json.loads(out.output.split("RESULT ", 1)[1].splitlines()[0])
    seed, ours = results["seed"], results["project"]
    print(f"\n## DPO memory, {seed['parameters'] / 1e6:.0f}M-parameter random Llama, float32, batch 1, length "
          f"{LENGTH}, {args.steps} steps ({machine()})\n")
    print(table(["setup", "training peak GiB", "whole-process peak GiB", "before models GiB", "train s"],
                [[r["mode"], r["training_peak"] / GIB, r["peak"] / GIB, r["before_models"] / GIB, r["train_s"]]
                 for r in (seed, ours)]))
    ratio = ours["training_peak"] / seed["training_peak"]
    print("\n## goals\n")
    print(verdict("peak memory while training, project / seed", ratio, "<= 0.6", ratio <= 0.6))
    print(f"- whole-process peak (loading included), project / seed: {ours['peak'] / seed['peak']:.3g}")
    net = (ours["training_peak"] - ours["before_models"]) / (seed["training_peak"] - seed["before_models"])
    print(f"- training peak above what the process held before loading models, project / seed: {net:.3g}")


if __name__ == "__main__":
    main()
