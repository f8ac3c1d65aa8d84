"""GPU: the stages' own setups against the seed recipe's, on a randomly initialised model with
Llama-2-7B's config (bench.gpu_check builds it, and the data: synthetic rows of the dataset's
lengths), 4-bit QLoRA, length 1024.

    python -m bench.gpu [--repeats 3]

Runs where CUDA exists; elsewhere it prints why it is skipped and exits 0. Each setup runs in a
process of its own, the setups alternate (`--repeats` rounds after a warm-up round), and only
the steps after the first few are timed (CUDA synchronized at each step's end); figures are
medians with their range.
- project: the sft, reference and dpo stages themselves (`stages.<name>.run`, the 7B profile:
  batches fitted to the GPU, Liger, the stored reference, length-grouped pairs).
- seed: the recipe's code with TRL today: SFTTrainer with packing (the recipe's constant-length
  packing is TRL's `wrapped`), batch 4 x 2, gradient checkpointing; DPOTrainer with a new LoRA
  adapter on the 4-bit policy and a second 4-bit model as model_ref (a reference forward in
  every step), batch 4 x 4, gradient checkpointing; both with the paged 32-bit AdamW and bf16.
DPO throughput of the project is given for the dpo stage's steps and with the reference stage's
forward of each pair counted in (1 / (1 / dpo rate + 1 / reference rate)). MFU counts 4N FLOPs a
token (bench.gpu_check: the frozen 4-bit base gets no weight gradients); peak memory is what
PyTorch allocated and reserved. The goals: SFT >= 3x and DPO >= 2.5x the seed's throughput on
the same GPU; SFT and DPO within 24 GB (bench.gpu_check runs them under a 24 GiB cap).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import WARMUP, llama_2_7b_config, make_model, make_workspace, mfu, run_child, set_params
from bench.measure import REPO, header, interleaved, ratio_spread, spread, table

SEED_BATCH = {"sft": (4, 2), "dpo": (4, 4)}
STEPS = {"sft": 12, "dpo": 8}


def seed(kind: str, steps: int) -> dict:
    """The seed recipe's step, run here (the workspace), on the data the stages prepared."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from bench.steps import StepTimer
    from stack_dpo.modeling import lora_config
    from stack_dpo.outputs import load_splits
    from stack_dpo.params import load_params

    params = load_params()
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        return AutoModelForCausalLM.from_pretrained(params.model.name_or_path, quantization_config=nf4,
                                                    dtype=torch.bfloat16, device_map={"": 0})

    tokenizer = AutoTokenizer.from_pretrained(params.model.name_or_path)
    tokenizer.pad_token = tokenizer.eos_token
    batch, accumulation = SEED_BATCH[kind]
    common = dict(output_dir="seed-out", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                  max_steps=steps, learning_rate=1e-4, bf16=True, gradient_checkpointing=True, report_to="none",
                  save_strategy="no", disable_tqdm=True, optim="paged_adamw_32bit", logging_steps=1)
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    if kind == "sft":
        data = load_splits("data/processed/sft")["train"].shuffle(seed=0)
        trainer = SFTTrainer(model=load(), args=SFTConfig(max_length=1024, packing=True, packing_strategy="wrapped",
                                                          **common),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora_config(params.sft.lora),
                             callbacks=[timer])
    else:
        data = load_splits("data/processed/dpo")["train"].shuffle(seed=0)
        trainer = DPOTrainer(model=load(), ref_model=load(), args=DPOConfig(max_length=1024, **common),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora_config(params.sft.lora),
                             callbacks=[timer])
    trainer.train()
    timed = steps - WARMUP[kind]
    seconds = timer.steady_seconds(WARMUP[kind])
    result = {"examples_per_s": timed * batch * accumulation / seconds, "device": torch.cuda.get_device_name(),
              "allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
              "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    if kind == "sft":
        result["tokens_per_s"] = result["examples_per_s"] * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/gpu")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device here; the GPU benchmark (4-bit QLoRA on a Llama-2-7B shape) needs one")
        return
    if args.child:
        print("RESULT " + json.dumps(seed(args.child[0], int(args.child[1]))))
        return
    ws = make_workspace(args.workdir / "ws", make_model(args.workdir / "llama-2-7b-random"), tiny=False)
    from stages import fetch, prepare
    from tests.conftest import inside

    with inside(ws) as params:
        fetch.run(params)
        prepare.run(params)
    set_params(ws, {"sft": {"train": {"max_steps": STEPS["sft"]}}, "dpo": {"train": {"max_steps": STEPS["dpo"]}}})
    log = args.workdir / "stages.log"

    def project(stage: str) -> dict:
        if stage == "dpo":  # its reference log-probs first (they depend on the SFT adapter and the pairs)
            reference = run_child(ws, "reference", log)
            result = run_child(ws, "dpo", log)
            pairs = reference["metrics"]["train"]["pairs"] + reference["metrics"]["eval"]["pairs"]
            result["reference_pairs_per_s"] = pairs / reference["seconds"]
            result["with_reference_per_s"] = 1 / (1 / result["examples_per_s"] + 1 / result["reference_pairs_per_s"])
            return result
        return run_child(ws, stage, log)

    def seed_child(kind: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "bench.gpu", "--child", kind, str(STEPS[kind])], cwd=ws,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        result["with_reference_per_s"] = result["examples_per_s"]  # its steps run the reference model themselves
        return result

    runs = interleaved({"sft seed": lambda: seed_child("sft"), "sft project": lambda: project("sft"),
                        "dpo seed": lambda: seed_child("dpo"), "dpo project": lambda: project("dpo")}, args.repeats)
    config = llama_2_7b_config(tiny=False)
    for results in runs.values():
        for result in results:
            result["mfu"] = mfu(result, config)
    device = runs["sft seed"][0]["device"]
    print(header(f"GPU, Llama-2-7B shape, 4-bit QLoRA, length 1024, median (range) of {args.repeats} interleaved runs "
                 f"({device})", f"python -m bench.gpu --repeats {args.repeats}"))
    print(table(["stage", "setup", "tokens/s", "pairs/s", "pairs/s with reference", "MFU", "peak alloc GiB",
                 "peak reserved GiB"],
                [[*name.split(), spread(r, "tokens_per_s", digits=",.0f") if name.startswith("sft") else "",
                  spread(r, "examples_per_s") if name.startswith("dpo") else "",
                  spread(r, "with_reference_per_s") if name == "dpo project" else "",
                  spread(r, "mfu") if name.startswith("sft") else "", spread(r, "allocated_gib"),
                  spread(r, "reserved_gib")] for name, r in runs.items()]))
    print(f"\n- SFT tokens/s, project / seed: {ratio_spread(runs['sft project'], runs['sft seed'], 'tokens_per_s')[1]}"
          " (goal >= 3)")
    print(f"- DPO pairs/s, project / seed, the dpo stage's steps: "
          f"{ratio_spread(runs['dpo project'], runs['dpo seed'], 'examples_per_s')[1]}")
    print(f"- DPO pairs/s, project / seed, the reference stage counted in: "
          f"{ratio_spread(runs['dpo project'], runs['dpo seed'], 'with_reference_per_s')[1]} (goal >= 2.5; the "
          "seed's steps run the reference model themselves)")


if __name__ == "__main__":
    main()
