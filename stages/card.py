"""The model card of models/merged, through huggingface_hub's ModelCard / ModelCardData."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from stages.params import Params

DATASET = "lvwerra/stack-exchange-paired"
TEMPLATE = """---
{{ card_data }}
---
# {{ model_name }}

{{ base_model_name }} aligned with human preferences by the stack-dpo pipeline, which follows TRL's
"DPO with Llama 2" recipe: supervised fine-tuning of a LoRA adapter on the `finetune` split of
{{ dataset }}, Direct Preference Optimization (beta = {{ beta }}) on its `rl` split with the SFT
model as the reference, and both adapters merged into the 16-bit base.

{{ body }}
"""


def model_card(params: Params, metrics: dict | None = None, body: str = "") -> ModelCard:
    """The card; with `metrics` (metrics/evaluate.json) it carries a model-index."""
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(task_type="text-generation", dataset_type=DATASET, dataset_name="stack-exchange-paired",
                       dataset_split="evaluation", metric_type=key, metric_name=key, metric_value=metrics[key])
            for key in ("rewards/accuracies", "rewards/margins")
        ]
    name = params.push.repo_id or "stack-dpo merged model"
    data = ModelCardData(
        base_model=params.model.name_or_path,
        datasets=[DATASET],
        tags=["trl", "sft", "dpo", "lora"],
        license=params.push.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=name,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=name, base_model_name=params.model.name_or_path,
        dataset=DATASET, beta=params.dpo.beta, body=body,
    )
