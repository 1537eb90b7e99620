"""SequenceProcessor: generate G responses per prompt, score them by teacher forcing, diagnose them.

Alignment: response token ``P + t`` of a row is scored by the logits at position ``P + t - 1``
(P = padded prompt width), under both the model's own distribution p and the sampling policy q
(temperature + top-p, renormalized) that generated it.

>>> sp = SequenceProcessor(model, tokenizer, GenerationConfig(temperature=0.7, top_p=0.9))
>>> seqs, scores, diags = sp.generate_with_logprobs(dataset_name="kit_gsm8k", num_prompts=4, G=2, seed=0)
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from entropy_guided_generation.generation.padding import left_pad, left_padded_mask
from entropy_guided_generation.modeling import is_torchtune_decoder, vocab_size_of
from entropy_guided_generation.scoring.config import ProcessorConfig, parse_processor_config
from entropy_guided_generation.scoring.diagnostics import DiagnosticsResults, DistributionDiagnostics
from entropy_guided_generation.scoring.forward import RegionLogits, at_least_fp32
from entropy_guided_generation.scoring.overrides import (
    BuffersMapping,
    ParamsMapping,
    ParamsOverrideBuilder,
    check_buffers_override,
    unwrap_model,
)
from entropy_guided_generation.scoring.policy import SamplingPolicy
from entropy_guided_generation.scoring.precision import apply_global_precision, forward_context
from entropy_guided_generation.scoring.prompts import (
    PromptExample,
    load_prompt_dataset,
    sample_prompts,
    sample_with_replacement,
)
from entropy_guided_generation.scoring.results import BatchedSequences, LogprobResults
from entropy_guided_generation.scoring.rewards import RewardFn, gsm8k_answer_reward
from entropy_guided_generation.scoring.sampling_loop import sample_with_policy
from entropy_guided_generation.scoring.stopping import StopStringMatcher, decode_ids, token_texts
from entropy_guided_generation.scoring.token_scores import (
    DEFAULT_CHUNK_ELEMENTS,
    RealTokens,
    TokenScores,
    score_real_tokens,
)
from entropy_guided_generation.tokenizing import encode_ids, eos_id_of, pad_id_of, stop_ids_of

PromptLike = Union[str, PromptExample]


def _nested(flat: Sequence[Any], num_prompts: int, num_responses: int) -> list[list[Any]]:
    """Row-major flat list (prompt-major) -> ``[B][G]``."""
    return [list(flat[b * num_responses : (b + 1) * num_responses]) for b in range(num_prompts)]


class SequenceProcessor:
    """Batched generation, teacher-forced scoring and diagnostics for one model and tokenizer.

    Args:
        model: a torchtune ``TransformerDecoder`` (generation is KV-cached), a Hugging Face causal
            LM, or any module mapping tokens ``[b, s]`` to logits ``[b, s, v]``; DDP is unwrapped.
            Its train/eval mode is left as it is (use eval mode for deterministic scores).
        tokenizer: a torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``eos_id``, ``pad_id``,
            optionally ``stop_tokens``) or a Hugging Face one (``pad_token_id``, else its
            ``eos_token_id``, pads; ``eos_token_id`` stops). See :mod:`entropy_guided_generation.tokenizing`.
        config: a :class:`GenerationConfig`, or ``{"generation": {...}, "precision": {...}}``
            (see :class:`~entropy_guided_generation.scoring.precision.PrecisionConfig`). Global
            precision knobs, when set, are applied to the process here.
        logger: where generation and scoring report batch counts (debug level); default: this
            module's logger.
        reward_fn: ``(response_text, example) -> float`` (default: GSM8K ``####`` answer match).
        diagnostics_window: steps in the early / late windows of per-sequence diagnostics.
        progress: show progress bars over generation and scoring batches.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: ProcessorConfig = None,
        *,
        logger: Optional[logging.Logger] = None,
        reward_fn: RewardFn = gsm8k_answer_reward,
        diagnostics_window: int = 8,
        progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = pad_id_of(tokenizer)  # raises when the tokenizer has none
        self.eos_id = eos_id_of(tokenizer)
        self.logger = logger if logger is not None else logging.getLogger(__name__)
        self.config, self.precision = parse_processor_config(config)
        apply_global_precision(self.precision)
        self._mdl_target = unwrap_model(model)
        self._overrides = ParamsOverrideBuilder(self._mdl_target, self.precision.func_override)
        self._region = RegionLogits(self._mdl_target)
        self.reward_fn = reward_fn
        self.diagnostics_window = diagnostics_window
        self.progress = progress
        self._stop_matchers: dict[tuple[str, ...], list[StopStringMatcher]] = {}

    # ------------------------------------------------------------------ policy and settings
    @property
    def policy(self) -> SamplingPolicy:
        """The sampling policy q of ``self.config`` (read each time, so config edits apply)."""
        return self.config.policy(self.precision.entropy_dtype)

    @property
    def distribution_diagnostics(self) -> DistributionDiagnostics:
        """Diagnostics under :attr:`policy`, reporting the tokenizer's EOS probability."""
        return DistributionDiagnostics.for_policy(self.policy, self.eos_id, self.diagnostics_window)

    @property
    def device(self) -> torch.device:
        return next(self._mdl_target.parameters()).device

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a response: the tokenizer's ``stop_tokens`` if it has them, else its EOS."""
        return stop_ids_of(self.tokenizer)

    def _matchers(self) -> list[StopStringMatcher]:
        key = tuple(self.config.stop_strings)
        if key not in self._stop_matchers:
            texts = token_texts(self.tokenizer, self._vocab_size()) if key else []
            self._stop_matchers[key] = [StopStringMatcher(s, texts, self.device) for s in key]
        return self._stop_matchers[key]

    def _vocab_size(self) -> int:
        size = vocab_size_of(self._mdl_target)
        if size is None:
            raise ValueError(
                f"cannot read the vocabulary size of a {type(self._mdl_target).__name__}; stop strings need it "
                "(give the model an output/lm_head weight, or set generation.stop_strings to [])"
            )
        return size

    # ------------------------------------------------------------------ generation
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids ``[B, P]`` and their mask ``[B, P]`` (True on real tokens)."""
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        ids = [encode_ids(self.tokenizer, p, add_bos=True) for p in prompts]
        empty = [i for i, row in enumerate(ids) if len(row) == 0]
        if empty:
            raise ValueError(f"prompts {empty} encode to no tokens")
        tokens = left_pad(ids, self.pad_id, device=self.device)
        lengths = torch.tensor([len(row) for row in ids], device=self.device)
        return tokens, left_padded_mask(lengths, tokens.shape[1])

    def generate_batched(
        self,
        prompts: Sequence[str],
        G: Optional[int] = None,
        gen_batch_size: Optional[int] = None,
        *,
        seed: Optional[int] = None,
        rng: Optional[torch.Generator] = None,
    ) -> BatchedSequences:
        """Generate G responses to each prompt under :attr:`policy`.

        Rows (prompt x response, prompt-major) are generated ``gen_batch_size`` at a time; each
        stops at a stop token (EOS) or after the token that completes a ``stop_strings`` entry,
        or after ``max_new_tokens``.

        Args:
            prompts: B prompt texts.
            G: responses per prompt (default ``config.num_return_sequences``).
            gen_batch_size: rows per generation batch (default ``config.gen_batch_size``).
            seed: seeds a fresh generator for the draws (ignored when ``rng`` is given).
            rng: generator on the model's device for the draws.
        """
        G = G if G is not None else self.config.num_return_sequences
        batch_size = gen_batch_size or self.config.gen_batch_size
        if not isinstance(G, int) or G < 1:
            raise ValueError(f"G must be a positive int, got {G!r}")
        if rng is None and seed is not None:
            rng = torch.Generator(device=self.device).manual_seed(seed)
        prompt_ids, prompt_valid = self.encode_prompts(prompts)
        rows, rows_valid = prompt_ids.repeat_interleave(G, 0), prompt_valid.repeat_interleave(G, 0)
        policy, matchers, pad = self.policy, self._matchers(), self.pad_id
        parts = []
        starts = range(0, rows.shape[0], batch_size)
        for start in tqdm(starts, desc="generate", disable=not self.progress or len(starts) < 2, leave=False):
            parts.append(
                sample_with_policy(
                    self.model, rows[start : start + batch_size], prompt_mask=rows_valid[start : start + batch_size],
                    policy=policy, max_new_tokens=self.config.max_new_tokens, pad_id=pad,
                    stop_token_ids=self.stop_token_ids, stop_strings=matchers, rng=rng,
                )
            )
        self.logger.debug("generated %d prompts x G=%d rows in %d batches", len(prompts), G, len(parts))
        return self._assemble_generated(list(prompts), G, rows, rows_valid, parts)

    def _assemble_generated(self, prompts, G, rows, rows_valid, parts) -> BatchedSequences:
        width = max(p.log_q.shape[1] for p in parts)
        prompt_width = rows.shape[1]
        pad = self.pad_id

        def right_pad(x: torch.Tensor, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        generated = torch.cat([right_pad(p.tokens[:, prompt_width:], pad) for p in parts])
        log_q = torch.cat([right_pad(p.log_q, float("nan")) for p in parts])
        lengths = torch.cat([p.lengths for p in parts])
        gen_valid = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        B = len(prompts)
        texts = [decode_ids(self.tokenizer, row[:n]) for row, n in zip(generated.tolist(), lengths.tolist())]
        return BatchedSequences(
            sequences=torch.cat([rows, generated], dim=1).view(B, G, -1),
            prompt_lens=[prompt_width] * B,
            gen_lens=_nested(lengths.tolist(), B, G),
            attention_masks=torch.cat([rows_valid, gen_valid], dim=1).long().view(B, G, -1),
            responses_text=_nested(texts, B, G),
            prompts=prompts,
            gen_logqs=log_q.view(B, G, width),
        )

    # ------------------------------------------------------------------ parameter overrides
    def build_params_override(self, v_named: Mapping[str, torch.Tensor], eta: float) -> ParamsMapping:
        """theta + eta * v as a params-only mapping for ``torch.func.functional_call`` on the model
        (tied weights once, under their canonical name; eta = 0 gives the cached zero mapping,
        which must not be mutated). See :class:`~entropy_guided_generation.scoring.overrides.ParamsOverrideBuilder`."""
        return self._overrides.build(v_named, eta)

    _build_params_override = build_params_override  # the seed's name (SequenceProcessor documentation)

    # ------------------------------------------------------------------ teacher forcing
    def _forward_scope(self, with_grad: bool, override: bool):
        profile = self.precision.func_override if override else (
            self.precision.tf_withgrad if with_grad else self.precision.tf_nograd
        )
        grad = contextlib.nullcontext() if with_grad else torch.no_grad()
        stack = contextlib.ExitStack()
        stack.enter_context(grad)
        stack.enter_context(forward_context(profile.autocast, profile.dtype, self.device))
        if is_torchtune_decoder(self._mdl_target) and self._mdl_target.caches_are_enabled():
            from torchtune.modules.common_utils import disable_kv_cache

            stack.enter_context(disable_kv_cache(self._mdl_target))
        return stack

    def _region_tokens(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        prompt_width: int,
        params_override: Optional[ParamsMapping],
        buffers_override: Optional[BuffersMapping],
    ) -> RealTokens:
        """One teacher-forcing batch ``tokens`` ``[n, L]`` through the model (trailing padding
        trimmed first): its real generated tokens with the logits that produced them."""
        width = prompt_width + max(int(lengths.max()), 1)
        tokens, mask = tokens[:, :width], mask[:, :width].bool()
        logits = self._region.with_params(params_override, tokens, mask, prompt_width, buffers=buffers_override)
        return RealTokens.from_region(at_least_fp32(logits), tokens[:, prompt_width:], lengths)

    def _teacher_force(
        self,
        sequences: BatchedSequences,
        *,
        with_grad: bool,
        tf_batch_size: Optional[int],
        compute_rb: bool,
        return_baseline_features: bool,
        params_override: Optional[ParamsMapping],
        buffers_override: Optional[BuffersMapping],
        with_diagnostics: bool,
    ) -> tuple[LogprobResults, Optional[DiagnosticsResults]]:
        """Forwards run ``tf_batch_size`` rows at a time; the vocabulary math runs on the real tokens
        of as many forward batches as fill one scoring chunk (``DEFAULT_CHUNK_ELEMENTS`` logits),
        so small batches do not each pay its fixed per-op cost."""
        B, G, L = sequences.sequences.shape
        prompt_width = sequences.prompt_length
        if buffers_override is not None:
            check_buffers_override(self._mdl_target, buffers_override)
        if prompt_width >= L:
            raise ValueError(f"sequences have no response columns (width {L}, prompt width {prompt_width})")
        rows = sequences.sequences.reshape(B * G, L).to(self.device)
        masks = sequences.attention_masks.reshape(B * G, L).to(self.device)
        lengths = torch.tensor([n for row in sequences.gen_lens for n in row], device=self.device)
        batch_size = tf_batch_size or self.config.tf_batch_size
        diagnostics = self.distribution_diagnostics if with_diagnostics else None
        keep_rb_graph = with_grad and compute_rb and self.config.rb_requires_grad

        per_row: dict[str, list] = {k: [] for k in ("log_p", "surprisal", "log_q", "rb", "rb_torch", "baseline", "sum_p", "sum_q")}
        step_diagnostics: list[dict[str, torch.Tensor]] = []
        waiting: list[RealTokens] = []

        def score_waiting() -> None:
            scores = score_real_tokens(
                RealTokens.cat(waiting), self.policy,
                rb=compute_rb, diagnostics=diagnostics, baseline=return_baseline_features,
                chunk_elements=DEFAULT_CHUNK_ELEMENTS,
            )
            waiting.clear()
            self._collect(per_row, scores, with_grad=with_grad, keep_rb_graph=keep_rb_graph)
            if diagnostics is not None:
                step_diagnostics.append(scores.diagnostics)

        starts = range(0, rows.shape[0], batch_size)
        if self.progress and len(starts) > 1:
            starts = tqdm(starts, desc="teacher-force", leave=False)
        overridden = params_override is not None or buffers_override is not None
        with self._forward_scope(with_grad, overridden):
            for start in starts:
                stop = start + batch_size
                waiting.append(self._region_tokens(
                    rows[start:stop], masks[start:stop], lengths[start:stop], prompt_width, params_override, buffers_override
                ))
                if stop >= rows.shape[0] or sum(part.logits.numel() for part in waiting) >= DEFAULT_CHUNK_ELEMENTS:
                    score_waiting()
        self.logger.debug(
            "teacher-forced %d rows, %d per forward (with_grad=%s, functional override=%s)", B * G, batch_size, with_grad, overridden
        )

        def nest(key: str) -> list[list[Any]]:
            return _nested(per_row[key], B, G)

        results = LogprobResults(
            logprobs=nest("log_p"),
            entropies=nest("surprisal"),
            sequence_logprobs=nest("sum_p"),
            rb_entropies=nest("rb") if compute_rb else None,
            rb_entropies_torch=nest("rb_torch") if keep_rb_graph else None,
            baseline_feats_torch=nest("baseline") if return_baseline_features else None,
            token_logqs=nest("log_q"),
            sequence_logqs=nest("sum_q"),
        )
        diag = None
        if diagnostics is not None:  # all rows' summaries in one pass: steps are row-major across batches
            flat = {name: torch.cat([batch[name] for batch in step_diagnostics]) for name in step_diagnostics[0]}
            diag = DiagnosticsResults(diagnostics=_nested(diagnostics.packs_from_flat(flat, lengths), B, G))
        return results, diag

    @staticmethod
    def _collect(per_row: dict, scores: TokenScores, *, with_grad: bool, keep_rb_graph: bool) -> None:
        """Append one batch's per-row outputs (the only loop over rows: building the result lists)."""

        def as_output(values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return scores.per_row(values if with_grad else values.detach().cpu())

        per_row["log_p"].extend(as_output(scores.log_p))
        per_row["surprisal"].extend(v.numpy() for v in scores.per_row(-scores.log_p.detach().cpu()))
        per_row["log_q"].extend(as_output(scores.log_q))
        per_row["sum_p"].extend(_row_sums(scores, scores.log_p))
        per_row["sum_q"].extend(_row_sums(scores, scores.log_q))
        if scores.rb_entropy is not None:
            per_row["rb"].extend(v.numpy() for v in scores.per_row(scores.rb_entropy.detach().cpu()))
            if keep_rb_graph:
                per_row["rb_torch"].extend(scores.per_row(scores.rb_entropy))
        if scores.baseline is not None:
            per_row["baseline"].extend(scores.per_row(scores.baseline.detach()))

    def teacher_force_logprobs(
        self,
        sequences: BatchedSequences,
        with_grad: bool = False,
        tf_batch_size: Optional[int] = None,
        compute_rb: bool = False,
        return_baseline_features: bool = False,
        params_override: Optional[ParamsMapping] = None,
        buffers_override: Optional[BuffersMapping] = None,
    ) -> LogprobResults:
        """Score every response token by teacher forcing.

        Args:
            sequences: rows to score (from :meth:`generate_batched` or built by hand).
            with_grad: keep the graph: ``logprobs`` / ``token_logqs`` (and ``rb_entropies_torch``
                with ``rb_requires_grad``) stay on device, differentiable w.r.t. the parameters.
            tf_batch_size: rows per forward (default ``config.tf_batch_size``).
            compute_rb: compute H(q_t) under the sampling policy.
            return_baseline_features: add ``[T, 7]`` per-step baseline features.
            params_override: run the forward through ``torch.func.functional_call`` with this
                mapping (e.g. :meth:`build_params_override`). The forward then uses the
                ``func_override`` precision profile.
            buffers_override: ``{buffer name: tensor}`` for the same functional forward (names as
                ``model.named_buffers()`` gives them; buffers not named, and every buffer when None,
                stay the live module's).

        Returns:
            :class:`LogprobResults` (``rewards`` None: see :meth:`generate_with_logprobs`).
        """
        results, _ = self._teacher_force(
            sequences, with_grad=with_grad, tf_batch_size=tf_batch_size, compute_rb=compute_rb,
            return_baseline_features=return_baseline_features, params_override=params_override,
            buffers_override=buffers_override, with_diagnostics=False,
        )
        return results

    def teacher_force_logprobs_with_diagnostics(
        self,
        sequences: BatchedSequences,
        with_grad: bool = False,
        tf_batch_size: Optional[int] = None,
        compute_rb: bool = False,
        return_baseline_features: bool = False,
        params_override: Optional[ParamsMapping] = None,
        buffers_override: Optional[BuffersMapping] = None,
    ) -> tuple[LogprobResults, DiagnosticsResults]:
        """:meth:`teacher_force_logprobs` plus per-step and per-sequence diagnostics under the
        sampling policy (see :mod:`~entropy_guided_generation.scoring.diagnostics`)."""
        results, diagnostics = self._teacher_force(
            sequences, with_grad=with_grad, tf_batch_size=tf_batch_size, compute_rb=compute_rb,
            return_baseline_features=return_baseline_features, params_override=params_override,
            buffers_override=buffers_override, with_diagnostics=True,
        )
        return results, diagnostics

    # ------------------------------------------------------------------ end to end
    def compute_rewards(self, sequences: BatchedSequences, examples: Sequence[PromptExample]) -> list[list[float]]:
        """``reward_fn(response, example)`` for every response ``[B][G]``."""
        if len(examples) != sequences.num_prompts:
            raise ValueError(f"got {len(examples)} examples for {sequences.num_prompts} prompts")
        return [
            [float(self.reward_fn(text, example)) for text in responses]
            for responses, example in zip(sequences.responses_text, examples)
        ]

    def _examples(self, prompts, answers, dataset_name, split, num_prompts, seed) -> list[PromptExample]:
        if prompts is None:
            if dataset_name is None or num_prompts is None:
                raise ValueError("give either prompts, or dataset_name and num_prompts")
            return sample_prompts(dataset_name, split, num_prompts, seed)
        if dataset_name is not None:
            raise ValueError(f"give either prompts or dataset_name, not both (dataset_name={dataset_name!r})")
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts")
        examples = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, PromptExample):
                if answers is not None:
                    raise ValueError("answers= is for prompt strings; PromptExample prompts carry their own answer")
                examples.append(prompt)
            else:
                examples.append(PromptExample(prompt=prompt, answer=None if answers is None else answers[i]))
        return examples

    def generate_with_logprobs(
        self,
        prompts: Optional[Sequence[PromptLike]] = None,
        G: Optional[int] = None,
        dataset_name: Optional[str] = None,
        split: str = "train",
        num_prompts: Optional[int] = None,
        seed: Optional[int] = None,
        with_grad: bool = False,
        gen_batch_size: Optional[int] = None,
        tf_batch_size: Optional[int] = None,
        compute_rb: bool = False,
        *,
        answers: Optional[Sequence[str]] = None,
        compute_rewards: Optional[bool] = None,
    ) -> tuple[BatchedSequences, LogprobResults, DiagnosticsResults]:
        """Prompts -> G responses each -> teacher-forced scores, diagnostics and rewards.

        Args:
            prompts: prompt texts or :class:`PromptExample` s; or None to draw ``num_prompts``
                from the registered dataset ``dataset_name`` / ``split`` with ``seed``.
            G: responses per prompt (default ``config.num_return_sequences``).
            seed: seeds the prompt draw and the generation.
            answers: reference answers for string prompts (for rewards).
            compute_rewards: True / False; None (default) computes rewards exactly when every
                prompt has a reference answer.
            with_grad, gen_batch_size, tf_batch_size, compute_rb: as in :meth:`generate_batched`
                and :meth:`teacher_force_logprobs`.
        """
        examples = self._examples(prompts, answers, dataset_name, split, num_prompts, seed)
        sequences = self.generate_batched([e.prompt for e in examples], G, gen_batch_size, seed=seed)
        sequences.examples = examples
        results, diagnostics = self.teacher_force_logprobs_with_diagnostics(
            sequences, with_grad=with_grad, tf_batch_size=tf_batch_size, compute_rb=compute_rb
        )
        if compute_rewards is None:
            compute_rewards = all(e.answer is not None for e in examples)
        if compute_rewards:
            results.rewards = self.compute_rewards(sequences, examples)
        return sequences, results, diagnostics

    def generate_with_replacement_sampling(
        self,
        total_sequences: int,
        dataset_name: str,
        split: str = "train",
        max_prompts_pool: Optional[int] = None,
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> tuple[BatchedSequences, LogprobResults, DiagnosticsResults]:
        """``total_sequences`` independent draws: prompts sampled with replacement from the first
        ``max_prompts_pool`` examples of the dataset (all when None), one response each (G = 1).

        ``kwargs`` go to :meth:`generate_with_logprobs` (``with_grad``, ``compute_rb``, batch sizes, ...).
        """
        if kwargs.get("G", 1) != 1:
            raise ValueError(f"replacement sampling draws one response per prompt draw (G=1), got G={kwargs['G']}")
        kwargs.pop("G", None)
        pool = load_prompt_dataset(dataset_name, split)
        if max_prompts_pool is not None:
            if not isinstance(max_prompts_pool, int) or max_prompts_pool < 1:
                raise ValueError(f"max_prompts_pool must be a positive int or None, got {max_prompts_pool!r}")
            pool = pool[:max_prompts_pool]
        examples = sample_with_replacement(pool, total_sequences, seed)
        return self.generate_with_logprobs(prompts=examples, G=1, seed=seed, **kwargs)


def _row_sums(scores: TokenScores, values: torch.Tensor) -> list[float]:
    """Per-row sums of flat ``values`` as floats (one index_add, no loop over rows)."""
    n = scores.lengths.numel()
    rows = torch.repeat_interleave(torch.arange(n, device=values.device), scores.lengths.to(values.device))
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, rows, values.detach())
    return sums.tolist()


__all__ = ["SequenceProcessor"]
