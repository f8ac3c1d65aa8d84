"""The model card of models/merged, through huggingface_hub's ModelCard / ModelCardData, and
the lineage it carries: params, dvc.lock hashes, git commit, training-curve plots.

Everything in it is a function of the run (no dates, no machine names), so pushing the same
model twice produces the same card and no second commit.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from stack_dpo.params import Params
from stack_dpo.paths import DVCLIVE

DATASET = "lvwerra/stack-exchange-paired"
TEMPLATE = """---
{{ card_data }}
---
# {{ model_name }}

{{ base_model_name }} aligned with human preferences by the stack-dpo pipeline, which follows TRL's
"DPO with Llama 2" recipe: supervised fine-tuning of a LoRA adapter on the `finetune` split of
{{ dataset }}, Direct Preference Optimization (beta = {{ beta }}, loss {{ loss }}) on its `rl` split with the SFT
model as the reference, and both adapters merged into the 16-bit base.

{{ body }}
"""
# (title, file name, dvclive series) of the training curves shown in the card
PLOTS = [
    ("SFT loss", "sft_loss.png", [("train", "sft", "loss"), ("eval", "sft", "eval/loss")]),
    ("DPO loss", "dpo_loss.png", [("train", "dpo", "loss"), ("eval", "dpo", "eval/loss")]),
    ("DPO reward accuracy", "dpo_rewards_accuracies.png",
     [("train", "dpo", "rewards/accuracies"), ("eval", "dpo", "eval/rewards/accuracies")]),
    ("DPO reward margin", "dpo_rewards_margins.png",
     [("train", "dpo", "rewards/margins"), ("eval", "dpo", "eval/rewards/margins")]),
]


def model_card(params: Params, metrics: dict | None = None, body: str = "", for_hub: bool = False) -> ModelCard:
    """The card; with `metrics` (metrics/evaluate.json) it carries a model-index. The push
    settings (repo name, license) go in only `for_hub`, so merge does not depend on them."""
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(task_type="text-generation", dataset_type=DATASET, dataset_name="stack-exchange-paired",
                       dataset_split="evaluation", metric_type=key, metric_name=key, metric_value=metrics[key])
            for key in ("rewards/accuracies", "rewards/margins")
        ]
    name = params.push.repo_id if for_hub else "stack-dpo merged model"
    data = ModelCardData(
        base_model=params.model.name_or_path,
        datasets=[DATASET],
        tags=["trl", "sft", "dpo", "lora"],
        license=params.push.license if for_hub else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=name,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=name, base_model_name=params.model.name_or_path,
        dataset=DATASET, beta=params.dpo.beta, body=body,
        loss=" + ".join(f"{w:g} x {name}" if params.dpo.loss_weights else name for name, w in
                        zip(params.dpo.loss_type, params.dpo.loss_weights or [1.0] * len(params.dpo.loss_type))),
    )


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "stages", "flows",
                                "dvc.yaml", "params.yaml"], capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def lock_hashes(lock_file: Path = Path("dvc.lock")) -> list[tuple[str, str, str]]:
    """(stage, path, md5) of every data and model output recorded in dvc.lock."""
    if not lock_file.exists():
        return []
    lock = yaml.safe_load(lock_file.read_text()) or {}
    rows = []
    for stage, info in (lock.get("stages") or {}).items():
        for out in info.get("outs", []):
            if out.get("md5") and out["path"].startswith(("data/", "models/")):
                rows.append((stage, out["path"], out["md5"]))
    return rows


def render_plots(out_dir: Path, dvclive_dir: Path = DVCLIVE) -> list[tuple[str, str]]:
    """PNG training curves from the dvclive logs; returns (title, file name) of those drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for title, name, series in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        any_series = False
        for label, stage, metric in series:
            path = dvclive_dir / stage / "plots" / "metrics" / f"{metric}.tsv"
            if not path.exists():
                continue
            with path.open() as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            column = metric.rsplit("/", 1)[-1]
            ax.plot([int(r["step"]) for r in rows], [float(r[column]) for r in rows], label=label, marker=".")
            any_series = True
        if any_series:
            ax.set(title=title, xlabel="logging step")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / name, metadata={"Software": None})  # no version stamp: same run, same bytes
            drawn.append((title, name))
        plt.close(fig)
    return drawn


def recorded(metrics_file: str, key: str):
    """A value the stages recorded in metrics/<metrics_file>, or None."""
    path = Path("metrics") / metrics_file
    return json.loads(path.read_text()).get(key) if path.exists() else None


def lineage_body(params: Params, plots: list[tuple[str, str]], plot_dir: str = "plots") -> str:
    experiment = os.environ.get("DVC_EXP_NAME")
    lines = ["## Lineage", "", f"- git commit: `{git_commit()}`"]
    for label, source, metrics_file, key in (("dataset", params.data.source, "fetch.json", "revision"),
                                             ("base model", params.model.name_or_path, "sft.json",
                                              "base_model_revision")):
        revision = recorded(metrics_file, key)
        lines.append(f"- {label}: `{source}`" + (f" at revision `{revision}`" if revision else ""))
    if experiment:
        lines.append(f"- DVC experiment: `{experiment}`")
    lines += ["", "### Data and model hashes (dvc.lock)", "", "| stage | path | md5 |", "| --- | --- | --- |"]
    lines += [f"| {stage} | `{path}` | `{md5}` |" for stage, path, md5 in lock_hashes()]
    lines += ["", "### Training curves", ""]
    lines += [f"![{title}]({plot_dir}/{name})" for title, name in plots] or ["(no dvclive logs found)"]
    lines += ["", "### Parameters (params.yaml)", "", "```yaml",
              yaml.safe_dump(params.model_dump(), sort_keys=False).strip(), "```"]
    return "\n".join(lines)
