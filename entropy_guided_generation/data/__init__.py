"""Training data: dataset builders that keep each example's response mask (torchtune-style
instruct/chat datasets from local JSON, GSM8K, BIG-Bench Mistake traces) and the collate that
pads them into batches for the interleaving layouts."""
from entropy_guided_generation.data.bigbench_mistake import (
    BIGBENCH_MISTAKE_TASKS,
    bigbench_mistake_dataset,
    trace_response,
)
from entropy_guided_generation.data.collate import padded_collate_with_response_mask
from entropy_guided_generation.data.gsm8k import GSM8K_MARKER, gsm8k_dataset, gsm8k_response
from entropy_guided_generation.data.sft import ResponseMaskedDataset, chat_dataset, instruct_dataset
from entropy_guided_generation.data.tokenize import tokenize_messages_with_response, tokenize_prompt_response

__all__ = [
    "BIGBENCH_MISTAKE_TASKS",
    "GSM8K_MARKER",
    "ResponseMaskedDataset",
    "bigbench_mistake_dataset",
    "chat_dataset",
    "gsm8k_dataset",
    "gsm8k_response",
    "instruct_dataset",
    "padded_collate_with_response_mask",
    "tokenize_messages_with_response",
    "tokenize_prompt_response",
    "trace_response",
]
