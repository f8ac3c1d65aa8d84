"""The GPU acceptance run (`make gpu-check`): the project's own stage code under the 7B profile
(profiles/llama2-7b.yaml: QLoRA, fitted batches, Liger) on one GPU, without downloads.

    python -m bench.gpu_check [--budget-s 480] [--out gpu-check.json]
    python -m bench.gpu_check --tiny      # the same runs on the bundled tiny model, on any machine

It builds a randomly initialised model with Llama-2-7B's config (float16 safetensors; the tiny
model's tokenizer, as no Llama tokenizer can be downloaded on a worker without internet) and
synthetic rows of the real dataset's lengths (bench.data), then runs, each stage in a process of
its own (`stages.<name>.run` with a step timer attached):
- sft, 8 steps of the recipe's 8 packed 1024-token rows: with and without Liger, and each under a
  24 GiB cap (launch.max_memory_gib: the fit plans for it and the allocator is held to it) and
  without one; tokens/s over steps 4-8, MFU, peak allocated and reserved GPU memory, the fit;
- reference, then dpo, 6 steps of 16 pairs (pairs/s over steps 3-6, the start check), uncapped and
  under the 24 GiB cap;
- merge at 7B (host and GPU peaks, the merge check) with the merge gap on 8 held-out pairs.
Runs are ordered by importance; one that would start after --budget-s is skipped and said so.
It writes one JSON (--out; under $OUT when set) and prints one table.

MFU counts the FLOPs a QLoRA step needs: 2N forward and 2N backward for the input gradients per
token (the frozen 4-bit base gets no weight gradients; the LoRA weights' are negligible), plus
attention (6 x layers x hidden x length per token, causal), and not the forward that activation
checkpointing recomputes; against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.measure import REPO, table

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
CAP_GIB = 24
SFT_STEPS, DPO_STEPS = 8, 6
GAP_PAIRS = 8
WARMUP = {"sft": 3, "dpo": 2}  # steps left out of the timing


def llama_2_7b_config(tiny: bool):
    from transformers import AutoConfig, LlamaConfig

    if tiny:
        return AutoConfig.from_pretrained(REPO / "data/sample/tiny-llama")
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16")


def make_model(folder: Path) -> Path:
    """A random Llama-2-7B-shaped model, float16 as Meta's checkpoint, with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_2_7b_config(tiny=False)).half()
    model.save_pretrained(folder, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(REPO / "data/sample/tiny-llama").save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def make_workspace(root: Path, model: Path, tiny: bool) -> Path:
    """The 7B profile over params.yaml, on `model` and synthetic rows of the dataset's lengths
    (the tiny run: the default params on the bundled sample, with the profile's batches)."""
    from bench.data import make_mirror
    from stack_dpo.params import deep_merge

    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    profile = yaml.safe_load((REPO / "profiles/llama2-7b.yaml").read_text())
    short = {"eval_steps": 100, "save_steps": 100, "logging_steps": 1, "warmup_steps": 1}
    run = {"model": {"name_or_path": str(model)},
           "fetch": {"max_rows": {"finetune": 2000, "rl": 2000, "evaluation": 64}},
           "sft": {"train": {**short, "max_steps": SFT_STEPS}},
           "dpo": {"train": {**short, "max_steps": DPO_STEPS}},
           "merge": {"gap_pairs": GAP_PAIRS}, "evaluate": {"generations": 0}}
    if tiny:  # what runs on a CPU: no GPU required, no Liger, the tiny model's shape
        profile = {"model": profile["model"], "sft": {"train": profile["sft"]["train"]},
                   "dpo": {"train": profile["dpo"]["train"]}, "merge": profile["merge"]}
        run = deep_merge(run, {"sft": {"train": {"use_liger_kernel": False}},
                               "dpo": {"train": {"use_liger_kernel": False}},
                               # 24 held-out rows: enough for the start check (16 pairs) and the gap (8)
                               "fetch": {"max_rows": {"finetune": 300, "rl": 200, "evaluation": 24}}})
    else:
        run["data"] = {"source": str(make_mirror(root.parent / "mirror", 2000))}
    params = deep_merge(deep_merge(params, profile), run)
    params["data"]["source"] = str((REPO / params["data"]["source"]).resolve())
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "data").mkdir(exist_ok=True)
    return root


def set_params(root: Path, changes: dict) -> None:
    from stack_dpo.params import deep_merge

    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, changes), sort_keys=False))


def child(stage: str) -> dict:
    """Runs `stages.<stage>.run` here (the workspace) with a step timer; returns what it measured."""
    import logging

    import torch

    from bench.steps import StepTimer
    from stack_dpo import training
    from stack_dpo.params import load_params

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    timer = StepTimer()
    attach = training.dvclive_callbacks
    training.dvclive_callbacks = lambda *args, **kwargs: [*attach(*args, **kwargs), timer]
    module = __import__(f"stages.{stage}", fromlist=["run"])
    params = load_params()
    started = time.perf_counter()
    metrics = module.run(params)
    result = {"stage": stage, "seconds": time.perf_counter() - started, "metrics": metrics,
              "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        result.update(device=torch.cuda.get_device_name(), allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    if stage in WARMUP and len(timer.ends) > WARMUP[stage]:
        steps = len(timer.ends) - WARMUP[stage]
        seconds = timer.steady_seconds(WARMUP[stage])
        train = params.sft.train if stage == "sft" else params.dpo.train
        examples = steps * (train.global_batch_size or train.per_device_train_batch_size)
        result.update(steady_steps=steps, steady_seconds=seconds, examples_per_s=examples / seconds)
        if stage == "sft":
            result["tokens_per_s"] = examples * params.sft.seq_length / seconds
    return result


def mfu(result: dict, config) -> float | None:
    """Model FLOPs utilisation of an sft run (see the module's docstring)."""
    device = result.get("device", "")
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device), None)
    if peak is None or "tokens_per_s" not in result:
        return None
    hidden, layers = config.hidden_size, config.num_hidden_layers
    linear = layers * (4 * hidden**2 + 3 * hidden * config.intermediate_size)  # attention and MLP projections
    matmul = linear + config.vocab_size * hidden  # and the LM head
    attention = 6 * layers * hidden * 1024
    return result["tokens_per_s"] * (4 * matmul + attention) / peak


def run_child(root: Path, stage: str, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        out.write(f"\n===== {stage} =====\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--child", stage], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=out, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = log.read_text().splitlines()[-5:]
        return {"stage": stage, "failed": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the bundled tiny model, on any machine")
    parser.add_argument("--budget-s", type=float, default=480, help="start no run after this many seconds")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/gpu-check")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default: $OUT or the workdir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child), default=str), flush=True)
        return
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("SKIPPED: no CUDA device here; the acceptance run needs one (or --tiny: the tiny model on the CPU)")
        return
    started = time.monotonic()
    root = args.workdir / ("tiny" if args.tiny else "llama-2-7b")
    shutil.rmtree(root / "ws", ignore_errors=True)
    model = REPO / "data/sample/tiny-llama" if args.tiny else make_model(args.workdir / "llama-2-7b-random")
    ws = make_workspace(root / "ws", model, args.tiny)
    log = root / "stages.log"
    log.unlink(missing_ok=True)
    from stages import fetch, prepare  # CPU stages, in this process
    from tests.conftest import inside

    with inside(ws) as params:
        fetch.run(params)
        prepare.run(params)
    results = {"model_build_and_data_s": time.monotonic() - started}
    on_gpu = torch.cuda.is_available()
    # (name, stage, params for the run): the order is what matters most first
    runs = [("sft liger", "sft", {"sft": {"train": {"use_liger_kernel": on_gpu}}}),
            ("sft", "sft", {"sft": {"train": {"use_liger_kernel": False}}}),
            (f"sft liger, {CAP_GIB} GiB cap", "sft", {"launch": {"max_memory_gib": CAP_GIB},
                                                      "sft": {"train": {"use_liger_kernel": on_gpu}}}),
            ("reference", "reference", {"launch": {"max_memory_gib": None}}),
            ("dpo", "dpo", {}),
            ("merge", "merge", {}),
            (f"dpo, {CAP_GIB} GiB cap", "dpo", {"launch": {"max_memory_gib": CAP_GIB}}),
            (f"sft, {CAP_GIB} GiB cap", "sft", {"launch": {"max_memory_gib": CAP_GIB},
                                                "sft": {"train": {"use_liger_kernel": False}}})]
    if not on_gpu:  # Liger and the cap are GPU things: the tiny run keeps one of each kind
        runs = [run for run in runs if "liger" not in run[0] and "cap" not in run[0]]
    config = llama_2_7b_config(args.tiny)
    for name, stage, changes in runs:
        if time.monotonic() - started > args.budget_s:
            results[name] = {"skipped": f"the {args.budget_s:.0f} s budget was spent"}
            continue
        set_params(ws, changes)
        results[name] = run_child(ws, stage, log)
        results[name]["mfu"] = mfu(results[name], config)
    results["total_s"] = time.monotonic() - started
    out = args.out or Path(os.environ.get("OUT", root)) / "gpu-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(summary(results))
    print(f"\n{out} (the stages' output: {log})")


def summary(results: dict) -> str:
    def cell(value, digits=".3g"):
        return "" if value is None else format(value, digits)

    rows = []
    for name, result in results.items():
        if not isinstance(result, dict):
            continue
        if "skipped" in result or "failed" in result:
            rows.append([name, result.get("skipped") or result["failed"][:120], "", "", "", "", ""])
            continue
        metrics = result.get("metrics", {})
        fit = metrics.get("fit", {})
        plan = f"{fit['micro_batch']} x {fit['accumulation']}{' ckpt' if fit['checkpointing'] else ''}" if fit else ""
        rate = result.get("tokens_per_s") or result.get("examples_per_s")
        unit = " tok/s" if "tokens_per_s" in result else " pairs/s" if "examples_per_s" in result else ""
        extra = ""
        if name == "merge":
            extra = (f"check {metrics.get('max_layer_diff', 0):.1e}, gap: accuracy "
                     f"{metrics.get('gap/accuracy_drop', 0):+.3f}, logits {metrics.get('gap/mean_logit_diff', 0):.3g}")
        elif "start_check" in metrics and metrics["start_check"]:
            extra = f"start loss {metrics['start_check']['loss']:.4f}"
        rows.append([name, plan, f"{cell(rate, ',.0f')}{unit}" if rate else "", cell(result.get("mfu"), ".1%"),
                     cell(result.get("allocated_gib")), cell(result.get("reserved_gib")),
                     f"{result['seconds']:.0f} s, host {result['host_peak_gib']:.1f} GiB {extra}".strip()])
    return table(["run", "micro x accum", "throughput", "MFU", "peak alloc GiB", "peak reserved GiB", "notes"], rows)


if __name__ == "__main__":
    main()
