"""merge: models/dpo merged into the 16-bit base -> models/merged (safetensors, tokenizer,
generation config, model card) and metrics/merge.json.

The base is always loaded unquantized, also with the 4-bit profile: LoRA deltas merged into
NF4 weights would be rounded back to 4 bits. A QLoRA adapter was trained on the dequantized
NF4 weights, though, not on the 16-bit ones, so merging it into the 16-bit base adds the
quantization error it never saw (PEFT issue 2105, which recommends merging into the
quantized-then-dequantized weights instead). This project keeps the 16-bit base and measures
what the merge changed: metrics/merge.json holds the merge gap on held-out pairs, the model as
trained (the base as configured, NF4 with the 4-bit profile, + models/dpo) against the merged
model as saved: their preference accuracies (against the stored SFT reference) and their
mean and max logit difference. push refuses a model whose gap exceeds push.max_merge_gap.

The merge runs on the host, one LoRA layer at a time in float32 over the base in the dtype it is
stored in (stack_dpo.modeling.merged_model: no float32 copy of the model, nothing on the GPU),
and is checked before anything is saved: each merged layer's output must match the same layer
unmerged, in float32, within merge.rtol (relative to the largest output).

    python -m stages.merge     (or: dvc repro merge)
"""

from __future__ import annotations

import gc
import logging

from stack_dpo.card import model_card
from stack_dpo.entrypoint import main
from stack_dpo.merge import merge, merge_gap
from stack_dpo.outputs import atomic_dir, write_json_atomic
from stack_dpo.params import InvalidInput, Params
from stack_dpo.paths import MERGED, METRICS

log = logging.getLogger("stages.merge")


def run(params: Params) -> dict:
    merged, tokenizer, max_diff = merge(params)
    log.info("merge check: max relative |merged - adapter| output of a LoRA layer in float32: %.2e", max_diff)
    if not max_diff <= params.merge.rtol:  # deterministic: the same inputs fail again, so not retried
        raise InvalidInput(
            f"merge check failed: a merged layer's output differs from the adapter model's by {max_diff:.3e} "
            f"(relative) > merge.rtol = {params.merge.rtol}; models/merged was not written"
        )
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(MERGED, stale=METRICS / "merge.json") as tmp:
        merged.save_pretrained(tmp, max_shard_size=params.merge.max_shard_size)
        tokenizer.save_pretrained(tmp)
        del merged  # the gap loads the model as saved, on the device
        gc.collect()
        gap = merge_gap(params, tmp, tokenizer)
        log.info("merge gap on %d held-out pairs: %s", gap["pairs"], gap)
        model_card(params).save(tmp / "README.md")
    metrics = {"max_layer_diff": max_diff, **{f"gap/{key}": value for key, value in gap.items()}}
    write_json_atomic(METRICS / "merge.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run)

