"""DPO memory: the project's DPO setup against the seed's, same model, batch 1, length 256, on
CPU, with a randomly initialised Llama of about 300M parameters (the weights dominate, as at 7B).

- seed: the recipe's setup: the policy (base + a new LoRA adapter via peft_config) and a second
  full copy of the base loaded as model_ref.
- project: stages/dpo.py's setup: one base with the SFT adapter (trainable) and TRL's frozen copy
  of it as the reference; the reference log-probs are computed once up front (as the reference
  stage does) and read from the data during training.

    python -m bench.dpo_memory [--steps 3]

Each setup runs in its own process; the figure is that process's peak resident memory, and the
same minus what the process held before loading any model (Python, torch, TRL).
"""

from __future__ import annotations

import argparse
import json
import resource
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
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    AutoTokenizer.from_pretrained(REPO / "data/sample/tiny-llama").save_pretrained(folder / "base")
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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    tokenizer.pad_token = tokenizer.eos_token
    config = DPOConfig(output_dir=str(folder / f"out-{mode}"), per_device_train_batch_size=1, max_steps=steps,
                       max_length=LENGTH, learning_rate=5e-4, report_to="none", save_strategy="no",
                       disable_tqdm=True, use_cpu=True, precompute_ref_log_probs=mode == "project",
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
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    parameters = sum(p.numel() for p in base.parameters())
    return {"mode": mode, "peak": peak, "before_models": before, "train_s": seconds, "parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/dpo-memory")
    parser.add_argument("--mode", choices=["seed", "project"], help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(train(args.mode, args.workdir, args.steps)))
        return
    make_model(args.workdir)
    results = {}
    for mode in ("seed", "project"):
        out = run([sys.executable, "-m", "bench.dpo_memory", "--mode", mode, "--steps", str(args.steps),
                   "--workdir", str(args.workdir)], REPO)
        results[mode] = json.loads(out.output.split("RESULT ", 1)[1].splitlines()[0])
    seed, ours = results["seed"], results["project"]
    print(f"\n## DPO memory, {seed['parameters'] / 1e6:.0f}M-parameter random Llama, float32, batch 1, length "
          f"{LENGTH}, {args.steps} steps ({machine()})\n")
    print(table(["setup", "peak RSS GiB", "above imports GiB", "train s"],
                [[r["mode"], r["peak"] / GIB, (r["peak"] - r["before_models"]) / GIB, r["train_s"]]
                 for r in (seed, ours)]))
    ratio = ours["peak"] / seed["peak"]
    net = (ours["peak"] - ours["before_models"]) / (seed["peak"] - seed["before_models"])
    print("\n## goals\n")
    print(verdict("peak memory project / seed", ratio, "<= 0.6", ratio <= 0.6))
    print(f"- the same above what the process held before loading models: {net:.3g}")


if __name__ == "__main__":
    main()
