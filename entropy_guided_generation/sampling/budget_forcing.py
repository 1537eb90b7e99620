"""Budget forcing for reasoning models: one KV-cached decode loop that keeps a model thinking or
stops it, and then makes it answer.

The prompt (plus the thinking-start delimiter) is prefilled once; every later step feeds one token
per row into the same cache. A row thinks until it emits the end-of-thinking delimiter (or a stop
token) or its thinking budget is spent. An end-of-thinking before the budget is suppressed (its
tokens are dropped from the cache) and the continuation string ("Wait") is forced in, while the
scaling function says continue, at most ``thinking_n_ignore`` times. Then the end delimiter and
the answer prefix are forced in and the answer is sampled with what remains of ``max_gen_toks``.
The budget counts every token of the thinking section (sampled and forced continuations) across
all rounds and is never exceeded; the answer always gets at least one token. With
``max_tokens_answer`` the answer has a budget of its own instead (s1's layout): ``max_gen_toks``
then bounds the thinking section (thinking, delimiter, prefix) and the answer gets that many more.

The loop steps a :class:`~entropy_guided_generation.generation.DecodeSession`, so one loop serves
torchtune decoders on their KV cache (:func:`budget_force_torchtune`) and Hugging Face models on
their ``past_key_values`` (:func:`~entropy_guided_generation.sampling.budget_forcing_hf.budget_force_hf`).
:func:`serve_generate_until` turns lm-eval ``generate_until`` requests into either.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from entropy_guided_generation import signals
from entropy_guided_generation.generation.gen_kwargs import GEN_KWARGS, check_sampling_values, cut_at_stop, decode_settings
from entropy_guided_generation.generation import DecodeSession, left_pad, left_padded_mask, open_session, sample_next_token
from entropy_guided_generation.sampling import scalers

BUDGET_FORCING_KEYS = (
    "max_tokens_thinking",
    "thinking_n_ignore",
    "thinking_n_ignore_str",
    "thinking_start",
    "thinking_end",
    "thinking_answer_prefix",
    "scale_func_name",
    "max_tokens_answer",
)
LOG_KEY = "budget_forcing"
"""Key under which each request's forcing record is added to its gen_kwargs (``--log_samples``'s ``arguments``)."""

# What produced each generated token (one code per token).
THINK, CONTINUATION, END, ANSWER = 0, 1, 2, 3
_THINKING, _ANSWERING, _DONE = 0, 1, 2


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BudgetForcingConfig:
    """Budget forcing read from lm-eval ``gen_kwargs`` (seed 003's names).

    Attributes:
        max_tokens_thinking: thinking budget in tokens (>= 1), or ``"auto"``: whatever
            ``max_gen_toks`` (and the context) leave after the delimiters and one answer token.
        thinking_n_ignore: end-of-thinking delimiters to suppress at most (>= 0).
        thinking_n_ignore_str: the continuation string forced in after a suppressed delimiter.
        thinking_start: appended to the prompt to open the thinking section.
        thinking_end: the end-of-thinking delimiter (detected in, and forced into, the output).
        thinking_answer_prefix: forced in after the end delimiter, before the answer ("" for none).
        scale_func_name: the registered scaling function deciding each continuation.
        scale_options: that function's options (``threshold``, ``decay_factor``, ``last_k`` ...).
        max_tokens_answer: the answer's own budget in tokens (>= 1), counted from after the end
            delimiter and the answer prefix; ``max_gen_toks`` then bounds the thinking section only.
            None: the answer gets what thinking leaves of ``max_gen_toks``.
    """

    max_tokens_thinking: Union[int, str] = "auto"
    thinking_n_ignore: int = 0
    thinking_n_ignore_str: str = "Wait"
    thinking_start: str = "<think>"
    thinking_end: str = "</think>"
    thinking_answer_prefix: str = ""
    scale_func_name: str = "default"
    scale_options: dict = field(default_factory=dict)
    max_tokens_answer: Optional[int] = None

    def scale_func(self) -> scalers.ScaleFunc:
        return scalers.get_scale_func(self.scale_func_name, **self.scale_options)


def budget_forcing_requested(gen_kwargs: Mapping[str, Any]) -> bool:
    """Whether lm-eval ``gen_kwargs`` ask for budget forcing (any of :data:`BUDGET_FORCING_KEYS`)."""
    return isinstance(gen_kwargs, Mapping) and any(key in gen_kwargs for key in BUDGET_FORCING_KEYS)


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit() or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def budget_forcing_config(gen_kwargs: Mapping[str, Any]) -> BudgetForcingConfig:
    """Parse and check the budget-forcing entries of ``gen_kwargs``; other entries whose names the
    scaling function accepts become its options.

    Raises:
        ValueError: a zero/negative/non-int budget that is not ``auto``, a negative
            ``thinking_n_ignore``, a ``max_tokens_answer`` that is not an int >= 1, an unknown ``scale_func_name`` (listing the registered ones),
            or bad scaler options.
    """
    budget = gen_kwargs.get("max_tokens_thinking", "auto")
    if budget != "auto":
        if isinstance(budget, str) and not budget.strip().isdigit():
            raise ValueError(f"max_tokens_thinking must be an int >= 1 or 'auto', got {budget!r}")
        budget = _int_at_least("max_tokens_thinking (an int >= 1 or 'auto')", budget, 1)
    name = str(gen_kwargs.get("scale_func_name", "default"))
    options = {k: gen_kwargs[k] for k in scalers.scale_func_options(name) if k in gen_kwargs}
    config = BudgetForcingConfig(
        max_tokens_thinking=budget,
        thinking_n_ignore=_int_at_least("thinking_n_ignore", gen_kwargs.get("thinking_n_ignore", 0), 0),
        **{k: str(gen_kwargs[k]) for k in ("thinking_n_ignore_str", "thinking_start", "thinking_end", "thinking_answer_prefix") if k in gen_kwargs},
        scale_func_name=name,
        scale_options=options,
        max_tokens_answer=_int_at_least("max_tokens_answer", gen_kwargs["max_tokens_answer"], 1) if "max_tokens_answer" in gen_kwargs else None,
    )
    config.scale_func()  # unknown names and bad options fail here, before any model work
    return config


def consumed_keys(gen_kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    """The gen_kwargs budget forcing reads (its own keys and the scaling function's options)."""
    name = str(gen_kwargs.get("scale_func_name", "default"))
    return tuple(BUDGET_FORCING_KEYS) + tuple(scalers.scale_func_options(name))


@dataclass(frozen=True)
class ForcingIds:
    """The forcing strings as token ids: ``start`` (appended to the prompt), ``end`` (the
    end-of-thinking delimiter), ``continuation`` (default scale token) and ``answer_prefix``."""

    start: list[int]
    end: list[int]
    continuation: list[int]
    answer_prefix: list[int]

    @classmethod
    def resolve(cls, config: BudgetForcingConfig, encode: Callable[[str], Sequence[int]]) -> "ForcingIds":
        """Tokenize the configured strings with ``encode`` (no BOS/EOS).

        Raises:
            ValueError: when the start, end or continuation string tokenizes to nothing.
        """
        ids = {}
        for key, name in (("start", "thinking_start"), ("end", "thinking_end"), ("continuation", "thinking_n_ignore_str")):
            text = getattr(config, name)
            ids[key] = [int(i) for i in encode(text)] if text else []
            if not ids[key]:
                raise ValueError(f"{name}={text!r} tokenizes to no tokens; expected a string of at least one token")
        prefix = config.thinking_answer_prefix
        return cls(answer_prefix=[int(i) for i in encode(prefix)] if prefix else [], **ids)

    @property
    def after_thinking(self) -> int:
        """Tokens forced in when thinking ends: the end delimiter and the answer prefix."""
        return len(self.end) + len(self.answer_prefix)


def generation_budgets(
    config: BudgetForcingConfig, ids: ForcingIds, prompt_lengths: torch.Tensor, max_gen_toks: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(thinking budget, generation budget)``, each ``[b]`` tokens.

    Without ``max_tokens_answer`` the generation budget is ``max_gen_toks`` (capped by the context
    with ``auto``) and the reserve kept out of thinking is the end delimiter, the answer prefix and
    one answer token. With ``max_tokens_answer = A`` the thinking section (thinking, delimiter,
    prefix) gets ``max_gen_toks`` (with ``auto``: also capped by the context less ``A``), the
    reserve is the delimiter and prefix, and the generation budget adds ``A``; the loop then gives
    the answer exactly ``A`` tokens after the prefix, however early thinking ends. An int thinking
    budget is capped at ``max_gen_toks - reserve``; ``auto`` takes all of it.

    Args:
        prompt_lengths: ``[b]`` real prompt tokens per row (thinking start included).
        max_gen_toks: generated tokens at most (thinking, delimiters, prefix and, without
            ``max_tokens_answer``, the answer together).
        max_length: the model's context length.

    Raises:
        ValueError: when ``max_gen_toks`` cannot hold the reserve, when (auto) a prompt leaves no
            room for it in the context, or when (int budget) prompt and budgets exceed the context.
    """
    own = config.max_tokens_answer or 0
    reserve = ids.after_thinking + (0 if own else 1)
    if max_gen_toks < reserve:
        answer = "" if own else " and one answer token"
        raise ValueError(
            f"max_gen_toks={max_gen_toks} cannot hold the end-of-thinking delimiter ({len(ids.end)} tokens), the "
            f"answer prefix ({len(ids.answer_prefix)}){answer}; expected max_gen_toks >= {reserve}"
        )
    section = torch.full_like(prompt_lengths, max_gen_toks)
    if config.max_tokens_thinking == "auto":
        room = max_length - prompt_lengths - own
        if bool((room < reserve).any()):
            longest = int(prompt_lengths.max())
            answer = f" and max_tokens_answer={own}" if own else " and an answer"
            raise ValueError(
                f"max_tokens_thinking=auto: a prompt of {longest} tokens leaves no room for thinking{answer} in the "
                f"context of {max_length} tokens (needs {reserve + own} more); shorten the prompt or give an int budget"
            )
        section = torch.minimum(section, room)
        return section - reserve, section + own
    if bool((prompt_lengths + section + own > max_length).any()):
        answer = f" plus max_tokens_answer={own}" if own else ""
        raise ValueError(
            f"a prompt of {int(prompt_lengths.max())} tokens plus max_gen_toks={max_gen_toks}{answer} exceeds the context of {max_length} tokens"
        )
    return (section - reserve).clamp(max=int(config.max_tokens_thinking)), section + own


# ---------------------------------------------------------------- records


@dataclass
class ThinkingRound:
    """One thinking round: the tokens the model generated (``tokens``, with ``entropies`` in nats),
    why it ended (``delimiter``: the model ended thinking; ``budget``: the thinking budget was spent;
    ``scaler``: the model ended and the scaling function said stop) and the continuation ids forced
    in after it (``scale_token``, None when thinking ended with this round)."""

    tokens: list[int]
    entropies: list[float]
    end_reason: str
    scale_token: Optional[list[int]] = None


@dataclass
class BudgetForcedOutput:
    """One budget-forced generation.

    Attributes:
        tokens: every generated id in order: thinking, continuations, end delimiter, answer prefix, answer.
        kinds: per id of ``tokens``: THINK (0), CONTINUATION (1), END (2: delimiter and prefix), ANSWER (3).
        rounds: the thinking rounds.
        answer_tokens / answer_entropies: the sampled answer (stop token included) and its entropies (nats).
        thinking_budget: the budget this row had.
        text: the returned text (thinking section, delimiter, prefix, then the answer cut at ``until``).
    """

    tokens: list[int]
    kinds: list[int]
    rounds: list[ThinkingRound]
    answer_tokens: list[int]
    answer_entropies: list[float]
    thinking_budget: int
    text: str = ""

    @property
    def thinking_tokens(self) -> int:
        """Tokens of the thinking section across all rounds (sampled and forced continuations)."""
        return sum(k in (THINK, CONTINUATION) for k in self.kinds)

    @property
    def continuations(self) -> int:
        """How many continuation strings were forced in."""
        return sum(r.scale_token is not None for r in self.rounds)

    def log_record(self) -> dict[str, Any]:
        """A JSON-friendly summary for lm-eval's ``--log_samples``."""
        return {
            "rounds": len(self.rounds),
            "continuations": self.continuations,
            "thinking_tokens": self.thinking_tokens,
            "thinking_budget": self.thinking_budget,
            "end_reasons": [r.end_reason for r in self.rounds],
            "round_tokens": [len(r.tokens) for r in self.rounds],
            "round_mean_entropy": [sum(r.entropies) / len(r.entropies) if r.entropies else None for r in self.rounds],
            "scale_tokens": [r.scale_token for r in self.rounds],
            "answer_tokens": len(self.answer_tokens),
        }


# ---------------------------------------------------------------- the loop


@dataclass
class _State:
    """Per-row loop state, each ``[b]`` unless said otherwise."""

    phase: torch.Tensor
    think_used: torch.Tensor
    gen_used: torch.Tensor
    ignored: torch.Tensor
    run: torch.Tensor  # consecutive sampled thinking tokens in the current round
    recent: torch.Tensor  # [b, len(end) - 1] the last sampled thinking tokens
    queue: torch.Tensor  # [b, q] forced ids
    queue_kind: torch.Tensor  # kind of the queued ids (CONTINUATION or END)
    q_pos: torch.Tensor
    q_len: torch.Tensor
    round: torch.Tensor  # index of the current thinking round
    limit: torch.Tensor  # generated tokens at most (set again when thinking ends if the answer has its own budget)

    def enqueue(self, row: int, ids: Sequence[int], kind: int) -> None:
        if len(ids) > self.queue.shape[1]:
            grow = torch.zeros(self.queue.shape[0], len(ids) - self.queue.shape[1], dtype=torch.long, device=self.queue.device)
            self.queue = torch.cat([self.queue, grow], dim=1)
        self.queue[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long, device=self.queue.device)
        self.q_pos[row], self.q_len[row], self.queue_kind[row] = 0, len(ids), kind


@torch.no_grad()
def force_budget(
    session: DecodeSession,
    prompt: torch.Tensor,
    prompt_valid: torch.Tensor,
    *,
    ids: ForcingIds,
    thinking_budget: torch.Tensor,
    generation_budget: torch.Tensor,
    config: BudgetForcingConfig,
    stop_tokens: Sequence[int],
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    rng: Optional[torch.Generator] = None,
    exclude_ids: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> list[BudgetForcedOutput]:
    """Run budget forcing on ``session`` for a batch; see the module docstring for the semantics.

    Args:
        prompt: ``[b, p]`` left-padded prompts that already end with ``ids.start``.
        prompt_valid: ``[b, p]`` True on real prompt tokens.
        thinking_budget / generation_budget: ``[b]`` from :func:`generation_budgets`; with
            ``config.max_tokens_answer`` a row's generation limit is set again when its thinking
            ends (tokens so far + delimiter and prefix + the answer budget).
        stop_tokens: ids that end the answer (in thinking, they end thinking like the delimiter).
        temperature, top_k, top_p, rng: sampling of thinking and answer tokens (0: greedy).
        exclude_ids: ids never sampled (e.g. confidence tokens); also left out of the entropies.

    Returns:
        One :class:`BudgetForcedOutput` per row (``text`` left empty for the front-end).
    """
    b, device = prompt.shape[0], prompt.device
    scale = config.scale_func()
    end = torch.tensor(ids.end, dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    zeros = torch.zeros(b, dtype=torch.long, device=device)
    queue_width = max(len(ids.continuation), len(ids.end) + len(ids.answer_prefix))
    st = _State(
        phase=zeros.clone(), think_used=zeros.clone(), gen_used=zeros.clone(), ignored=zeros.clone(), run=zeros.clone(),
        recent=torch.full((b, len(ids.end) - 1), -1, dtype=torch.long, device=device),
        queue=torch.zeros(b, queue_width, dtype=torch.long, device=device), queue_kind=zeros.clone(),
        q_pos=zeros.clone(), q_len=zeros.clone(), round=zeros.clone(), limit=generation_budget.clone(),
    )
    tokens, kinds, kept, entropies, round_of = [], [], [], [], []
    reasons: list[list[tuple[str, Optional[list[int]]]]] = [[] for _ in range(b)]

    logits = session.prefill(prompt, prompt_valid)
    bar = tqdm(total=int(generation_budget.max()), desc="budget forcing", disable=not progress, leave=False)
    while True:
        lp = signals.log_probs(logits, exclude_ids=exclude_ids, what=f"budget forcing step {len(tokens)} logits")
        entropy = signals.entropy_from_log_probs(lp)
        content = logits if exclude_ids is None else logits.index_fill(-1, exclude_ids, float("-inf"))
        sampled = sample_next_token(content, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)

        free = (st.phase == _THINKING) & (st.q_pos >= st.q_len)  # rows sampling a thinking token now
        out_of_budget = free & (st.think_used >= thinking_budget)
        window = torch.cat([st.recent, sampled.unsqueeze(1)], dim=1)
        delimiter = (window == end).all(1) & (st.run >= len(ids.end) - 1)
        ended = free & ~out_of_budget & (delimiter | torch.isin(sampled, stops))
        if bool(ended.any()):
            dropped = ended & delimiter
            n_drop = len(ids.end) - 1
            if n_drop and bool(dropped.any()):
                # The delimiter's first tokens are already in the cache: drop them there and here.
                session.drop_last(dropped, n_drop)
                for back in range(1, n_drop + 1):
                    kept[-back] = kept[-back] & ~dropped
                st.think_used -= dropped.long() * n_drop
                st.gen_used -= dropped.long() * n_drop
            for row in ended.nonzero().flatten().tolist():
                seq, ents = _round_of(row, int(st.round[row]), tokens, kinds, kept, entropies, round_of)
                _decide(st, row, scale, config, ids, thinking_budget, seq, ents, reasons)
        for row in out_of_budget.nonzero().flatten().tolist():
            _end_thinking(st, row, config, ids, reasons, "budget")

        forced = st.q_pos < st.q_len
        queued = st.queue.gather(1, st.q_pos.clamp(max=st.queue.shape[1] - 1).unsqueeze(1)).squeeze(1)
        active = st.phase != _DONE
        token = torch.where(forced, queued, sampled)
        kind = torch.where(forced, st.queue_kind, torch.where(st.phase == _THINKING, THINK, ANSWER))
        tokens.append(token)
        kinds.append(kind)
        kept.append(active)
        round_of.append(st.round.clone())
        entropies.append(torch.where(forced | ~active, float("nan"), entropy))

        # Leaving the thinking phase happens when the end delimiter is queued (see _end_thinking).
        st.gen_used += active.long()
        st.think_used += (active & (kind <= CONTINUATION)).long()
        st.q_pos += (active & forced).long()
        sampled_think = active & ~forced & (kind == THINK)
        st.run = torch.where(sampled_think, st.run + 1, zeros)
        if st.recent.shape[1]:
            shifted = torch.cat([st.recent[:, 1:], token.unsqueeze(1)], dim=1)
            st.recent = torch.where(sampled_think.unsqueeze(1), shifted, torch.full_like(st.recent, -1))
        finished = active & ((~forced & (kind == ANSWER) & torch.isin(token, stops)) | (st.gen_used >= st.limit))
        st.phase = torch.where(finished, _DONE, st.phase)
        bar.update(1)
        if not bool((st.phase != _DONE).any()):
            break
        logits = session.step(token, st.phase != _DONE)
    bar.close()
    return _outputs(tokens, kinds, kept, entropies, round_of, reasons, thinking_budget)


def _round_of(row: int, index: int, tokens: list, kinds: list, kept: list, entropies: list, round_of: list) -> tuple[list[int], list[float]]:
    """The kept sampled thinking tokens of ``row``'s round ``index`` and their entropies."""
    if not tokens:
        return [], []
    column = lambda records: torch.stack([r[row] for r in records])  # noqa: E731
    mine = column(kept) & (column(kinds) == THINK) & (column(round_of) == index)
    return column(tokens)[mine].tolist(), column(entropies)[mine].tolist()


def _decide(st: _State, row: int, scale: scalers.ScaleFunc, config: BudgetForcingConfig, ids: ForcingIds,
            thinking_budget: torch.Tensor, seq: list[int], ents: list[float], reasons: list) -> None:
    """The model ended thinking in ``row`` after round ``seq`` (entropies ``ents``): continue
    (queue the scale token, next round) or end thinking."""
    if int(st.ignored[row]) >= config.thinking_n_ignore:
        _end_thinking(st, row, config, ids, reasons, "delimiter")
        return
    go_on, scale_ids = scalers.checked_decision(scale(int(st.ignored[row]), seq, ents, list(ids.continuation)), config.scale_func_name)
    if not go_on:
        _end_thinking(st, row, config, ids, reasons, "scaler")
    elif int(st.think_used[row]) + len(scale_ids) > int(thinking_budget[row]):
        _end_thinking(st, row, config, ids, reasons, "budget")
    else:
        reasons[row].append(("delimiter", scale_ids))
        st.ignored[row] += 1
        st.round[row] += 1
        st.enqueue(row, scale_ids, CONTINUATION)
    st.run[row] = 0


def _end_thinking(st: _State, row: int, config: BudgetForcingConfig, ids: ForcingIds, reasons: list, reason: str) -> None:
    reasons[row].append((reason, None))
    st.enqueue(row, ids.end + ids.answer_prefix, END)
    st.phase[row] = _ANSWERING
    if config.max_tokens_answer is not None:
        # gen_used counts the kept tokens so far; the forced ones come next, then the answer's own budget.
        st.limit[row] = st.gen_used[row] + ids.after_thinking + config.max_tokens_answer


def _outputs(tokens: list, kinds: list, kept: list, entropies: list, round_of: list, reasons: list,
             thinking_budget: torch.Tensor) -> list[BudgetForcedOutput]:
    """Per-row outputs from the per-step ``[b]`` records (once, after the loop)."""
    tok, kind, keep, ent, rnd = (torch.stack(x, dim=1).cpu() for x in (tokens, kinds, kept, entropies, round_of))
    outputs = []
    for row in range(tok.shape[0]):
        mask = keep[row]
        row_tok, row_kind, row_ent = tok[row][mask].tolist(), kind[row][mask].tolist(), ent[row][mask].tolist()
        # reasons[row][i] closes round i; its thinking tokens are the THINK tokens recorded in round i.
        per_round: list[tuple[list[int], list[float]]] = [([], []) for _ in reasons[row]]
        for t, k, e, r in zip(row_tok, row_kind, row_ent, rnd[row][mask].tolist()):
            if k == THINK:
                per_round[r][0].append(t)
                per_round[r][1].append(e)
        rounds = [ThinkingRound(toks, ents, reason, scale) for (toks, ents), (reason, scale) in zip(per_round, reasons[row])]
        answer = [(t, e) for t, k, e in zip(row_tok, row_kind, row_ent) if k == ANSWER]
        outputs.append(
            BudgetForcedOutput(
                tokens=row_tok, kinds=row_kind, rounds=rounds,
                answer_tokens=[t for t, _ in answer], answer_entropies=[e for _, e in answer],
                thinking_budget=int(thinking_budget[row]),
            )
        )
    return outputs


# ---------------------------------------------------------------- front-ends


def _with_start(prompts: Sequence[Sequence[int]], config: BudgetForcingConfig, ids: ForcingIds, max_gen_toks: int, max_length: int) -> list[list[int]]:
    """Prompts ending with the thinking start. With an int budget they are left-truncated as
    lm-eval's ``hf`` does (to ``max_length - max_gen_toks - max_tokens_answer``); with ``auto`` they
    are kept whole."""
    if config.max_tokens_thinking == "auto":
        return [list(p) + ids.start for p in prompts]
    own = config.max_tokens_answer or 0
    keep = max_length - max_gen_toks - own - len(ids.start)
    if keep < 1:
        answer = f" plus max_tokens_answer={own}" if own else ""
        raise ValueError(
            f"max_gen_toks={max_gen_toks}{answer} and the thinking start ({len(ids.start)} tokens) leave no room for a prompt "
            f"in the context of {max_length} tokens"
        )
    return [list(p)[-keep:] + ids.start for p in prompts]


def run_budget_forcing(
    model: Any,
    prompts: Sequence[Sequence[int]],
    gen_kwargs: Mapping[str, Any],
    *,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[list[int]], str],
    eos_text: Optional[str],
    default_max_gen_toks: int,
    max_length: int,
    pad_id: int,
    stop_tokens: Sequence[int],
    device: torch.device,
    rng: Optional[torch.Generator] = None,
    exclude_ids: Optional[torch.Tensor] = None,
    static_batch: Optional[int] = None,
    progress: bool = False,
) -> list[BudgetForcedOutput]:
    """Budget forcing for ``prompts`` (token ids, no thinking start) with lm-eval ``gen_kwargs``.

    Args:
        model: a torchtune decoder or a Hugging Face causal LM (stepped through
            :func:`~entropy_guided_generation.generation.open_session`).
        encode / decode: the tokenizer without BOS/EOS, and back to text (special tokens skipped).
        eos_text: the EOS string, added to the ``until`` strings as lm-eval does.
        default_max_gen_toks: ``max_gen_toks`` when gen_kwargs give none.
        max_length: the context length.
        static_batch: when the model's caches are set up for a fixed batch, that size (short
            batches are filled with copies of row 0, then dropped).

    Returns:
        One output per prompt with ``text`` = thinking section + delimiter + prefix + the answer
        cut before the first ``until`` string.
    """
    if not prompts:
        return []
    ours = consumed_keys(gen_kwargs)
    sampling = {k: v for k, v in gen_kwargs.items() if k not in ours}
    unknown = sorted(set(sampling) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(f"unsupported gen_kwargs {unknown} with budget forcing; expected some of {', '.join(GEN_KWARGS + ours)}")
    settings = decode_settings(sampling, default_max_gen_toks=default_max_gen_toks, eos_text=eos_text)
    config = budget_forcing_config(gen_kwargs)
    ids = ForcingIds.resolve(config, encode)
    # Each suppressed multi-token delimiter leaves len(end) - 1 masked cache columns behind; keep
    # room for them so that prompt + generation + those columns fit the context.
    dropped_columns = (len(ids.end) - 1) * (config.thinking_n_ignore + 1)
    room = max_length - dropped_columns
    rows = _with_start(prompts, config, ids, settings.max_gen_toks, room)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    thinking, generation = generation_budgets(config, ids, lengths, settings.max_gen_toks, room)
    n = len(rows)
    if static_batch is not None:
        if n > static_batch:
            raise ValueError(f"a batch of {n} prompts does not fit KV caches set up for batch size {static_batch}")
        fill = static_batch - n
        rows = rows + [rows[0]] * fill
        thinking = torch.cat([thinking, thinking[:1].expand(fill)])
        generation = torch.cat([generation, generation[:1].expand(fill)])
    prompt = left_pad(rows, pad_id, device=device)
    valid = left_padded_mask(torch.tensor([len(r) for r in rows], device=device), prompt.shape[1])
    cache_len = prompt.shape[1] + int(generation.max()) + dropped_columns
    with open_session(model, prompt.shape[0], cache_len) as session:
        outputs = force_budget(
            session, prompt, valid, ids=ids, thinking_budget=thinking, generation_budget=generation, config=config,
            stop_tokens=stop_tokens, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
            rng=rng, exclude_ids=exclude_ids, progress=progress,
        )[:n]
    for out in outputs:
        head = decode([t for t, k in zip(out.tokens, out.kinds) if k != ANSWER])
        out.text = head + cut_at_stop(decode(out.answer_tokens), settings.until)
    return outputs


def budget_force_torchtune(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    gen_kwargs: dict,
    *,
    codec: Any = None,
    pad_id: int,
    stop_tokens: Sequence[int],
    rng: Optional[torch.Generator] = None,
    max_length: Optional[int] = None,
    default_max_gen_toks: int = 256,
    progress: bool = False,
) -> list[BudgetForcedOutput]:
    """Budget forcing on a torchtune ``TransformerDecoder`` (one KV cache, no re-prefill).

    Args:
        model: the decoder; KV caches it has set up are reused (short batches are filled).
        tokenizer: its torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``decode``, ``eos_id``).
        prompts: token ids per prompt (without the thinking start).
        gen_kwargs: lm-eval gen_kwargs (budget forcing keys, ``max_gen_toks``, ``until``, sampling).
        codec: optional confidence codec; its ids are never sampled and left out of the entropies.
        pad_id: padding id.
        stop_tokens: ids that end the answer.
        rng: generator for sampling.
        max_length: context length (default: the model's ``max_seq_len``).
        default_max_gen_toks: ``max_gen_toks`` when gen_kwargs give none.
    """
    param = next(model.parameters())
    encode = lambda text: tokenizer.encode(text, add_bos=False, add_eos=False)  # noqa: E731
    # torchtune counts every added token as special, the thinking delimiters too: the text skips
    # special ids (as HF's decode does) except those of the forcing strings, which stay visible.
    forcing = ForcingIds.resolve(budget_forcing_config(gen_kwargs), encode)
    visible = set(forcing.start + forcing.end + forcing.continuation + forcing.answer_prefix)
    hidden = (set(getattr(tokenizer, "special_tokens", {}).values()) | set(stop_tokens) | {pad_id}) - visible
    static_batch = None
    if model.caches_are_setup():
        static_batch = int(model.layers[0].attn.kv_cache.batch_size)
    return run_budget_forcing(
        model, prompts, gen_kwargs,
        encode=encode,
        decode=lambda ids: tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=False),
        eos_text=tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False),
        default_max_gen_toks=default_max_gen_toks, max_length=int(max_length or model.max_seq_len), pad_id=pad_id,
        stop_tokens=stop_tokens, device=param.device, rng=rng,
        exclude_ids=codec.token_ids.to(param.device) if codec is not None else None,
        static_batch=static_batch, progress=progress,
    )


# ---------------------------------------------------------------- lm-eval glue


def serve_generate_until(
    lm: Any,
    requests: list[Any],
    *,
    plain: Callable[[list[Any]], list[str]],
    force: Callable[[list[str], dict], list[BudgetForcedOutput]],
    batch_size: int,
    disable_tqdm: bool = False,
) -> list[str]:
    """lm-eval ``generate_until``: requests without budget-forcing gen_kwargs go to ``plain``
    unchanged; the others are batched by identical gen_kwargs and served by ``force``.

    Each forced request's gen_kwargs get a ``"budget_forcing"`` list (one :meth:`log_record` per
    repeat), so ``--log_samples`` shows what forcing did under ``arguments``.

    Raises:
        ValueError: before any generation, on a sampling value no decoder honours (a negative
            temperature, ...; :func:`~entropy_guided_generation.generation.gen_kwargs.check_sampling_values`).
    """
    for request in requests:
        check_sampling_values(request.args[1])
    texts: list[Optional[str]] = [None] * len(requests)
    forced = [i for i, r in enumerate(requests) if budget_forcing_requested(r.args[1])]
    others = [i for i, r in enumerate(requests) if not budget_forcing_requested(r.args[1])]
    if others:
        for i, text in zip(others, plain([requests[i] for i in others])):
            texts[i] = text
    groups: dict[str, list[int]] = {}
    for i in forced:
        groups.setdefault(json.dumps(requests[i].args[1], sort_keys=True, default=str), []).append(i)
    bar = tqdm(total=len(forced), disable=disable_tqdm or not forced, desc="generate_until [budget forcing]")
    records: list[tuple[int, dict]] = []
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            gen_kwargs = {k: v for k, v in requests[batch[0]].args[1].items() if k != LOG_KEY}
            outputs = force([requests[i].args[0] for i in batch], gen_kwargs)
            for i, out in zip(batch, outputs):
                texts[i] = out.text
                lm.cache_hook.add_partial("generate_until", requests[i].args, out.text)
                records.append((i, out.log_record()))
            bar.update(len(batch))
    bar.close()
    for i, record in records:  # after caching, so that cache keys see the request as it came
        requests[i].args[1].setdefault(LOG_KEY, []).append(record)
    return texts  # type: ignore[return-value]


__all__ = [
    "ANSWER",
    "BUDGET_FORCING_KEYS",
    "CONTINUATION",
    "END",
    "THINK",
    "BudgetForcedOutput",
    "BudgetForcingConfig",
    "ForcingIds",
    "ThinkingRound",
    "budget_force_torchtune",
    "budget_forcing_config",
    "budget_forcing_requested",
    "force_budget",
    "generation_budgets",
    "run_budget_forcing",
    "serve_generate_until",
]
