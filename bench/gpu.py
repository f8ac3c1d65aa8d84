"""GPU: a Llama-2-7B-shaped, randomly initialised model with 4-bit QLoRA (NF4, bf16 compute),
SFT and DPO steps at length 1024: tokens per second, peak GPU memory and model FLOPs
utilisation, the project's setup against the seed recipe's.

    python -m bench.gpu [--steps 25] [--warmup-steps 5] [--repeats 3]

Runs where CUDA exists; elsewhere it prints why it is skipped and exits 0. Each setup runs in a
process of its own, the setups alternate (`--repeats` rounds after a warm-up round), and only
steps after the first `--warmup-steps` are timed (CUDA synchronized at each step's end);
figures are medians with their range.
Tokens: the tiny model's tokenizer (about 2k tokens; no Llama tokenizer can be downloaded on a
GPU worker without internet) encodes the texts, which are long enough that every sequence
fills the 1024 tokens (SFT rows are packed; each DPO pair trains a chosen and a rejected
sequence: 2 x 1024 tokens). The model has Llama 2's 32,000-row vocabulary, so the FLOPs are
the 7B model's; only the token ids come from a smaller range.
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
from pathlib import Path

from bench.measure import REPO, header, interleaved, ratio_spread, run, spread, table
from bench.steps import StepTimer

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
    """n pairs from the sample, each text repeated until prompt + answer is well over 1024 tokens."""
    import pyarrow.parquet as pq

    from stack_dpo.dataset import format_prompts

    def repeat(text: str, chars: int) -> str:
        return text * (chars // max(len(text), 1) + 1)

    rows = pq.read_table(REPO / "data/sample/stack-exchange-paired/data/rl").to_pylist()
    rows = (rows * (n // len(rows) + 1))[:n]
    prompts = format_prompts([repeat(r["question"], 800) for r in rows])
    return [{"prompt": prompt, "chosen": repeat(r["response_j"], 6000), "rejected": repeat(r["response_k"], 6000)}
            for prompt, r in zip(prompts, rows)]


def step(kind: str, setup: str, folder: Path, steps: int, warmup_steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from stack_dpo.compat import StoredReferenceDPOTrainer
    from stack_dpo.modeling import lora_config
    from stack_dpo.params import LoraParams

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
    short = [r for r in rows[:64] if len(tokenizer(r["prompt"] + r["rejected"])["input_ids"]) < LENGTH]
    assert not short, "a benchmark text is shorter than the sequence length: the token count would be wrong"
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    if kind == "sft":
        data = Dataset.from_list([{"text": r["prompt"] + r["chosen"]} for r in rows])
        trainer = SFTTrainer(model=load(), args=SFTConfig(max_length=LENGTH, packing=True, **common),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    elif setup == "seed":
        trainer = DPOTrainer(model=load(), ref_model=load(), args=DPOConfig(max_length=LENGTH, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora,
                             callbacks=[timer])
    else:
        policy = get_peft_model(prepare_model_for_kbit_training(load()), lora)  # stands in for the SFT adapter
        trainer = StoredReferenceDPOTrainer(
            model=policy, ref_model=None, args=DPOConfig(max_length=LENGTH, precompute_ref_log_probs=True, **common),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    seconds = timer.steady_seconds(warmup_steps)
    sequences_per_step = BATCH * (2 if kind == "dpo" else 1)  # a DPO pair trains two sequences
    tokens = (steps - warmup_steps) * sequences_per_step * LENGTH
    parameters = 6.74e9
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return {"tokens_per_s": tokens / seconds, "pairs_per_s": (steps - warmup_steps) * BATCH / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 1024**3,
            "mfu": 6 * parameters * tokens / seconds / peak if peak else float("nan"), "device": name}


SETUPS = [("sft", "seed"), ("sft", "project"), ("dpo", "seed"), ("dpo", "project")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/gpu")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device here; the GPU benchmark (4-bit QLoRA on a Llama-2-7B shape) needs one")
        return
    folder = args.workdir / "llama-2-7b-shaped"
    if args.child:
        print("RESULT " + json.dumps(step(*args.child, folder, args.steps, args.warmup_steps)))
        return
    make_model(folder)

    def child(kind: str, setup: str) -> dict:
        out = run([sys.executable, "-m", "bench.gpu", "--child", kind, setup, "--steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), "--workdir", str(args.workdir)], REPO)
        return json.loads(out.output.split("RESULT ", 1)[1].splitlines()[0])

    runs = interleaved({f"{kind} {setup}": (lambda k=kind, s=setup: child(k, s)) for kind, setup in SETUPS},
                       args.repeats)
    device = runs["sft seed"][0]["device"]
    print(header(f"GPU, Llama-2-7B shape, 4-bit QLoRA, length {LENGTH}, batch {BATCH}, steps {args.warmup_steps + 1}"
                 f"-{args.steps} timed, median (range) of {args.repeats} interleaved runs ({device})",
                 f"python -m bench.gpu --steps {args.steps} --warmup-steps {args.warmup_steps} "
                 f"--repeats {args.repeats}"))
    print(table(["stage", "setup", "tokens/s", "DPO pairs/s", "peak GPU GiB", "MFU"],
                [[*name.split(), spread(r, "tokens_per_s", digits=",.0f"),
                  spread(r, "pairs_per_s") if name.startswith("dpo") else "", spread(r, "peak_gib"), spread(r, "mfu")]
                 for name, r in runs.items()]))
    print(f"\n- DPO pairs/s, project / seed: {ratio_spread(runs['dpo project'], runs['dpo seed'], 'pairs_per_s')[1]}")
    print(f"- SFT tokens/s, project / seed (the same setup today: an A/A check of the noise): "
          f"{ratio_spread(runs['sft project'], runs['sft seed'], 'tokens_per_s')[1]}")


if __name__ == "__main__":
    main()
