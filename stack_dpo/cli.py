"""`stack-dpo`: try the trained model, check a setup, compare experiments.

    stack-dpo generate "How do I reverse a list in Python?"      # models/merged, greedy
    stack-dpo generate --model you/stack-dpo-tiny --sample "..."  # a Hub repo, sampling
    stack-dpo check [--profile profiles/llama2-7b.yaml]           # params, machine, model, tokenizer, LoRA
    stack-dpo show                                                 # the experiments, one line each
    stack-dpo verify                                               # recompute evaluate's figures per pair
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from stack_dpo.entrypoint import HubKernelNotice
from stack_dpo.params import PARAMS_FILE, InvalidInput
from stack_dpo.paths import MERGED

# (column, where dvc exp show keeps it): params.yaml keys and metrics/evaluate.json keys
SHOW_COLUMNS = [
    ("beta", "params", "dpo.beta"),
    ("loss", "params", "dpo.loss_type"),
    ("sft lr", "params", "sft.train.learning_rate"),
    ("dpo lr", "params", "dpo.train.learning_rate"),
    ("sft steps", "params", "sft.train.max_steps"),
    ("dpo steps", "params", "dpo.train.max_steps"),
    ("accuracy", "metrics", "rewards/accuracies"),
    ("95% CI", "metrics", ("rewards/accuracies_ci95_low", "rewards/accuracies_ci95_high")),
    ("length", "metrics", "baseline/length_accuracy"),
    ("code", "metrics", "baseline/code_block_accuracy"),
    ("sft", "metrics", "baseline/sft_accuracy"),
    ("margins", "metrics", "rewards/margins"),
]


def generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from stack_dpo.dataset import format_prompt
    from stack_dpo.evaluate import generate as answer
    from stack_dpo.modeling import load_tokenizer

    transformers_logging.disable_progress_bar()
    question = sys.stdin.read() if args.question == "-" else args.question
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto",
                                                 device_map="auto" if torch.cuda.is_available() else None)
    model.eval()
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample else {}
    print(answer(model, tokenizer, [format_prompt(question)], args.max_new_tokens, **sampling)[0].strip())


def check(args: argparse.Namespace) -> None:
    from stack_dpo.dpo import check_loss_types
    from stack_dpo.experiment import check_machine, profile_params
    from stack_dpo.modeling import preflight
    from stack_dpo.params import load_params

    params = profile_params(args.profile, Path(args.params)) if args.profile else load_params(args.params)
    source = f"{args.params} + {args.profile}" if args.profile else args.params
    print(f"{source}: valid")
    for line in check_machine(params):
        print(line)
    preflight(params.model, params.sft.lora)
    check_loss_types(params)
    print(f"model {params.model.name_or_path}: found; its tokenizer has EOS; LoRA targets "
          f"{list(params.sft.lora.target_modules)} found; quantization {params.model.quantization}; "
          f"dpo.loss_type {list(params.dpo.loss_type)} known to TRL")


def _value(data: dict, kind: str, key):
    if isinstance(key, tuple):
        low, high = (_value(data, kind, k) for k in key)
        return f"{low}-{high}" if low != "" else ""
    if kind == "params":
        node = data.get("params", {}).get(PARAMS_FILE, {}).get("data", {})
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        value = node if node != {} else ""
    else:
        value = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {}).get(key, "")
    if isinstance(value, list):
        return "+".join(map(str, value))
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def experiment_rows(shown: list[dict]) -> list[list[str]]:
    """One row per experiment (and the workspace) of `dvc exp show --json`."""
    rows = []
    for entry in shown:
        revisions = [("workspace" if entry["rev"] == "workspace" else entry["rev"][:7], entry.get("data") or {})]
        revisions += [(rev.get("name") or rev["rev"][:7], rev.get("data") or {})
                      for exp in entry.get("experiments") or [] for rev in exp["revs"]]
        for name, data in revisions:
            rows.append([name, *(_value(data, kind, key) for _, kind, key in SHOW_COLUMNS)])
    return rows


def show(args: argparse.Namespace) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", *(["-A"] if args.all else [])],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"dvc exp show failed: {done.stderr.strip()}")
    header = ["experiment", *(name for name, _, _ in SHOW_COLUMNS)]
    rows = [header, *experiment_rows(json.loads(done.stdout or "[]"))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\naccuracy: the final model's held-out preference accuracy against the SFT model; length, code, sft:\n"
          "the baselines it must beat (the longer answer, the answer with code, the SFT model's own preference)")


def summary(args: argparse.Namespace) -> None:
    from stack_dpo.evaluate import BASELINES, unbeaten_baselines
    from stack_dpo.paths import EVAL_REPORT, METRICS

    path = METRICS / "evaluate.json"
    if not path.exists():
        raise SystemExit(f"{path}: not there yet; run `dvc repro` first")
    metrics = json.loads(path.read_text())
    accuracy = metrics["rewards/accuracies"]
    beaten = unbeaten_baselines(metrics)
    print(f"held-out preference accuracy {accuracy:.3f} (95% interval {metrics['rewards/accuracies_ci95_low']:.3f}-"
          f"{metrics['rewards/accuracies_ci95_high']:.3f}, {metrics['n_pairs']} pairs), against the baselines "
          + ", ".join(f"{name} {metrics[key]:.3f}" for key, name in BASELINES) + ": "
          + ("beats every one." if not beaten else f"does NOT beat {', '.join(beaten)}."))
    print(f"the model: {MERGED} (try it: stack-dpo generate \"How do I undo the last git commit?\"); "
          f"the report: {EVAL_REPORT}; the curves: dvc plots show")
    print("next: dvc exp run -S dpo.beta=0.3 (a sweep: README, Sweeps), stack-dpo show to compare; "
          "make exp-full on a GPU for the recipe at 7B scale")


def verify(args: argparse.Namespace) -> None:
    """Every figure of metrics/evaluate.json recomputed from the per-pair log-probs
    (metrics/evaluate_pairs.parquet) and the held-out pairs' texts, beside the recorded one."""
    import pyarrow.parquet as pq

    from stack_dpo.evaluate import SCORE_COLUMNS, held_out_pairs, metrics_from_scores
    from stack_dpo.params import load_params
    from stack_dpo.paths import EVAL_SCORES, METRICS

    recorded_file = METRICS / "evaluate.json"
    for path in (recorded_file, EVAL_SCORES):
        if not path.exists():
            raise InvalidInput(f"{path}: not there; run `dvc repro evaluate` first")
    params = load_params(args.params)
    pairs = held_out_pairs(params)
    scores = pq.read_table(EVAL_SCORES)
    missing = [name for name in ["pair", *SCORE_COLUMNS] if name not in scores.column_names]
    if missing or scores.column("pair").to_pylist() != list(range(len(pairs))):
        raise InvalidInput(f"{EVAL_SCORES}: expected columns pair, {', '.join(SCORE_COLUMNS)} with one row per "
                           f"held-out pair ({len(pairs)}, in order); found {scores.column_names}, {scores.num_rows} "
                           "rows: the file belongs to another run; rerun `dvc repro evaluate`")
    recorded = json.loads(recorded_file.read_text())
    recomputed = metrics_from_scores(scores, pairs, params.dpo.beta)
    differing = []
    print(f"{'figure':32}  {'recorded':>12}  {'recomputed':>12}")
    for key, value in recomputed.items():
        agrees = key in recorded and abs(recorded[key] - value) <= 1e-9 * max(1.0, abs(value))
        differing += [] if agrees else [key]
        print(f"{key:32}  {recorded.get(key, float('nan')):12.6f}  {value:12.6f}{'' if agrees else '  DIFFERS'}")
    print(f"\nfrom {scores.num_rows} pairs' log-probs in {EVAL_SCORES} (beta = {params.dpo.beta}) and their texts")
    if differing:
        raise SystemExit(f"stack-dpo verify: {', '.join(differing)} in {recorded_file} differ from the figures "
                         f"recomputed from {EVAL_SCORES}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="stack-dpo", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer a question in the recipe's prompt format",
                              description="Answer a question with a trained model, in the recipe's prompt format "
                                          "(`Question: ...\\n\\nAnswer: `).")
    gen.add_argument("question", help="the question; - reads it from stdin")
    gen.add_argument("--model", default=str(MERGED), help="a model folder or Hub repo id (default: %(default)s)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, help="with --sample (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=0.9, help="with --sample (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="with --sample (default: %(default)s)")
    gen.set_defaults(run=generate)
    chk = commands.add_parser("check", help="validate params and run the stages' preflight",
                              description="Validate params.yaml (with a profile laid over it) and check what the "
                                          "stages will need: the machine (CUDA for 4-bit), the model, its tokenizer "
                                          "and the LoRA targets. Nothing is written.")
    chk.add_argument("--params", default=PARAMS_FILE, help="default: %(default)s")
    chk.add_argument("--profile", type=Path, help="a profile laid over the params, e.g. profiles/llama2-7b.yaml")
    chk.set_defaults(run=check)
    shw = commands.add_parser("show", help="the experiments, one line each",
                              description="A compact `dvc exp show`: each experiment's beta, loss, learning rates "
                                          "and steps, its held-out accuracy with the baselines it must beat, and "
                                          "its margins.")
    shw.add_argument("-A", "--all", action="store_true", help="experiments of every commit, not only HEAD's")
    shw.set_defaults(run=show)
    smr = commands.add_parser("summary", help="the run's result in three lines (what `make run` ends with)",
                              description="The held-out accuracy against its baselines, where the model, report "
                                          "and curves are, and what to try next.")
    smr.set_defaults(run=summary)
    vrf = commands.add_parser("verify", help="recompute evaluate's figures from the per-pair log-probs",
                              description="Recompute every figure of metrics/evaluate.json (accuracy, its "
                                          "interval, margins, rewards, the baselines) from the per-pair log-probs "
                                          "evaluate kept (metrics/evaluate_pairs.parquet) and the held-out pairs' "
                                          "texts, without the models; exits 1 when a recorded figure differs.")
    vrf.add_argument("--params", default=PARAMS_FILE, help="default: %(default)s")
    vrf.set_defaults(run=verify)
    return top


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(HubKernelNotice())  # before any model import
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except InvalidInput as exc:
        raise SystemExit(f"stack-dpo {args.command}: {exc}") from None


if __name__ == "__main__":
    main()
