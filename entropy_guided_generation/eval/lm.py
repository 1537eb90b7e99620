"""An lm-eval model over a torchtune decoder, in any interleaving mode (lm-eval's ``egg_torchtune``).

Three methods, as lm-eval's ``LM`` asks:

- ``loglikelihood`` / ``loglikelihood_rolling``: interleaved teacher forcing with exact
  fixed-point bins (:func:`~entropy_guided_generation.eval.teacher_forcing.score_continuations`);
- ``generate_until``: our decoders (``get_decoder(mode)``, or in mode none the decoder a YAML
  ``sampler: {name: ..., <its settings>}`` names, called with ``sampler_config=<its settings>``),
  batched and left-padded; confidence tokens never reach the returned text. Requests whose
  gen_kwargs name budget forcing are served by it (:mod:`~entropy_guided_generation.sampling.budget_forcing`).

Every request also leaves a :class:`~entropy_guided_generation.eval.traces.ConfidenceTrace` in
:attr:`TorchtuneLM.traces`. With a :attr:`TorchtuneLM.request_cache`, every answer is committed as
it finishes and answers found there are not computed again
(:mod:`~entropy_guided_generation.eval.request_cache`). Mode ``none`` reproduces lm-eval's ``hf``
model (same tokenization, truncation, prefix token, scoring and greedy decoding). Under torchrun (a process group initialized
before the model is built) the model reports its rank and world size and lm-eval splits the requests
across ranks (:class:`~entropy_guided_generation.eval.distributed.DataParallelLM`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

# Importing the sampling package registers its decoders (e.g. ``entropix``) with ``register_decoder``.
from entropy_guided_generation import sampling  # noqa: F401
from entropy_guided_generation.confidence import ConfidenceCodec
from entropy_guided_generation.eval.distributed import DataParallelLM
from entropy_guided_generation.generation.gen_kwargs import (
    DecodeSettings,
    cut_at_stop,
    decode_settings,
    fill_static_batch,
    first_rows,
    tokens_covering,
)
from entropy_guided_generation.eval.request_cache import RequestCache, split_answered
from entropy_guided_generation.eval.teacher_forcing import ContinuationScores, score_continuations
from entropy_guided_generation.eval.traces import ConfidenceTrace
from entropy_guided_generation.generation import DecodeResult, PromptBinsCache, decoder_extras, get_decoder, has_plain_twin, left_pad
from entropy_guided_generation.modes import Interleaving
from entropy_guided_generation.sampling.budget_forcing import (
    BudgetForcedOutput,
    budget_force_torchtune,
    budget_forcing_requested,
    serve_generate_until,
)

log = logging.getLogger(__name__)

MODEL_NAME = "egg_torchtune"


def sampler_decoder(sampler: Mapping[str, Any]) -> tuple[str, Any, dict]:
    """``(name, decoder, sampler_config)`` of a YAML ``sampler: {name: <registered decoder>, ...}``.

    The decoder is ``get_decoder(name)`` (the sampling package, imported above, registers its samplers);
    ``sampler_config`` is the rest of the section.

    Raises:
        ValueError: without a ``name``, or naming no registered decoder (the error lists them).
    """
    config = dict(sampler)
    name = config.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"sampler needs a 'name' (a registered decoder, e.g. entropix), got {dict(sampler)!r}")
    return name, get_decoder(name), config


@dataclass
class DecodeStats:
    """Content tokens generated for lm-eval requests and the seconds the decoder calls took
    (filler rows of a static batch not counted)."""

    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> Optional[float]:
        return self.tokens / self.seconds if self.seconds > 0 else None

    @classmethod
    def across_ranks(cls, per_rank: Sequence["DecodeStats"]) -> "DecodeStats":
        """Ranks decode side by side: tokens add up, seconds are the slowest rank's."""
        return cls(tokens=sum(s.tokens for s in per_rank), seconds=max((s.seconds for s in per_rank), default=0.0))


@dataclass(frozen=True)
class RequestKey:
    """Where a request comes from: lm-eval task, document and request index (None outside lm-eval)."""

    task: Optional[str]
    doc_id: Optional[int]
    index: int

    @classmethod
    def of(cls, instance: Any) -> "RequestKey":
        return cls(getattr(instance, "task_name", None), getattr(instance, "doc_id", None), getattr(instance, "idx", 0))


@dataclass
class ScoredContinuation:
    """One scored (context, continuation): its log-likelihood, greedy flag and per-token record ``[T]``."""

    logprob: float
    is_greedy: bool
    tokens: torch.Tensor
    bins: torch.Tensor
    signal: torch.Tensor
    entropy: torch.Tensor
    token_logprobs: torch.Tensor


def _row_of(scores: ContinuationScores, row: int, keep: torch.Tensor, tokens: torch.Tensor) -> ScoredContinuation:
    return ScoredContinuation(
        logprob=float(scores.logprob[row]),
        is_greedy=bool(scores.is_greedy[row]),
        tokens=tokens[row][keep],
        bins=scores.bins[row][keep],
        signal=scores.signal[row][keep],
        entropy=scores.entropies[row][keep],
        token_logprobs=scores.token_logprobs[row][keep],
    )


class TorchtuneLM(DataParallelLM, TemplateLM):
    """lm-eval model over a torchtune ``TransformerDecoder`` and tokenizer.

    Args:
        model: the decoder (eval mode, weights loaded).
        tokenizer: its torchtune tokenizer (``encode``, ``decode``, ``eos_id``, ``pad_id``, ``stop_tokens``).
        mode: interleaving mode, a name in ``layout.MODES`` (none | full | answer | marker) or a ``Mode``.
        codec: the confidence codec (required unless mode is none).
        marker: the marker string (mode marker).
        positions: the position rule, ``sequential`` or ``shared`` (as the checkpoint was trained).
        sampler: mode none only: ``{name: <registered decoder>, **settings}`` (e.g. ``{name: entropix,
            ...EntropixConfig fields}``); the decoder ``get_decoder(name)`` is called with our decoders'
            keyword arguments plus ``sampler_config=settings``. None: the mode's own decoder.
        batch_size: requests per forward / decode batch.
        max_seq_length: positions available to a sequence (interleaved length for the interleaved modes).
        max_gen_toks: default for requests whose gen_kwargs give none.
        enable_kv_cache: True: static KV caches of ``batch_size`` x ``max_seq_length`` are set up once
            and short batches are padded to ``batch_size``; False: caches sized to each batch are set
            up per generate call and freed after.
        max_passes: cap on fixed-point passes when scoring (None: enough to be exact).
        seed: seed of the sampling generator.

    Rank and world size are the default process group's when one is initialized (every rank holds the
    whole model and serves its share of the requests), else 0 and 1.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        mode: Any = "none",
        codec: Optional[ConfidenceCodec] = None,
        marker: Optional[str] = None,
        positions: str = "sequential",
        sampler: Optional[Mapping[str, Any]] = None,
        batch_size: int = 8,
        max_seq_length: int = 4096,
        max_gen_toks: int = 256,
        enable_kv_cache: bool = True,
        max_passes: Optional[int] = None,
        seed: int = 1234,
    ):
        super().__init__()
        interleaving = Interleaving.for_tokenizer(mode, tokenizer, marker, positions)
        if not interleaving.is_plain and codec is None:
            raise ValueError(
                f"interleaving.mode {interleaving.name!r} needs a confidence codec (confidence.json or a confidence section)"
            )
        if sampler and not interleaving.is_plain:
            raise ValueError(
                f"sampler {dict(sampler)!r} selects a decoder for mode none; mode {interleaving.name!r} decodes with its own"
            )
        for name, value in (("batch_size", batch_size), ("max_seq_length", max_seq_length), ("max_gen_toks", max_gen_toks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        model_positions = getattr(model, "max_seq_len", None)
        if isinstance(model_positions, int) and max_seq_length > model_positions:
            raise ValueError(
                f"max_seq_length {max_seq_length} exceeds the model's max_seq_len {model_positions} (its rotary "
                "position table); lower max_seq_length or build the model with a larger max_seq_len"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.interleaving = interleaving
        self.codec = None if interleaving.is_plain else codec
        if sampler:
            self.decoder_name, self._decoder, sampler_config = sampler_decoder(sampler)
            self._decoder_kwargs = {"sampler_config": sampler_config}
            if "tokenizer" in decoder_extras(self.decoder_name):
                # e.g. entropix resolves its clarifying token string through the tokenizer
                self._decoder_kwargs["tokenizer"] = tokenizer
        else:
            self.decoder_name, self._decoder, self._decoder_kwargs = interleaving.name, get_decoder(interleaving.name), {}
            if interleaving.interleaves_prompt and "prompt_bins" in decoder_extras(self.decoder_name):
                # Prompts that open alike (fixed few-shot exemplars, a system prompt) share their exact bins.
                self._decoder_kwargs["prompt_bins"] = PromptBinsCache()
        self._batch_size = batch_size
        self._max_length = max_seq_length
        self._max_gen_toks = max_gen_toks
        self._max_passes = max_passes
        self._device = next(model.parameters()).device
        self._rng = torch.Generator(device=self._device).manual_seed(seed)
        self.traces: list[ConfidenceTrace] = []
        self.request_cache: Optional[RequestCache] = None  # answers kept across runs (the eval recipe sets it)
        self.decode_stats = DecodeStats()
        self.static_cache = enable_kv_cache
        if enable_kv_cache:
            param = next(model.parameters())
            rows = 2 * batch_size if has_plain_twin(codec, self.interleaving) else batch_size  # each row's plain twin
            model.setup_caches(batch_size=rows, dtype=param.dtype, decoder_max_seq_len=max_seq_length)
        self.join_ranks()

    # ------------------------------------------------------------------ interleaving
    @property
    def mode(self) -> str:
        """The interleaving mode's name."""
        return self.interleaving.name

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation and never get a confidence token."""
        return list(self.interleaving.stop_ids)

    @property
    def marker_ids(self) -> Optional[list[int]]:
        """The tokenized marker (modes that read one), else None."""
        return list(self.interleaving.marker_ids) if self.interleaving.marker_ids is not None else None

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Context of an empty-context request: BOS when the tokenizer has one, else EOS (as ``hf``)."""
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` without BOS/EOS (torchtune's eval recipe and ``hf`` on BOS-less tokenizers)."""
        return list(self.tokenizer.encode(string, add_bos=False, add_eos=False))

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ loglikelihood
    def _encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context_ids, continuation_ids)`` as ``TemplateLM.loglikelihood`` encodes them."""
        if context:
            return self._encode_pair(context, continuation)
        continuation_ids = self.tok_encode(continuation)
        if continuation_ids and continuation_ids[0] == self.prefix_token_id:
            return continuation_ids[:1], continuation_ids[1:]
        return [self.prefix_token_id], continuation_ids

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request, content tokens only."""
        return self._serve_requests("loglikelihood", requests, lambda rest: self._loglikelihood(rest, disable_tqdm))

    def _loglikelihood(self, requests: list[Any], disable_tqdm: bool) -> list[tuple[float, bool]]:
        encoded = [self._encode_request(*request.args) for request in requests]

        def answered(position: int, result: ScoredContinuation) -> None:
            request = requests[position]
            trace = self._trace(
                RequestKey.of(request), "loglikelihood", result.tokens, result.bins, result.signal, result.entropy, result.token_logprobs
            )
            self._answered("loglikelihood", request.args, (result.logprob, result.is_greedy), trace)

        scored = self._score(encoded, disable_tqdm=disable_tqdm, on_scored=answered)
        return [(r.logprob, r.is_greedy) for r in scored]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, scored in disjoint windows (lm-eval's rolling scheme).

        A window is as many plain tokens as fit ``max_seq_length`` once interleaved
        (``Interleaving.rolling_window``: all of them in mode none, ``(max_seq_length - 1) // 2`` when
        every token may be followed by its confidence token).
        """
        return self._serve_requests("loglikelihood_rolling", requests, lambda rest: self._loglikelihood_rolling(rest, disable_tqdm))

    def _loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool) -> list[float]:
        window = self.interleaving.rolling_window(self.max_length)
        if window < 1:
            raise ValueError(f"max_seq_length {self.max_length} is too short for rolling windows in mode {self.mode!r}")
        windows, owners = [], []
        for position, request in enumerate(requests):
            (text,) = request.args
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=window, context_len=1
            )
            for pair in map(make_disjoint_window, pairs):
                windows.append(pair)
                owners.append(position)
        scored = self._score(windows, disable_tqdm=disable_tqdm)
        parts_of: list[list[ScoredContinuation]] = [[] for _ in requests]
        for part, owner in zip(scored, owners):
            parts_of[owner].append(part)
        totals = []
        for request, parts in zip(requests, parts_of):
            total = sum(p.logprob for p in parts)
            trace = self._trace(
                RequestKey.of(request), "loglikelihood_rolling",
                *(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "bins", "signal", "entropy", "token_logprobs")),
            )
            self._answered("loglikelihood_rolling", request.args, total, trace)
            totals.append(total)
        return totals

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """TemplateLM's token-level entry: ``requests`` are ``(strings, context_ids, continuation_ids)``."""
        return [(r.logprob, r.is_greedy) for r in self._score([(c, x) for _, c, x in requests], disable_tqdm=disable_tqdm)]

    def _fit_window(self, context: list[int], continuation: list[int]) -> list[int]:
        """context + continuation, left-truncated (context only) to what fits ``max_seq_length``.

        The last token is never fed (as in ``hf``), so mode none keeps ``max_length + 1`` tokens;
        interleaved modes keep what ``Interleaving.scoring_budget`` says fits once interleaved.
        """
        n_cont = len(continuation)
        keep = self.interleaving.scoring_budget(self.max_length, n_cont)
        if n_cont < 1 or keep < n_cont + 1:
            raise ValueError(
                f"a continuation of {n_cont} tokens does not fit max_seq_length {self.max_length} in mode {self.mode!r} "
                "with at least one context token; raise max_seq_length"
            )
        whole = context + continuation
        if len(whole) > keep:
            log.warning("context of %d tokens left-truncated to %d to fit max_seq_length %d", len(context), keep - n_cont, self.max_length)
        return whole[-keep:]

    def _score(
        self,
        encoded: list[tuple[list[int], list[int]]],
        disable_tqdm: bool = False,
        on_scored: Optional[Callable[[int, ScoredContinuation], None]] = None,
    ) -> list[ScoredContinuation]:
        """Scores of ``(context_ids, continuation_ids)`` pairs, in batches of similar length;
        ``on_scored(index in encoded, score)`` is called as each batch finishes."""
        items = [(self._fit_window(c, x), len(x), index) for index, (c, x) in enumerate(encoded)]
        collator = Collator(items, sort_fn=lambda item: (-len(item[0]), tuple(item[0])))
        results: list[ScoredContinuation] = []
        progress = tqdm(total=len(items), disable=disable_tqdm, desc=f"Scoring continuations [{self.mode}]")
        for chunk in collator.get_batched(n=self.batch_size):
            rows = [torch.tensor(seq, dtype=torch.long) for seq, _, _ in chunk]
            lengths = torch.tensor([len(r) for r in rows], device=self.device)
            starts = lengths - torch.tensor([n for _, n, _ in chunk], device=self.device)
            tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id).to(self.device)
            positions = torch.arange(tokens.shape[1], device=self.device).unsqueeze(0)
            valid = positions < lengths.unsqueeze(1)
            continuation = valid & (positions >= starts.unsqueeze(1))
            scores = score_continuations(
                self.model, tokens, continuation, interleaving=self.interleaving, codec=self.codec, valid_mask=valid,
                pad_id=self.pad_id, max_passes=self._max_passes,
            )
            if not scores.converged:
                log.warning("fixed-point bins did not converge within interleaving.max_passes=%s; they are approximate", self._max_passes)
            batch = [_row_of(scores, row, continuation[row], tokens) for row in range(len(chunk))]
            if on_scored is not None:
                for (_, _, index), result in zip(chunk, batch):
                    on_scored(index, result)
            results.extend(batch)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations of each context, cut before the first ``until`` string.

        Requests whose gen_kwargs ask for budget forcing (mode none only) are served by it, the
        others by this model's decoder; under torchrun each rank serves its share (``serve_once``).
        """
        if not self.interleaving.is_plain and any(budget_forcing_requested(request.args[1]) for request in requests):
            raise ValueError(f"budget forcing decodes in interleaving.mode none; this model is in mode {self.mode!r}")
        return self._serve_requests("generate_until", requests, lambda rest: self._serve(rest, disable_tqdm))

    def _serve(self, requests: list[Any], disable_tqdm: bool) -> list[str]:
        """This rank's share of ``generate_until``: budget forcing where asked, the decoder elsewhere."""
        return serve_generate_until(
            self, requests, plain=lambda others: self._decode_requests(others, disable_tqdm), force=self._force_budget,
            batch_size=self.batch_size, disable_tqdm=disable_tqdm,
        )

    def _force_budget(self, contexts: list[str], gen_kwargs: dict) -> list[BudgetForcedOutput]:
        """Budget forcing for ``contexts`` that share ``gen_kwargs``, on this model's KV caches."""
        return budget_force_torchtune(
            self.model, self.tokenizer, [self.tok_encode(c) for c in contexts], gen_kwargs, pad_id=self.pad_id,
            stop_tokens=self.stop_ids, rng=self._rng, max_length=self.max_length, default_max_gen_toks=self.max_gen_toks,
        )

    def _decode_requests(self, requests: list[Any], disable_tqdm: bool) -> list[str]:
        """``generate_until`` for requests without budget forcing: batches for this model's decoder."""
        items = [(request.args[0], request.args[1], position) for position, request in enumerate(requests)]
        collator = Collator(
            items,
            sort_fn=lambda item: (-len(self.tok_encode(item[0])), item[0]),
            group_by="gen_kwargs",
            group_fn=lambda item: item[1],
        )
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        texts: list[str] = []
        progress = tqdm(total=len(items), disable=disable_tqdm, desc=f"Generating [{self.mode}]")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs, positions = zip(*chunk)
            settings = decode_settings(all_gen_kwargs[0], default_max_gen_toks=self.max_gen_toks, eos_text=eos_text)
            prompt = self._prompt_batch(contexts, settings)
            result = self._decode(prompt, settings)
            for row, (context, gen_kwargs, position) in enumerate(chunk):
                text, trace = self._finish_row(result, row, settings, RequestKey.of(requests[position]))
                texts.append(text)
                self._answered("generate_until", (context, gen_kwargs), text, trace)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(texts)

    def _prompt_batch(self, contexts: Sequence[str], settings: DecodeSettings) -> torch.Tensor:
        """Left-padded ``[b, p]`` prompt ids, each left-truncated to what fits beside the generation."""
        budget = self.interleaving.prompt_budget(self.max_length, settings.max_gen_toks)
        ids = [self.tok_encode(c) for c in contexts]
        if any(len(i) > budget for i in ids):
            log.warning("prompts longer than %d tokens are left-truncated to fit max_seq_length %d", budget, self.max_length)
        return left_pad([i[-budget:] for i in ids], self.pad_id, device=self.device)

    def _decode(self, prompt: torch.Tensor, settings: DecodeSettings) -> DecodeResult:
        """Run the decoder on ``prompt`` ``[b, p]`` (filled to the static batch size when caches are static)."""
        rows = prompt.shape[0]
        if self.static_cache:
            prompt = fill_static_batch(prompt, self.batch_size)
        started = time.perf_counter()
        kwargs = dict(
            max_generated_tokens=settings.max_gen_toks,
            pad_id=self.pad_id,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            stop_tokens=self.stop_ids,
            rng=self._rng,
            **self._decoder_kwargs,
        )
        if self.codec is not None:
            kwargs["codec"] = self.codec
            # The mode's decoder lays out confidence tokens with the checkpoint's position rule.
            kwargs["positions"] = self.interleaving.positions
        if self.marker_ids is not None:
            kwargs["marker"] = self.marker_ids
        result = first_rows(self._decoder(self.model, prompt, **kwargs), rows)
        self.decode_stats.seconds += time.perf_counter() - started
        self.decode_stats.tokens += int(result.generated_lengths.sum())
        return result

    def _finish_row(self, result: DecodeResult, row: int, settings: DecodeSettings, key: RequestKey) -> tuple[str, ConfidenceTrace]:
        """The returned text of one row, and its trace over the content tokens that text covers."""
        content = result.content[row, : int(result.generated_lengths[row])].tolist()
        full_text = self.tok_decode(content)
        text = cut_at_stop(full_text, settings.until)
        covered = tokens_covering(len(text), content, self.tok_decode)
        trace = self._trace(
            key, "generate_until",
            torch.tensor(content[:covered]), result.bins[row, :covered], result.signal[row, :covered],
            result.entropies[row, :covered], result.token_logprobs[row, :covered],
        )
        return text, trace

    def _trace(self, key: RequestKey, request_type: str, tokens: torch.Tensor, bins: torch.Tensor,
               signal: torch.Tensor, entropy: torch.Tensor, logprob: torch.Tensor) -> ConfidenceTrace:
        return ConfidenceTrace.from_tensors(
            task=key.task, doc_id=key.doc_id, request_index=key.index, request_type=request_type, mode=self.mode,
            tokens=tokens.cpu(), bins=bins.cpu(), signal=signal.cpu(), entropy=entropy.cpu(), logprob=logprob.cpu(),
        )

    # ------------------------------------------------------------------ answers kept across runs
    def _serve_requests(self, request_type: str, requests: list[Any], compute: Callable[[list], list]) -> list:
        """``compute`` on this rank's requests that no earlier run answered (lm-eval's padding copies
        left out: ``serve_once``); the others' responses from the request cache."""
        return self.serve_once(requests, lambda served: self._reuse_or_compute(request_type, served, compute))

    def _answered(self, request_type: str, args: Sequence[Any], response: Any, trace: ConfidenceTrace) -> None:
        """One request answered: its trace kept, lm-eval's cache hook (``--use_cache``) told, and the
        answer committed to the request cache."""
        self.traces.append(trace)
        self.cache_hook.add_partial(request_type, args, response)
        if self.request_cache is not None:
            self.request_cache.store(request_type, args, response, trace)

    def _reuse_or_compute(self, request_type: str, requests: list[Any], compute: Callable[[list], list]) -> list:
        """Responses to ``requests``: those the request cache holds (their traces replayed under this
        run's task, document and index), ``compute`` for the rest, in the order of ``requests``."""
        answered, rest = split_answered(self.request_cache, request_type, requests)
        responses: list = [None] * len(requests)
        for position, request, answer in answered:
            responses[position] = answer.response
            if answer.trace is not None:
                key = RequestKey.of(request)
                self.traces.append(ConfidenceTrace(task=key.task, doc_id=key.doc_id, request_index=key.index, **answer.trace))
        computed = compute([request for _, request in rest]) if rest else []
        for (position, _), response in zip(rest, computed):
            responses[position] = response
        return responses


__all__ = ["MODEL_NAME", "DecodeStats", "RequestKey", "ScoredContinuation", "TorchtuneLM", "sampler_decoder"]
