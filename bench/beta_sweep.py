"""A beta sweep: the reference log-probs depend only on the SFT model and the data, so a rerun of
dpo after changing only dpo.beta reuses them (the DVC-tracked output of the reference stage)
instead of recomputing them.

    python -m bench.beta_sweep [--repeats 3]

In a fresh clone with the default (tiny) params: fetch, prepare, sft, reference once; then, interleaved,
`--repeats` times after one warm-up round, each with a new beta: a DPO run that computes the
reference log-probs (reference forced, dpo) and a DPO run that reuses them (only dpo.beta
changed: DVC skips reference, reruns dpo). Last, at the final beta, the reference is recomputed
from scratch: metrics/dpo.json and metrics/evaluate.json must be identical to the reused run's.
Goal: a run that reuses the reference takes at most 0.8x one that computes it (medians).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from bench.measure import REPO, dvc, fresh_clone, header, interleaved, ratio_spread, spread, table

RUNTIME_KEYS = ("train_runtime_s", "fit")  # what the machine took, not what the run computed (fit: its free memory)


def set_beta(clone: Path, beta: float) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["dpo"]["beta"] = beta
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def results(clone: Path) -> dict:
    dpo = json.loads((clone / "metrics/dpo.json").read_text())
    evaluation = json.loads((clone / "metrics/evaluate.json").read_text())
    return {"dpo": {k: v for k, v in dpo.items() if k not in RUNTIME_KEYS}, "evaluate": evaluation}


def dpo_run(clone: Path, beta: float, recompute_reference: bool) -> dict:
    """The reference and dpo stages at `beta`: seconds of each."""
    set_beta(clone, beta)
    shutil.rmtree(clone / "checkpoints/dpo", ignore_errors=True)  # a forced dpo would resume its finished run
    force = ["--force"] if recompute_reference else []
    reference = dvc(clone, "repro", *force, "--single-item", "reference")
    assert ("Running stage 'reference'" in reference.output) == recompute_reference, reference.output
    dpo = dvc(clone, "repro", "--force", "--single-item", "dpo")
    return {"reference_s": reference.seconds, "dpo_s": dpo.seconds, "total_s": reference.seconds + dpo.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/beta-sweep")
    args = parser.parse_args()
    clone = fresh_clone(args.workdir)
    dvc(clone, "repro", "reference")  # so that either setup can run first
    betas = iter([0.1 + 0.01 * i for i in range(100)])  # every DPO run trains with a beta of its own
    runs = interleaved({"reference computed": lambda: dpo_run(clone, next(betas), True),
                        "reference reused": lambda: dpo_run(clone, next(betas), False)}, args.repeats)
    beta = next(betas)
    dpo_run(clone, beta, False)
    dvc(clone, "repro", "evaluate")
    reused = results(clone)
    dpo_run(clone, beta, True)
    dvc(clone, "repro", "--force", "--single-item", "merge")
    dvc(clone, "repro", "--force", "--single-item", "evaluate")
    recomputed = results(clone)
    print(header(f"beta sweep on the default params, median (range) of {args.repeats} interleaved runs",
                 f"python -m bench.beta_sweep --repeats {args.repeats}"))
    print(table(["DPO run", "reference stage s", "dpo stage s", "total s"],
                [[name, spread(r, "reference_s"), spread(r, "dpo_s"), spread(r, "total_s")]
                 for name, r in runs.items()]))
    same = reused == recomputed
    print(f"\nmetrics at beta {beta:.2f}, reference reused: {json.dumps(reused['evaluate'])}")
    print(f"metrics at beta {beta:.2f}, reference recomputed: {json.dumps(recomputed['evaluate'])}")
    print("\n## goals\n")
    ratio, text = ratio_spread(runs["reference reused"], runs["reference computed"], "total_s")
    print(f"- DPO run reusing the reference / computing it: {text} (goal <= 0.8): "
          f"{'MET' if ratio <= 0.8 else 'NOT MET'}")
    print(f"- metrics (metrics/dpo.json and metrics/evaluate.json) identical to the recomputed run: "
          f"{'MET' if same else 'NOT MET'}")


if __name__ == "__main__":
    main()
