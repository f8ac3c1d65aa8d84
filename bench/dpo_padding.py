"""DPO padding: the share of padded positions in the batches the dpo stage trains on, with pairs
grouped by length (dpo.group_by_length, the default) and in random order, over the training
pairs of one run (each pair once either way).

    python -m bench.dpo_padding [--rows 4000]

Two sets of pairs: the bundled sample with the default params (prepare's 112/240-token limits,
8 pairs a step), and synthetic rows of the real dataset's lengths (bench.data's mirror; the
recipe's 512/1024-token limits) with the 7B profile's 16 pairs a step, at the micro-batches the
fit chooses on 24, 80 and 141 GiB (1, 4 and 8 pairs). Padding is counted in the collated
batches themselves (DPOTrainer's collator pads a micro-batch's chosen and rejected sequences to
its longest), so it is exact: the same seed gives the same figures, and no repeats are needed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from bench.data import RECIPE_LIMITS, make_mirror
from bench.measure import REPO, header, table

SFT_STEPS = 2  # an SFT adapter to start DPO from; its weights do not change the padding


def workspace(root: Path, overrides: dict) -> Path:
    """fetch, prepare, a short sft and the reference stage on `overrides` over params.yaml."""
    from stack_dpo.params import deep_merge
    from stages import fetch, prepare, reference, sft
    from tests.conftest import inside

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    params["data"]["source"] = str(Path(params["data"]["source"]).resolve())
    params["model"]["name_or_path"] = str(REPO / params["model"]["name_or_path"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with inside(root) as loaded:
        for stage in (fetch, prepare, sft, reference):
            stage.run(loaded)
    return root


def pad_fractions(root: Path, micro_batches: list[int]) -> list[list]:
    """(micro-batch, random, grouped) pad fractions over one pass of the run's training pairs,
    each from a trainer built as the dpo stage builds it (the batch size is fixed at construction)."""
    from stack_dpo.dpo import build_trainer, dpo_config
    from stack_dpo.fit import Plan
    from stack_dpo.params import global_batch
    from tests.conftest import inside

    rows = []
    with inside(root) as params:
        per_step = global_batch(params.dpo.train, params.launch)
        for micro in micro_batches:
            row = [micro]
            for grouped in (False, True):
                setting = params.model_copy(update={"dpo": params.dpo.model_copy(update={"group_by_length": grouped})})
                plan = Plan(micro, per_step // micro, False, 0.0, 0.0, "")
                trainer = build_trainer(setting, dpo_config(setting, root / "out", plan), None)
                padded = total = 0
                for batch in trainer.get_train_dataloader():
                    mask = batch["attention_mask"]
                    assert len(mask) == 2 * micro, len(mask)  # the chosen and rejected sequences of `micro` pairs
                    padded, total = padded + (mask == 0).sum().item(), total + mask.numel()
                row.append(padded / total)
            rows.append([*row, row[2] / row[1], len(trainer.train_dataset)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="rl rows of the realistic mirror")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/dpo-padding")
    args = parser.parse_args()
    sft_short = {"train": {"max_steps": SFT_STEPS, "save_steps": SFT_STEPS, "eval_steps": SFT_STEPS}}
    sample = workspace(args.workdir / "sample", {"sft": sft_short})
    mirror = make_mirror(args.workdir / f"mirror-{args.rows}", args.rows)
    realistic = workspace(args.workdir / "realistic", {
        "data": {"source": str(mirror)}, "prepare": {**RECIPE_LIMITS}, "fetch": {"max_rows": {"evaluation": 64}},
        "sft": {**sft_short, "seq_length": 1024},
        "dpo": {"train": {"max_steps": 50, "per_device_train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                          "global_batch_size": 16}}})
    headers = ["micro-batch (pairs)", "pad share, random order", "pad share, grouped by length", "grouped / random",
               "training pairs"]
    print(header("DPO padding, bundled sample, default params (8 pairs a step)",
                 f"python -m bench.dpo_padding --rows {args.rows}"))
    print(table(headers, pad_fractions(sample, [8])))
    print(header(f"DPO padding, {args.rows:,} synthetic rows of the dataset's lengths, the recipe's limits, "
                 "16 pairs a step (the 7B profile)", f"python -m bench.dpo_padding --rows {args.rows}"))
    print(table(headers, pad_fractions(realistic, [1, 4, 8])))


if __name__ == "__main__":
    main()
