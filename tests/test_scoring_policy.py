"""The sampling-policy math, stop strings and distribution diagnostics against brute-force references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entropy_guided_generation.generation import nucleus
from entropy_guided_generation.scoring import DistributionDiagnostics, SamplingPolicy, StopStringMatcher, nucleus_mask
from entropy_guided_generation.scoring.diagnostics import STEP_FIELDS, TokenStepDiagnostics
from entropy_guided_generation.scoring.stopping import decode_ids, token_texts


# ---------------------------------------------------------------- brute-force references (float64, loops)
def brute_policy(row: list[float], temperature: float, top_p: float) -> list[float]:
    """q over a small vocabulary by the definition: token j is kept iff the tempered mass of the
    tokens with a strictly larger logit is < top_p; q is the renormalized kept mass."""
    scaled = [z / temperature for z in row]
    top = max(scaled)
    weights = [math.exp(z - top) for z in scaled]
    total = sum(weights)
    p = [w / total for w in weights]
    kept = [sum(p[k] for k in range(len(p)) if scaled[k] > scaled[j]) < top_p for j in range(len(p))]
    kept_mass = sum(pj for pj, keep in zip(p, kept) if keep)
    return [pj / kept_mass if keep else 0.0 for pj, keep in zip(p, kept)]


def brute_entropy(q: list[float]) -> float:
    return -sum(x * math.log(x) for x in q if x > 0)


def logits_with_ties() -> torch.Tensor:
    """Rows [k, v=8] including ties at several ranks and random rows."""
    g = torch.Generator().manual_seed(0)
    rows = [
        [2.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, -3.0],
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, -2.0, -2.0],
        [3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0] * 8,
    ]
    random_rows = (torch.randn(4, 8, generator=g, dtype=torch.float64) * 2).tolist()
    return torch.tensor(rows + random_rows, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0])
def test_policy_log_q_and_rb_entropy_match_brute_force(temperature, top_p):
    logits = logits_with_ties()
    policy = SamplingPolicy(temperature=temperature, top_p=top_p, dtype=torch.float64)
    log_q = policy.log_probs(logits)
    entropy = policy.entropy(logits)
    for row, lq, h in zip(logits.tolist(), log_q, entropy):
        q = brute_policy(row, temperature, top_p)
        expected = torch.tensor([math.log(x) if x > 0 else float("-inf") for x in q], dtype=torch.float64)
        assert torch.equal(torch.isinf(lq), torch.isinf(expected)), (row, q, lq)
        finite = torch.isfinite(expected)
        torch.testing.assert_close(lq[finite], expected[finite], rtol=0, atol=1e-12)
        assert abs(float(h) - brute_entropy(q)) < 1e-12
    tokens = torch.arange(8).remainder(logits.shape[1])
    torch.testing.assert_close(policy.token_log_probs(logits, tokens), log_q.gather(-1, tokens[:, None]).squeeze(-1))


def test_nucleus_keeps_every_token_tied_at_the_boundary():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    p = logits.softmax(-1)[0]
    # top_p falls between "first tied token in" and "both tied tokens in": a sort-order rule would
    # keep exactly one of the tied tokens; ours keeps both, whatever order they come in.
    top_p = float(p[0] + p[1] / 2)
    for order in ([0, 1, 2, 3], [0, 2, 1, 3], [3, 2, 1, 0]):
        permuted = logits[:, order]
        kept = torch.isfinite(SamplingPolicy(top_p=top_p, dtype=torch.float64).log_probs(permuted))[0]
        assert kept[[order.index(1), order.index(2)]].all()
        assert not kept[order.index(3)]


def test_sampling_draws_only_kept_tokens_with_frequencies_q():
    logits = torch.tensor([2.0, 1.5, 1.5, 0.3, -0.5, -2.0])
    policy = SamplingPolicy(temperature=0.7, top_p=0.8)
    n = 40_000
    tokens, log_q = policy.sample(logits.expand(n, -1), rng=torch.Generator().manual_seed(1))
    q = policy.log_probs(logits).exp()
    torch.testing.assert_close(log_q, policy.log_probs(logits)[tokens])
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert (freq[q == 0] == 0).all()
    assert (freq - q.double()).abs().max() < 0.01  # 4 standard deviations at n = 40k


def test_greedy_policy_is_a_point_mass_on_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0]])
    policy = SamplingPolicy(greedy=True)
    tokens, log_q = policy.sample(logits)
    assert tokens.tolist() == [1] and log_q.tolist() == [0.0]
    assert policy.entropy(logits).tolist() == [0.0]


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(dtype=torch.bfloat16)])
def test_policy_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match=list(bad)[0] if "dtype" not in bad else "dtype"):
        SamplingPolicy(**bad)


def test_rb_entropy_gradient_is_finite_and_matches_brute_force():
    logits = logits_with_ties()[:4].clone().requires_grad_(True)
    policy = SamplingPolicy(temperature=0.8, top_p=0.7, dtype=torch.float64)
    (grad,) = torch.autograd.grad(policy.entropy(logits).sum(), logits)
    assert torch.isfinite(grad).all()
    # Reference: entropy over the kept set only, with the brute-force kept set held fixed.
    kept = torch.tensor([[x > 0 for x in brute_policy(r, 0.8, 0.7)] for r in logits.detach().tolist()])
    ref_logits = logits.detach().clone().requires_grad_(True)
    masked = torch.where(kept, ref_logits / 0.8, torch.full_like(ref_logits, -1e300))
    q = masked.softmax(-1)
    ref = -(q * torch.where(kept, masked.log_softmax(-1), 0)).sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- stop strings
@pytest.fixture(scope="module")
def tokenizer():
    from entropy_guided_generation.kit.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def texts(tokenizer):
    from entropy_guided_generation.kit.tokenizer import vocab_size_of

    return token_texts(tokenizer, vocab_size_of())


def first_stop_by_decoding(tokenizer, ids: list[int], stop: str) -> int:
    """Reference: the first t whose decoded prefix ids[: t + 1] contains ``stop`` (-1: never)."""
    for t in range(len(ids)):
        if stop in decode_ids(tokenizer, ids[: t + 1]):
            return t
    return -1


@pytest.mark.parametrize("stop", ["</answer>", "e", "1 + 1", "aab"])
def test_stop_string_matcher_finds_the_first_completion_across_token_boundaries(tokenizer, texts, stop):
    pieces = [
        "Ann has 12 shells.</answer> more",
        "x </answer>",
        "so the answer.</ans" + "wer>!",
        "aaab aab 1 + 1 = 2",
        "1 +1 + 1 + 1 and e",
        "no stop here: 7 - 3",
    ]
    rows = []
    for text in pieces:
        # Encode in fragments so the string is split across tokens in unusual places too.
        cut = len(text) // 2
        rows.append(tokenizer.encode(text[:cut], add_bos=False, add_eos=False) + tokenizer.encode(text[cut:], add_bos=False, add_eos=False))
        rows.append(tokenizer.encode(text, add_bos=False, add_eos=False))
    width = max(len(r) for r in rows)
    batch = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    matcher = StopStringMatcher(stop, texts)
    state, first = matcher.initial_state(len(rows)), torch.full((len(rows),), -1)
    for t in range(width):
        state, completed = matcher.advance(state, batch[:, t])
        first = torch.where((first < 0) & completed, torch.full_like(first, t), first)
    expected = [first_stop_by_decoding(tokenizer, r, stop) for r in rows]
    assert first.tolist() == expected
    assert any(e >= 0 for e in expected)


def test_stop_string_matcher_rejects_an_empty_string(texts):
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher("", texts)


# ---------------------------------------------------------------- diagnostics
def brute_step_diagnostics(row: list[float], temperature: float, top_p: float, eos: int, token: int) -> dict[str, float]:
    q = brute_policy(row, temperature, top_p)
    full = brute_policy(row, temperature, 1.0)
    h = brute_entropy(q)
    head = sum(pj for pj, qj in zip(full, q) if qj > 0)
    tail = 1 - head
    ordered = sorted(q, reverse=True)
    collision = sum(x * x for x in q)
    mean = sum(row) / len(row)
    return {
        "rb_entropy": h,
        "head_mass": head,
        "tail_mass": tail,
        "two_point_entropy": -sum(x * math.log(x) for x in (head, tail) if x > 0),
        "top1_prob": ordered[0],
        "margin": ordered[0] - ordered[1],
        "collision_prob": collision,
        "renyi2_entropy": -math.log(collision),
        "eff_support": math.exp(h),
        "logit_mean": mean,
        "logit_std": math.sqrt(sum((z - mean) ** 2 for z in row) / len(row)),
        "eos_prob": q[eos],
        "policy_surprisal": -math.log(q[token]) if q[token] > 0 else math.inf,
    }


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_step_diagnostics_match_brute_force(temperature, top_p):
    logits = logits_with_ties()
    tokens = logits.argmax(-1)
    diag = DistributionDiagnostics(top_p=top_p, temperature=temperature, eos_token_id=2, dtype=torch.float64)
    pack = diag.compute_from_logits(logits, tokens)
    for t, row in enumerate(logits.tolist()):
        expected = brute_step_diagnostics(row, temperature, top_p, eos=2, token=int(tokens[t]))
        for name in STEP_FIELDS:
            got = float(getattr(pack.step, name)[t])
            assert got == pytest.approx(expected[name], abs=1e-10), (name, t)


def test_sequence_summaries_match_numpy_over_valid_steps_only():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1])
    diag = DistributionDiagnostics(top_p=0.9, temperature=0.8, window=2, dtype=torch.float64)
    packs = diag.compute_batch(logits, lengths)
    for pack, length in zip(packs, lengths.tolist()):
        assert pack.sequence.length == length
        for name in ("rb_entropy", "top1_prob", "tail_mass", "logit_std"):
            series = getattr(pack.step, name)
            assert series.shape == (length,)
            summary = getattr(pack.sequence, name)
            assert summary.sum == pytest.approx(series.sum())
            assert summary.mean == pytest.approx(series.mean())
            assert summary.min == pytest.approx(series.min())
            assert summary.max == pytest.approx(series.max())
            assert summary.early_mean == pytest.approx(series[:2].mean())
            assert summary.late_mean == pytest.approx(series[-2:].mean())
    # Steps past a row's length never leak into its values.
    alone = diag.compute_batch(logits[1:2, :3], lengths[1:2])[0]
    np.testing.assert_allclose(alone.step.rb_entropy, packs[1].step.rb_entropy)
    assert alone.sequence.rb_entropy == packs[1].sequence.rb_entropy


def test_step_fields_cover_the_dataclass():
    assert tuple(TokenStepDiagnostics.__dataclass_fields__) == STEP_FIELDS


def reference_nucleus(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus rule by definition, vectorized in float64: j kept iff mass strictly above z_j < top_p."""
    p = scaled.softmax(-1)
    above = (scaled.unsqueeze(-2) > scaled.unsqueeze(-1)).to(p.dtype)  # [n, j, k]: z_k > z_j
    return (above * p.unsqueeze(-2)).sum(-1) < top_p


@pytest.mark.parametrize("heads_from", ["whole-row sort of every row", "whole-row sort of unsettled rows", "topk per stage"])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_nucleus_mask_is_exact_in_every_stage_on_a_large_vocabulary(top_p, heads_from, monkeypatch):
    # Peaked rows settle in the top-4 stage, medium rows in the top-64 stage, flat rows need the
    # full sort; quantized logits put ties at every boundary. Every way of finding the heads (CPU
    # rows sorted whole up front, all of a small batch or the rows the maximum leaves unsettled, or
    # topk per stage as on long rows) gives the exact mask.
    if heads_from == "whole-row sort of unsettled rows":
        monkeypatch.setattr(nucleus, "SEARCH_ALL_ROWS_MAX_BATCH", 0)
    if heads_from == "topk per stage":
        monkeypatch.setattr(nucleus, "SORT_WHOLE_ROWS_MAX_VOCAB", 0)

    g = torch.Generator().manual_seed(7)
    v = 300
    base = torch.randn(60, v, generator=g, dtype=torch.float64)
    scales = torch.tensor([8.0] * 20 + [2.5] * 20 + [0.3] * 20, dtype=torch.float64).unsqueeze(1)
    scaled = torch.round(base * scales * 4) / 4
    got = nucleus_mask(scaled, top_p)
    assert torch.equal(got, reference_nucleus(scaled, top_p))
    assert torch.equal(nucleus_mask(scaled.float(), top_p), reference_nucleus(scaled.float().double(), top_p))
    sizes = got.sum(-1)
    assert sizes.min() <= 4 and ((sizes > 4) & (sizes <= 64)).any() and sizes.max() > 64
