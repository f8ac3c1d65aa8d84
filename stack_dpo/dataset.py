"""The data this project reads and the texts it builds from it, each written once:

- RAW_SCHEMA: the columns and types of lvwerra/stack-exchange-paired (and of data/raw);
- SPLITS: its three splits, as params.data.splits names their folders;
- the seed recipe's prompt template, `Question: <question>\\n\\nAnswer: `, for DPO prompts, SFT
  texts (prompt + preferred answer) and, without its closing space, generation.
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("finetune", "rl", "evaluation")
RAW_SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("question", pa.string()),
        ("date", pa.string()),
        ("metadata", pa.list_(pa.string())),
        ("response_j", pa.string()),
        ("response_k", pa.string()),
    ]
)
PROMPT_TEMPLATE = "Question: {question}\n\nAnswer: "


def format_prompt(question: str) -> str:
    """The recipe's prompt for one question."""
    return PROMPT_TEMPLATE.format(question=question)


def generation_prompt(prompt: str) -> str:
    """The prompt a model answers from: the recipe's, without its closing space. Tokenized with
    the answer, that space joins the answer's first word (`Answer:` `ĠThe`), so SFT (whole texts)
    and TRL's DPO (the answer starts where prompt and prompt + answer diverge) train on
    `Answer:` then the answer; a lone space token ending the prompt is a context the model never
    saw. prepare checks that only whitespace diverges."""
    return prompt.rstrip(" ")


def format_prompts(questions: list[str]) -> list[str]:
    return [format_prompt(question) for question in questions]


def sft_text(question: str, answer: str) -> str:
    """An SFT example: the prompt followed by the preferred answer."""
    return format_prompt(question) + answer
