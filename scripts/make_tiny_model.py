"""Build the embedded tiny base model (seeded, reproducible on one machine).

A Llama-architecture causal LM with its own byte-level BPE tokenizer, saved exactly like a
Hub model repo (config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, README.md), so the stages load it with the same
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` calls that load
meta-llama/Llama-2-7b-hf. Like Llama-2 it has <s>, </s> and <unk> and no pad token.

Its tokenizer is trained on the finetune and rl splits' texts; the model is briefly pre-trained
on the finetune split only (questions with both their answers), so that SFT and DPO start from a
model that knows the format and the language, as the 7B model does, but has no preference on
the problems the rl and evaluation splits ask about.

    python scripts/make_tiny_model.py [--data data/sample/stack-exchange-paired] \
        [--out data/sample/tiny-llama] [--seed 1234] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stack_dpo.dataset import sft_text  # the recipe's prompt template

VOCAB_SIZE = 4096
BLOCK = 256
ARCH = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048)

CARD = """---
license: mit
language: en
pipeline_tag: text-generation
tags: [llama, tiny, stack-dpo]
---
# tiny-llama (stack-dpo embedded base model)

A {n_params:,}-parameter Llama-architecture model with a {vocab}-token byte-level BPE tokenizer,
built by `scripts/make_tiny_model.py --seed {seed} --steps {steps}` from the bundled sample of
lvwerra/stack-exchange-paired. It stands in for meta-llama/Llama-2-7b-hf in CPU runs and
tests; it is not useful for anything else. Final pre-training loss: {loss:.3f}.
"""


def corpus(data_dir: Path, split: str) -> list[str]:
    table = pq.read_table(data_dir / "data" / split)
    rows = table.select(["question", "response_j", "response_k"]).to_pylist()
    return [sft_text(r["question"], r[key]) for r in rows for key in ("response_j", "response_k")]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: every encoded sequence starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    )


def blocks(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // BLOCK
    return torch.tensor(ids[: n * BLOCK]).view(n, BLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/sample/stack-exchange-paired")
    parser.add_argument("--out", default="data/sample/tiny-llama")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    texts = corpus(Path(args.data), "finetune")
    # The tokenizer knows the words of the training splits, as a real one knows the language; the
    # model is pre-trained on the finetune split only, so it has no preference on the rl problems.
    tokenizer = train_tokenizer(texts + corpus(Path(args.data), "rl"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, **ARCH,
    )
    model = LlamaForCausalLM(config)
    data = blocks(tokenizer, texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        batch = data[torch.randint(len(data), (args.batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        do_sample=True, temperature=0.6, top_p=0.9, max_length=2048,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(
        CARD.format(n_params=n_params, vocab=len(tokenizer), seed=args.seed, steps=args.steps, loss=loss.item())
    )
    print(json.dumps({"out": str(out), "params": n_params, "vocab": len(tokenizer), "loss": loss.item()}))


if __name__ == "__main__":
    main()
