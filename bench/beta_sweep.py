"""A beta sweep: the reference log-probs depend only on the SFT model and the data, so a rerun of
dpo after changing only dpo.beta reuses them (the DVC-tracked output of the reference stage)
instead of recomputing them.

    python -m bench.beta_sweep

In a fresh clone with the default (tiny) params: fetch, prepare, sft; then the first DPO run
(reference + dpo, beta 0.1); then beta 0.2 (DVC skips reference, reruns dpo); then beta 0.2
again with the reference log-probs recomputed from scratch, whose metrics must be identical.
Goal: the beta rerun takes at most 0.8x the first run's DPO time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from bench.measure import REPO, dvc, fresh_clone, machine, table, verdict

RUNTIME_KEYS = ("train_runtime_s",)


def set_beta(clone: Path, beta: float) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["dpo"]["beta"] = beta
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def results(clone: Path) -> dict:
    dpo = json.loads((clone / "metrics/dpo.json").read_text())
    evaluation = json.loads((clone / "metrics/evaluate.json").read_text())
    return {"dpo": {k: v for k, v in dpo.items() if k not in RUNTIME_KEYS}, "evaluate": evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/beta-sweep")
    args = parser.parse_args()
    clone = fresh_clone(args.workdir)
    dvc(clone, "repro", "sft")
    first = [dvc(clone, "repro", "--single-item", stage) for stage in ("reference", "dpo")]
    set_beta(clone, 0.2)
    rerun = [dvc(clone, "repro", "--single-item", stage) for stage in ("reference", "dpo")]
    assert "didn't change" in rerun[0].output and "Running stage 'reference'" not in rerun[0].output
    dvc(clone, "repro", "evaluate")
    reused = results(clone)
    shutil.rmtree(clone / "checkpoints/dpo")  # or the forced dpo would resume from its finished checkpoint
    recomputed_stages = [dvc(clone, "repro", "--force", "--single-item", stage) for stage in ("reference", "dpo")]
    dvc(clone, "repro", "--force", "--single-item", "merge")
    dvc(clone, "repro", "--force", "--single-item", "evaluate")
    recomputed = results(clone)
    first_s, rerun_s = sum(m.seconds for m in first), sum(m.seconds for m in rerun)
    print(f"\n## beta sweep on the default params ({machine()})\n")
    print(table(["run", "reference stage s", "dpo stage s", "total s"], [
        ["first (beta 0.1): reference computed", first[0].seconds, first[1].seconds, first_s],
        ["beta 0.2: reference reused (DVC skips it)", rerun[0].seconds, rerun[1].seconds, rerun_s],
        ["beta 0.2: reference recomputed (forced)", recomputed_stages[0].seconds, recomputed_stages[1].seconds,
         sum(m.seconds for m in recomputed_stages)],
    ]))
    same = reused == recomputed
    print(f"\nmetrics with reused reference: {json.dumps(reused['evaluate'])}")
    print(f"metrics with recomputed reference: {json.dumps(recomputed['evaluate'])}")
    print("\n## goals\n")
    ratio = rerun_s / first_s
    print(verdict("beta rerun / first DPO run (reference + dpo)", ratio, "<= 0.8", ratio <= 0.8))
    print(f"- metrics (metrics/dpo.json and metrics/evaluate.json) identical to the recomputed run: "
          f"{'MET' if same else 'NOT MET'}")


if __name__ == "__main__":
    main()
