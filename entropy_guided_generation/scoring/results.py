"""What a :class:`SequenceProcessor` returns: generated batches and teacher-forced scores.

Shapes: B prompts, G responses per prompt, rows ``[prompt left-padded to width P][response,
right-padded]`` of width L = P + T. ``[b][g]`` lists index prompt b, response g.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from entropy_guided_generation.scoring.prompts import PromptExample


@dataclass
class BatchedSequences:
    """Generated (or user-supplied) sequences, ready for teacher forcing.

    Attributes:
        sequences: ``[B, G, L]`` token ids: the prompt left-padded to width P, then the response;
            ``pad_id`` after each response.
        prompt_lens: ``[B]`` the padded prompt width P, the same for every prompt of the batch.
        gen_lens: ``[B][G]`` response tokens (the token that ended it, EOS or stop string, included).
        attention_masks: ``[B, G, L]`` long, 1 on real tokens (prompt and response), 0 on padding.
        responses_text: ``[B][G]`` decoded responses (special tokens left out).
        prompts: ``[B]`` prompt texts.
        gen_logqs: ``[B, G, T]`` log q of response token t under the sampling policy, recorded
            when it was drawn; NaN at t >= gen_lens[b][g]. None for user-supplied sequences.
        examples: ``[B]`` the prompt examples (reference answers for rewards), when known.
    """

    sequences: torch.Tensor
    prompt_lens: list[int]
    gen_lens: list[list[int]]
    attention_masks: torch.Tensor
    responses_text: list[list[str]]
    prompts: Optional[list[str]] = None
    gen_logqs: Optional[torch.Tensor] = None
    examples: Optional[list[PromptExample]] = None

    def __post_init__(self) -> None:
        if self.sequences.dim() != 3:
            raise ValueError(f"sequences must be [B, G, L], got shape {tuple(self.sequences.shape)}")
        b, g, width = self.sequences.shape
        if b == 0 or g == 0:
            raise ValueError(f"sequences hold no responses (shape {tuple(self.sequences.shape)}); expected B >= 1 prompts x G >= 1")
        if tuple(self.attention_masks.shape) != (b, g, width):
            raise ValueError(f"attention_masks has shape {tuple(self.attention_masks.shape)}, expected {(b, g, width)}")
        if len(self.prompt_lens) != b or len(set(self.prompt_lens)) > 1:
            raise ValueError(f"prompt_lens must repeat one padded prompt width for each of {b} prompts, got {self.prompt_lens}")
        if len(self.gen_lens) != b or any(len(row) != g for row in self.gen_lens):
            raise ValueError(f"gen_lens must be [B={b}][G={g}], got {[len(row) for row in self.gen_lens]}")
        room = width - self.prompt_lens[0]
        bad = [n for row in self.gen_lens for n in row if not 0 <= n <= room]
        if bad:
            raise ValueError(f"gen_lens must lie in [0, {room}] (row width {width} - prompt width {self.prompt_lens[0]}), got {bad[:5]}")

    @property
    def prompt_length(self) -> int:
        """P, the padded prompt width."""
        return self.prompt_lens[0]

    @property
    def num_prompts(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_responses(self) -> int:
        """G, responses per prompt."""
        return self.sequences.shape[1]


@dataclass
class LogprobResults:
    """Teacher-forced scores of the response tokens; every ``[b][g]`` entry has one value per
    response token (length ``gen_lens[b][g]``). All values in nats.

    Attributes:
        logprobs: log p(x_t) under the model's own distribution softmax(z_t) (tensors; with grad:
            on the model's device, carrying the graph; without: detached, on CPU).
        entropies: naive per-token entropy estimates: the surprisal -log p(x_t) (numpy).
        sequence_logprobs: sum over t of log p(x_t) (floats).
        rb_entropies: H(q_t), the entropy of the sampling policy's distribution at each step
            (Rao-Blackwellized; numpy), when ``compute_rb``.
        rewards: reward of each response, when computed (see ``generate_with_logprobs``).
        rb_entropies_torch: H(q_t) carrying the graph, when ``with_grad``, ``compute_rb`` and
            ``GenerationConfig.rb_requires_grad``.
        baseline_feats_torch: ``[T, 7]`` detached per-step baseline features (columns named by
            ``BASELINE_FEATURES``), when ``return_baseline_features``.
        token_logqs: log q(x_t) under the sampling policy (tensors, like ``logprobs``).
        sequence_logqs: sum over t of log q(x_t) (floats).
    """

    logprobs: list[list[torch.Tensor]]
    entropies: list[list[np.ndarray]]
    sequence_logprobs: list[list[float]]
    rb_entropies: Optional[list[list[np.ndarray]]] = None
    rewards: Optional[list[list[float]]] = None
    rb_entropies_torch: Optional[list[list[torch.Tensor]]] = None
    baseline_feats_torch: Optional[list[list[torch.Tensor]]] = None
    token_logqs: Optional[list[list[torch.Tensor]]] = None
    sequence_logqs: Optional[list[list[float]]] = None


__all__ = ["BatchedSequences", "LogprobResults"]
