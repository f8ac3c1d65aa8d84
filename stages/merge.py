"""merge: models/dpo merged into the 16-bit base -> models/merged (safetensors, tokenizer,
generation config, model card).

The base is always loaded unquantized, also with the 4-bit profile: merging LoRA deltas into
NF4 weights would round them back to 4 bits, and merging into dequantized NF4 weights (peft
issue 2105) gives a model that matches neither the base nor what was trained. The merge is
done in float32 and the result cast to merge.save_dtype. Before saving, the merged model's
logits are compared with the adapter model's on sample inputs; a difference beyond merge.atol
fails the stage and nothing is written.
"""

from __future__ import annotations

import logging

import pyarrow.parquet as pq
import torch

from stages.card import model_card
from stages.cli import main
from stages.modeling import DTYPES, load_adapter_model, load_tokenizer
from stages.outputs import atomic_dir, parquet_files, write_json_atomic
from stages.params import Params
from stages.paths import DPO_ADAPTER, DPO_DATA, MERGED, METRICS

log = logging.getLogger("stages.merge")


def sample_inputs(tokenizer, n: int) -> dict[str, torch.Tensor]:
    rows = pq.read_table(parquet_files(DPO_DATA / "eval")[0]).slice(0, n).to_pylist()
    texts = [row["prompt"] + row["chosen"] for row in rows]
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def merge(params: Params):
    """Returns (merged model, tokenizer, max |logit difference| against the adapter model)."""
    tokenizer = load_tokenizer(DPO_ADAPTER)
    model = load_adapter_model(params.model, DPO_ADAPTER, quantized=False, dtype=torch.float32)
    model.eval()
    inputs = {k: v.to(model.device) for k, v in sample_inputs(tokenizer, params.merge.check_samples).items()}
    mask = inputs["attention_mask"].bool()
    adapter_logits = model(**inputs).logits[mask]
    merged = model.merge_and_unload()
    merged_logits = merged(**inputs).logits[mask]
    return merged, tokenizer, (merged_logits - adapter_logits).abs().max().item()


def run(params: Params) -> float:
    merged, tokenizer, max_diff = merge(params)
    log.info("max |merged - adapter| logit difference on %d samples: %.2e", params.merge.check_samples, max_diff)
    if not max_diff <= params.merge.atol:
        raise RuntimeError(
            f"merge check failed: merged logits differ from the adapter model's by {max_diff:.3e} "
            f"> merge.atol = {params.merge.atol}; models/merged was not written"
        )
    merged = merged.to(DTYPES[params.merge.save_dtype])
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(MERGED) as tmp:
        merged.save_pretrained(tmp, max_shard_size=params.merge.max_shard_size)  # safetensors
        tokenizer.save_pretrained(tmp)
        model_card(params).save(tmp / "README.md")
    write_json_atomic(METRICS / "merge.json", {"max_logit_diff": max_diff, "check_samples": params.merge.check_samples})
    return max_diff


if __name__ == "__main__":
    main(run)
