"""GPU: a Llama-2-7B-shaped, randomly initialised model with 4-bit QLoRA (NF4, bf16 compute),
SFT and DPO steps at length 1024: tokens per second, peak GPU memory and model FLOPs
utilisation, the project's setup against the seed recipe's.

    python -m bench.gpu [--steps 5]

Runs where CUDA exists; elsewhere it prints why it is skipped and exits 0.
- SFT: both run TRL's SFTTrainer with packing, batch 4, gradient checkpointing (the project's
  sft stage keeps the recipe's setup; the row is there to show it costs the same).
- DPO: seed = the 4-bit policy with a new LoRA adapter plus a second 4-bit model as model_ref,
  reference forward in every step; project = one 4-bit base with the SFT adapter, reference
  log-probs computed once up front (the reference stage) and read during training.
MFU counts 6 x parameters FLOPs per trained token (forward and backward through the frozen
4-bit weights dominate) against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.measure import REPO, run, table

LENGTH = 1024
BATCH = 4
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def make_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO / "data/sample/tiny-llama").save_pretrained(folder)
    return folder


def texts(n: int) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(REPO / "data/sample/stack-exchange-paired/data/rl").to_pylist()
    rows = (rows * (n // len(rows) + 1))[:n]
    return [{"prompt": "Question: " + r["question"] * 3 + "\n\nAnswer: ", "chosen": r["response_j"] * 6,
             "rejected": r["response_k"] * 6} for r in rows]


def step(kind: str, setup: str, folder: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from stages.dpo import StoredReferenceDPOTrainer
    from stages.modeling import lora_config
    from stages.params import LoraParams

    lora = lora_config(LoraParams(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"]))
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantized, dtype=torch.bfloat16,
                                                    device_map={"": 0})

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    common = dict(output_dir=str(folder.parent / f"out-{kind}-{setup}"), per_device_train_batch_size=BATCH,
                  max_steps=steps, learning_rate=1e-4, bf16=True, gradient_checkpointing=True, report_to="none",
                  save_strategy="no", disable_tqdm=True, optim="paged_adamw_32bit", logging_steps=1)
    rows = texts(BATCH * steps * 8)
    torch.cuda.reset_peak_memory_stats()
    if kind == "sft":
        data = Dataset.from_list([{"text": r["prompt"] + r["chosen"]} for r in rows])
        trainer = SFTTrainer(model=load(), args=SFTConfig(max_length=LENGTH, packing=True, **common),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora)
    elif setup == "seed":
        trainer = DPOTrainer(model=load(), ref_model=load(), args=DPOConfig(max_length=LENGTH, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora)
    else:
        policy = get_peft_model(prepare_model_for_kbit_training(load()), lora)  # stands in for the SFT adapter
        trainer = StoredReferenceDPOTrainer(
            model=policy, ref_model=None, args=DPOConfig(max_length=LENGTH, precompute_ref_log_probs=True, **common),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = max(e.get("num_tokens", 0) for e in trainer.state.log_history) or steps * BATCH * LENGTH
    parameters = 6.74e9
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    peak_gib = torch.cuda.max_memory_allocated() / 1024**3
    mfu = 6 * parameters * tokens / seconds / peak if peak else None
    return {"kind": kind, "setup": setup, "tokens_per_s": tokens / seconds, "peak_gib": peak_gib, "mfu": mfu,
            "device": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/gpu")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device here; the GPU benchmark (4-bit QLoRA on a Llama-2-7B shape) needs one")
        return
    folder = args.workdir / "llama-2-7b-shaped"
    if args.child:
        print("RESULT " + json.dumps(step(*args.child, folder, args.steps)))
        return
    make_model(folder)
    results = []
    for kind, setup in (("sft", "seed"), ("sft", "project"), ("dpo", "seed"), ("dpo", "project")):
        out = run([sys.executable, "-m", "bench.gpu", "--child", kind, setup, "--steps", str(args.steps),
                   "--workdir", str(args.workdir)], REPO)
        results.append(json.loads(out.output.split("RESULT ", 1)[1].splitlines()[0]))
    print(f"\n## GPU, Llama-2-7B shape, 4-bit QLoRA, length {LENGTH}, batch {BATCH} ({results[0]['device']})\n")
    print(table(["stage", "setup", "tokens/s", "peak GPU GiB", "MFU"],
                [[r["kind"], r["setup"], r["tokens_per_s"], r["peak_gib"], r["mfu"] or "n/a"] for r in results]))


if __name__ == "__main__":
    main()
