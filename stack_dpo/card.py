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

from stack_dpo.dataset import format_prompt, generation_prompt
from stack_dpo.hub import HUB_ID
from stack_dpo.params import Params, global_batch
from stack_dpo.paths import DVCLIVE

DATASET = "lvwerra/stack-exchange-paired"
TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ base_model_description }} aligned with human preferences by the stack-dpo pipeline, which
follows TRL's "DPO with Llama 2" recipe: supervised fine-tuning of a LoRA adapter on the
`finetune` split of {{ dataset_description }}, Direct Preference Optimization (beta = {{ beta }},
loss {{ loss }}) on its `rl` split with the SFT model as the reference, and both adapters merged
into the 16-bit base.

## Usage

The model answers in the recipe's prompt format, `{{ prompt_format }}`, given without the closing
space: tokenized with the answer, that space joins the answer's first word, so the model was
trained on `Answer:` followed by the answer.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ model_id }}")
model = AutoModelForCausalLM.from_pretrained("{{ model_id }}", dtype="auto")
prompt = {{ example_prompt }}
inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

(or `stack-dpo generate --model {{ model_id }} "How do I undo the last git commit?"`)
{{ settings }}
## Limitations

- It learned which of two Stack Exchange answers people preferred; that is not a check of
  correctness, and it inherits the base model's and the answers' errors and biases.
- The held-out accuracy compares it with the SFT model on pairs of the same sites and period;
  it says nothing about other domains, languages or questions unlike the training data.
- A preference accuracy means something only beside its baselines (the longer answer, the
  answer with a code block, the SFT model's own preference), reported with it.
{{ limitation }}
{{ body }}
"""
TINY_MODEL_LIMITATION = ("- The base is the tiny Llama-architecture model bundled with stack-dpo for tests and a "
                         "CPU run in minutes: its answers are not useful; the pipeline, not the model, is what it "
                         "shows.")
# (title, file name, dvclive series) of the training curves shown in the card
PLOTS = [
    ("SFT loss", "sft_loss.png", [("train", "sft", "loss"), ("eval", "sft", "eval/loss")]),
    ("DPO loss", "dpo_loss.png", [("train", "dpo", "loss"), ("eval", "dpo", "eval/loss")]),
    ("DPO reward accuracy", "dpo_rewards_accuracies.png",
     [("train", "dpo", "rewards/accuracies"), ("eval", "dpo", "eval/rewards/accuracies")]),
    ("DPO reward margin", "dpo_rewards_margins.png",
     [("train", "dpo", "rewards/margins"), ("eval", "dpo", "eval/rewards/margins")]),
]


def loss_description(params: Params) -> str:
    """dpo.loss_type, with its weights when several are combined."""
    names, weights = params.dpo.loss_type, params.dpo.loss_weights
    return " + ".join(f"{w:g} x {name}" for name, w in zip(names, weights)) if weights else " + ".join(names)


def on_the_hub(name_or_path: str) -> bool:
    """A Hub id (not a local folder): what a model card may name as base model or dataset."""
    return bool(HUB_ID.match(name_or_path)) and not Path(name_or_path).exists()


def settings_table(params: Params) -> str:
    """The training settings that matter, for the pushed card."""
    lora, sft, dpo = params.sft.lora, params.sft.train, params.dpo.train
    rows = [("quantization while training", f"{params.model.quantization} ({params.model.dtype} compute)"),
            ("LoRA", f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, on {', '.join(lora.target_modules)}"),
            ("SFT", f"{sft.max_steps} steps, learning rate {sft.learning_rate}, "
                    f"{global_batch(sft, params.launch)} packed sequences of {params.sft.seq_length} tokens a step"),
            ("DPO", f"{dpo.max_steps} steps, beta {params.dpo.beta}, loss {loss_description(params)}, learning "
                    f"rate {dpo.learning_rate}, {global_batch(dpo, params.launch)} pairs a step"),
            ("length limits", f"prompt <= {params.prepare.max_prompt_length}, prompt + answer <= "
                              f"{params.prepare.max_length} tokens (longer pairs dropped, none truncated)")]
    return "\n## Training settings\n\n| | |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def model_card(params: Params, metrics: dict | None = None, body: str = "", for_hub: bool = False) -> ModelCard:
    """The card; with `metrics` (metrics/evaluate.json) it carries a model-index. The push
    settings (repo name, license) and the training settings go in only `for_hub`, so merge
    depends on the params it lists in dvc.yaml only. The base model and the dataset are named
    as Hub ids only when they are ones (the default's bundled tiny model and sample are not)."""
    base, source = params.model.name_or_path, params.data.source
    dataset_id = source if on_the_hub(source) else None
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(task_type="text-generation", dataset_type=dataset_id or "stack-dpo/bundled-sample",
                       dataset_name=(dataset_id or "the bundled sample of " + DATASET).split("/")[-1],
                       dataset_split="evaluation", metric_type=key, metric_name=key, metric_value=metrics[key])
            for key in ("rewards/accuracies", "rewards/margins")
        ]
    name = params.push.repo_id if for_hub else "stack-dpo merged model"
    data = ModelCardData(
        base_model=base if on_the_hub(base) else None,
        datasets=[dataset_id] if dataset_id else None,
        tags=["trl", "sft", "dpo", "lora"],
        license=params.push.license if for_hub else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=name,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=name, model_id=params.push.repo_id if for_hub else "models/merged",
        base_model_description=f"[{base}](https://huggingface.co/{base})" if on_the_hub(base)
        else f"The tiny Llama-architecture model bundled with stack-dpo (`{base}`, not on the Hub)",
        dataset_description=f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})" if dataset_id
        else f"the sample of {DATASET} bundled with stack-dpo (`{source}`, same format)",
        prompt_format=format_prompt("<question>").replace("\n", "\\n"),
        example_prompt=repr(generation_prompt(format_prompt("How do I undo the last git commit?"))),
        beta=params.dpo.beta, body=body, settings=settings_table(params) if for_hub else "",
        limitation="" if on_the_hub(base) else TINY_MODEL_LIMITATION,
        loss=loss_description(params),
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
            ax.set(title=title, xlabel="step")
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
