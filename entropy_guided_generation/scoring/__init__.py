"""Sequence scoring for uncertainty research: batched generation, teacher-forced log-probs under
the model and under the sampling policy (temperature + top-p), Rao-Blackwellized entropies,
distribution diagnostics, and functional parameter overrides theta + eta * v.

>>> from entropy_guided_generation.scoring import SequenceProcessor, GenerationConfig
>>> sp = SequenceProcessor(model, tokenizer, GenerationConfig(top_p=0.9, max_new_tokens=64))
>>> seqs = sp.generate_batched(["Question: 2 + 3?\\nAnswer:"], G=4, seed=0)
>>> scores = sp.teacher_force_logprobs(seqs, compute_rb=True)
"""
from entropy_guided_generation.generation.nucleus import nucleus_mask
from entropy_guided_generation.scoring.config import GenerationConfig, parse_processor_config
from entropy_guided_generation.scoring.diagnostics import (
    STEP_FIELDS,
    SUMMARY_STATS,
    DiagnosticsPack,
    DiagnosticsResults,
    DistributionDiagnostics,
    SequenceDiagnostics,
    SeriesSummary,
    TokenStepDiagnostics,
)
from entropy_guided_generation.scoring.forward import RegionLogits, region_logits
from entropy_guided_generation.scoring.overrides import ParamsOverrideBuilder, unwrap_model
from entropy_guided_generation.scoring.policy import PolicyDistribution, SamplingPolicy, entropy_of_log_probs
from entropy_guided_generation.scoring.precision import (
    ForwardProfile,
    OverrideProfile,
    PrecisionConfig,
    apply_global_precision,
)
from entropy_guided_generation.scoring.processor import SequenceProcessor
from entropy_guided_generation.scoring.prompts import (
    DATASET_REGISTRY,
    PromptExample,
    load_prompt_dataset,
    read_gsm8k_jsonl,
    register_gsm8k_jsonl,
    register_prompt_dataset,
    sample_prompts,
)
from entropy_guided_generation.scoring.results import BatchedSequences, LogprobResults
from entropy_guided_generation.scoring.rewards import RewardFn, extract_final_answer, gsm8k_answer_reward
from entropy_guided_generation.scoring.sampling_loop import SampledBatch, sample_with_policy
from entropy_guided_generation.scoring.stopping import StopStringMatcher
from entropy_guided_generation.scoring.token_scores import BASELINE_FEATURES, TokenScores, score_generated_tokens

__all__ = [
    "BASELINE_FEATURES",
    "DATASET_REGISTRY",
    "STEP_FIELDS",
    "SUMMARY_STATS",
    "BatchedSequences",
    "DiagnosticsPack",
    "DiagnosticsResults",
    "DistributionDiagnostics",
    "ForwardProfile",
    "GenerationConfig",
    "LogprobResults",
    "OverrideProfile",
    "ParamsOverrideBuilder",
    "PolicyDistribution",
    "PrecisionConfig",
    "PromptExample",
    "RegionLogits",
    "RewardFn",
    "SampledBatch",
    "SamplingPolicy",
    "SequenceDiagnostics",
    "SequenceProcessor",
    "SeriesSummary",
    "StopStringMatcher",
    "TokenScores",
    "TokenStepDiagnostics",
    "apply_global_precision",
    "entropy_of_log_probs",
    "extract_final_answer",
    "gsm8k_answer_reward",
    "load_prompt_dataset",
    "nucleus_mask",
    "parse_processor_config",
    "read_gsm8k_jsonl",
    "region_logits",
    "register_gsm8k_jsonl",
    "register_prompt_dataset",
    "sample_prompts",
    "sample_with_policy",
    "score_generated_tokens",
    "unwrap_model",
]
