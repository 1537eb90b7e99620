"""Entropix sampler core: metrics == brute force, regimes reached by constructed logits and doing
what they say, config validation."""
from __future__ import annotations

import math

import pytest
import torch

from entropy_guided_generation.sampling import EntropixConfig, attention_metrics, entropix_metrics, logit_metrics
from entropy_guided_generation.sampling.entropix import (
    ADAPTIVE,
    ARGMAX,
    CAREFUL,
    CLARIFY,
    EXPLORE,
    REGIMES,
    RESAMPLE,
    choose_regime,
    entropix_step,
    regime_parameters,
    resolve_clarifying_token,
)
from entropy_guided_generation.sampling.entropix_metrics import EntropixMetrics

V = 256
CLARIFY_ID = 7


# ------------------------------------------------------------------ metrics vs explicit loops
def brute_logit_metrics(row: list[float]) -> tuple[float, float]:
    m = max(row)
    z = sum(math.exp(x - m) for x in row)
    p = [math.exp(x - m) / z for x in row]
    h = -sum(pi * math.log2(pi) for pi in p if pi > 0)
    var = sum(pi * (-math.log2(pi) - h) ** 2 for pi in p if pi > 0)
    return h, var


def brute_attention(scores: list[list[float]], visible: list[bool]) -> dict[str, float]:
    """scores [h][L] of one row, visible [L]: metrics over the visible keys only."""
    keys = [j for j, ok in enumerate(visible) if ok]
    probs = []
    for head in scores:
        m = max(head[j] for j in keys)
        z = sum(math.exp(head[j] - m) for j in keys)
        probs.append({j: math.exp(head[j] - m) / z for j in keys})
    ent = [-sum(p * math.log2(p) for p in ph.values() if p > 0) for ph in probs]
    n_h = len(scores)
    mean_ent = sum(ent) / n_h
    var_ent = sum((e - mean_ent) ** 2 for e in ent) / n_h  # population variance (entropix's jnp.var)
    mean_p = {j: sum(ph[j] for ph in probs) / n_h for j in keys}
    agreement = sum(sum(abs(ph[j] - mean_p[j]) for j in keys) / len(keys) for ph in probs) / n_h
    interaction = sum(sum(abs(head[j]) for j in keys) / len(keys) for head in scores) / n_h
    return {"attn_entropy": mean_ent, "attn_varentropy": var_ent, "agreement": agreement, "interaction_strength": interaction}


def test_logit_metrics_equal_brute_force_in_bits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[3, 10:] = float("-inf")  # tokens removed from the distribution contribute nothing
    h, v = logit_metrics(logits)
    for b in range(4):
        want_h, want_v = brute_logit_metrics([x for x in logits[b].tolist() if x != float("-inf")])
        assert h[b].item() == pytest.approx(want_h, rel=1e-5)
        assert v[b].item() == pytest.approx(want_v, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_metrics_equal_brute_force_over_visible_keys_only(heads):
    gen = torch.Generator().manual_seed(heads)
    scores = torch.randn(4, heads, 9, generator=gen) * 2
    visible = torch.tensor(
        [
            [True] * 9,  # no padding
            [False, False, False] + [True] * 6,  # left padding
            [False] * 8 + [True],  # only the query itself
            [False, True, True, False, True, False, True, True, False],  # scattered, future slots masked
        ]
    )
    # masked keys carry huge scores: they must not leak into any metric
    scores = scores.masked_fill(~visible.unsqueeze(1), 1e4)
    got = attention_metrics(scores, visible)
    for b in range(4):
        want = brute_attention(scores[b].tolist(), visible[b].tolist())
        for name, value in want.items():
            assert got[name][b].item() == pytest.approx(value, rel=1e-4, abs=1e-5), (name, b)
    assert all(bool(torch.isfinite(t).all()) for t in got.values())
    # visible=None (the query sees every key) equals an all-True mask
    everything = attention_metrics(scores[:1], None)
    assert all(torch.allclose(everything[name], got[name][:1], rtol=1e-6, atol=1e-7) for name in got)
    # the decoders' unchecked path computes the same values
    logits = torch.randn(4, 11, generator=gen)
    checked = entropix_metrics(logits, scores, visible).as_dict()
    unchecked = entropix_metrics(logits, scores, visible, validate=False).as_dict()
    assert all(torch.equal(checked[name], unchecked[name]) for name in checked)
    assert torch.equal(checked["attn_entropy"], got["attn_entropy"])


def test_attention_metrics_reject_a_row_without_visible_keys():
    with pytest.raises(ValueError, match=r"rows \[1\] have no visible key"):
        attention_metrics(torch.zeros(2, 2, 3), torch.tensor([[True, True, False], [False, False, False]]))


# ------------------------------------------------------------------ regimes from constructed logits
def levels(*groups: tuple[float, int]) -> torch.Tensor:
    """Logits [V] from (mass, count) groups in token order: each group's tokens share its mass
    (up to a 1e-2 spread that breaks ties, so top-k keeps a well-defined set)."""
    z, start = torch.full((V,), -60.0), 0
    for mass, count in groups:
        z[start : start + count] = math.log(mass / count) - 1e-2 * torch.arange(count) / count
        start += count
    return z


CASES = {
    "argmax": torch.cat([torch.tensor([25.0]), torch.zeros(V - 1)]),
    "clarify": torch.zeros(V),  # uniform: 8 bits, varentropy 0
    "explore": levels((0.5, 1), (0.4, 10), (0.1, V - 11)),  # < 5 bits, varentropy > 5
    "resample": levels((0.3, 1), (0.7, V - 1)),  # ~6.5 bits, varentropy ~9.6
    "adaptive": torch.cat([torch.tensor([1.0, 0.5, 0.0, -0.5]), torch.full((V - 4,), -60.0)]),
}


def step_inputs(case: str, rows: int, seed: int = 0):
    logits = CASES[case].unsqueeze(0).expand(rows, -1).contiguous()
    scores = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(seed)).expand(rows, -1, -1)
    visible = torch.ones(rows, 6, dtype=torch.bool)
    return logits, entropix_metrics(logits, scores, visible)


def brute_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> dict[int, float]:
    """Entropix's sampling distribution of one row, by explicit steps over the sorted vocabulary."""
    z = [x / temperature for x in logits.tolist()]
    m = max(z)
    total = sum(math.exp(x - m) for x in z)
    probs = sorted(((math.exp(x - m) / total, i) for i, x in enumerate(z)), reverse=True)
    kept, mass = {}, 0.0
    for rank, (p, i) in enumerate(probs):
        if rank > 0 and (p < min_p * probs[0][0] or rank >= top_k or mass >= top_p):
            break
        kept[i] = p
        mass += p
    norm = sum(kept.values())
    return {i: p / norm for i, p in kept.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_constructed_logits_reach_each_regime(case):
    _, metrics = step_inputs(case, 1)
    logits, _ = step_inputs(case, 1)
    decision = entropix_step(logits, metrics, EntropixConfig(), torch.tensor([3]), CLARIFY_ID)
    assert REGIMES[int(decision.regime)] == case, (metrics.entropy, metrics.varentropy)


def test_argmax_regime_returns_the_argmax():
    logits, metrics = step_inputs("argmax", 64)
    out = entropix_step(logits, metrics, EntropixConfig(), torch.full((64,), 3), CLARIFY_ID)
    assert bool((out.regime == ARGMAX).all()) and bool((out.token == 0).all())


def test_clarifying_token_is_inserted_once_then_careful_sampling():
    rows, cfg = 2000, EntropixConfig()
    logits, metrics = step_inputs("clarify", rows)
    rng = torch.Generator().manual_seed(0)
    first = entropix_step(logits, metrics, cfg, torch.full((rows,), 3), CLARIFY_ID, rng)
    assert bool((first.regime == CLARIFY).all()) and bool((first.token == CLARIFY_ID).all())
    second = entropix_step(logits, metrics, cfg, first.token, CLARIFY_ID, rng)
    assert bool((second.regime == CAREFUL).all())
    want_t = min(cfg.helv_max_temp, cfg.temp * (cfg.helv_attn_ent_offset + cfg.helv_attn_ent_coef * metrics.attn_entropy[0].item()))
    assert second.params.temperature[0].item() == pytest.approx(want_t, rel=1e-5)
    # uniform logits: the careful draw keeps top_k = 27 tokens; the clarifying token is not forced again
    assert len(second.token.unique()) == cfg.top_k
    assert (second.token == CLARIFY_ID).float().mean().item() < 0.1
    # without a clarifying token the regime samples carefully from the start
    none = entropix_step(logits, metrics, cfg, torch.full((rows,), 3), None, rng)
    assert bool((none.regime == CAREFUL).all())


def assert_frequencies(tokens: torch.Tensor, expected: dict[int, float]) -> None:
    n = tokens.numel()
    assert set(tokens.unique().tolist()) <= set(expected), "a token outside the filtered support was drawn"
    for token, p in sorted(expected.items(), key=lambda kv: -kv[1])[:3]:
        freq = (tokens == token).float().mean().item()
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (token, freq, p)


@pytest.mark.parametrize("case", ["explore", "resample"])
def test_explore_and_resample_sample_with_their_adjusted_parameters(case):
    rows, cfg = 6000, EntropixConfig()
    logits, metrics = step_inputs(case, rows)
    out = entropix_step(logits, metrics, cfg, torch.full((rows,), 3), CLARIFY_ID, torch.Generator().manual_seed(1))
    m = {k: v[0].item() for k, v in metrics.as_dict().items()}
    if case == "explore":
        t = min(cfg.lehv_max_temp, cfg.temp * (cfg.lehv_interaction_strength_offset + cfg.lehv_interaction_strength_coef * m["interaction_strength"]))
        k = max(cfg.lehv_min_top_k, int(cfg.top_k * (1 + cfg.lehv_agreement_coef * (1 - m["agreement"]))))
        p = cfg.top_p
        assert k > cfg.top_k  # the explore regime widens top-k
    else:
        t = max(cfg.hehv_min_temp, cfg.temp * (cfg.hehv_attn_vent_offset + cfg.hehv_attn_vent_coef * m["attn_varentropy"]))
        k, p = cfg.top_k, max(cfg.hehv_min_top_p, cfg.top_p - cfg.hehv_attn_ent_coef * m["attn_entropy"])
        assert p < cfg.top_p  # the resample regime narrows top-p
    assert out.params.temperature[0].item() == pytest.approx(t, rel=1e-5)
    assert int(out.params.top_k[0]) == k and out.params.top_p[0].item() == pytest.approx(p, rel=1e-5)
    expected = brute_filtered(logits[0], t, k, p, cfg.min_p)
    base = brute_filtered(logits[0], cfg.temp, cfg.top_k, cfg.top_p, cfg.min_p)
    assert abs(expected[0] - base[0]) > 0.05  # the adjustment is visible in the distribution
    assert_frequencies(out.token, expected)


def test_adaptive_regime_keeps_the_most_likely_of_its_candidates():
    rows, cfg = 6000, EntropixConfig()
    logits, metrics = step_inputs("adaptive", rows)
    out = entropix_step(logits, metrics, cfg, torch.full((rows,), 3), CLARIFY_ID, torch.Generator().manual_seed(2))
    m = {k: v[0].item() for k, v in metrics.as_dict().items()}
    unc, attn_unc = m["entropy"] + m["varentropy"], m["attn_entropy"] + m["attn_varentropy"]
    t = cfg.temp * (1 + cfg.ada_temp_logits * unc + cfg.ada_temp_attn * attn_unc - cfg.ada_temp_agree * m["agreement"])
    k = int(min(max(round(cfg.top_k * (1 + cfg.ada_top_k_int * m["interaction_strength"] - cfg.ada_top_k_agree * m["agreement"])), 1), 100))
    p = min(max(cfg.top_p * (1 + cfg.ada_top_p * m["attn_varentropy"]), 0.1), 1.0)
    min_p = min(max(cfg.min_p * (1 - cfg.ada_min_p * unc), 0.01), 0.5)
    assert out.params.temperature[0].item() == pytest.approx(t, rel=1e-5)
    assert int(out.params.top_k[0]) == k
    q = brute_filtered(logits[0], t, k, p, min_p)
    order = sorted(q, key=lambda i: -q[i])
    # best of n candidates by log-prob: P(i) = P(max rank among n draws is i's rank)
    n, expected, tail = cfg.n_adaptive_samples, {}, 1.0
    for i in order:
        expected[i] = tail**n - (tail - q[i]) ** n
        tail -= q[i]
    assert expected[order[0]] > q[order[0]] + 0.1
    assert_frequencies(out.token, expected)


def test_regimes_mixed_in_one_batch_are_decided_per_row():
    cases = list(CASES)
    logits = torch.stack([CASES[c] for c in cases])
    scores = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)).expand(len(cases), -1, -1)
    metrics = entropix_metrics(logits, scores, torch.ones(len(cases), 6, dtype=torch.bool))
    out = entropix_step(logits, metrics, EntropixConfig(), torch.full((len(cases),), 3), CLARIFY_ID)
    assert [REGIMES[int(r)] for r in out.regime] == cases
    assert out.token[cases.index("clarify")].item() == CLARIFY_ID
    assert {int(r) for r in out.regime} == {ARGMAX, CLARIFY, EXPLORE, RESAMPLE, ADAPTIVE}
    # Each row's regime and parameters are those of the same row decided alone (batched == one by one).
    for i in range(len(cases)):
        alone_metrics = entropix_metrics(logits[i : i + 1], scores[i : i + 1], torch.ones(1, 6, dtype=torch.bool))
        alone = entropix_step(logits[i : i + 1], alone_metrics, EntropixConfig(), torch.full((1,), 3), CLARIFY_ID)
        assert int(alone.regime) == int(out.regime[i]), cases[i]
        for name in ("temperature", "top_k", "top_p", "min_p"):
            torch.testing.assert_close(getattr(alone.params, name), getattr(out.params, name)[i : i + 1], msg=f"{cases[i]} {name}")


# ------------------------------------------------------------------ entropix's own rules, at their edges
def upstream_regime(h: float, v: float, c: EntropixConfig) -> str:
    """xjdr-alt/entropix sampler.py's if/elif chain, as written there (strict comparisons)."""
    if h < c.low_ent_thresh and v < c.low_vent_thresh:
        return "argmax"
    elif h > c.high_ent_thresh and v < c.low_vent_thresh:
        return "clarify"
    elif h < c.high_ent_thresh and v > c.high_vent_thresh:
        return "explore"
    elif h > c.med_ent_thresh and v > c.high_vent_thresh:
        return "resample"
    return "adaptive"


def metrics_of(**values: float) -> EntropixMetrics:
    """One-row metrics, float32 as the sampler computes them; unnamed metrics are 0."""
    names = ("entropy", "varentropy", "attn_entropy", "attn_varentropy", "agreement", "interaction_strength")
    rows = max((len(v) for v in values.values() if isinstance(v, list)), default=1)
    return EntropixMetrics(**{n: torch.tensor(values.get(n, 0.0), dtype=torch.float32).expand(rows).clone() for n in names})


def test_regimes_follow_entropix_strict_threshold_comparisons_everywhere_on_a_grid():
    cfg = EntropixConfig()
    # every threshold, a point just below and above each, and values between them
    hs = sorted({x for t in (cfg.low_ent_thresh, cfg.med_ent_thresh, cfg.high_ent_thresh) for x in (t - 0.01, t, t + 0.01)} | {0.0, 1.0, 4.0, 8.0})
    vs = sorted({x for t in (cfg.low_vent_thresh, cfg.high_vent_thresh) for x in (t - 0.01, t, t + 0.01)} | {0.0, 2.0, 9.0})
    grid = [(h, v) for h in hs for v in vs]
    # float32 values, as the metrics are: thresholds compare as float32 in entropix too
    f32 = [(float(torch.tensor(h)), float(torch.tensor(v))) for h, v in grid]
    metrics = metrics_of(entropy=[h for h, _ in grid], varentropy=[v for _, v in grid])
    got = choose_regime(metrics, cfg, torch.full((len(grid),), 3), CLARIFY_ID)
    want = [upstream_regime(h, v, EntropixConfig(**{k: float(torch.tensor(getattr(cfg, k))) for k in (
        "low_ent_thresh", "med_ent_thresh", "high_ent_thresh", "low_vent_thresh", "high_vent_thresh")})) for h, v in f32]
    assert [REGIMES[int(r)] for r in got] == want
    # exactly at a threshold is neither below nor above it: (5.0, 0.05) is adaptive, not clarify
    at_high = choose_regime(metrics_of(entropy=5.0, varentropy=0.05), cfg, torch.tensor([3]), CLARIFY_ID)
    assert REGIMES[int(at_high)] == "adaptive"
    assert REGIMES[int(choose_regime(metrics_of(entropy=5.01, varentropy=0.05), cfg, torch.tensor([3]), CLARIFY_ID))] == "clarify"


@pytest.mark.parametrize(
    "config, interaction, agreement, want",
    [
        (EntropixConfig(), 1.8, 0.2, 40),  # 27 * 1.5 = 40.5 -> 40 (entropix: 40; rounding halves up gives 41)
        (EntropixConfig(top_k=4, ada_top_k_int=0.25), 0.5, 0.0, 4),  # 4.5 -> 4
        (EntropixConfig(top_k=4, ada_top_k_int=0.25), 1.5, 0.0, 6),  # 5.5 -> 6
        (EntropixConfig(top_k=4, ada_top_k_int=0.25), 1.25, 0.0, 5),  # 5.25 -> 5
    ],
)
def test_adaptive_top_k_rounds_half_to_even_as_entropix(config, interaction, agreement, want):
    metrics = metrics_of(interaction_strength=interaction, agreement=agreement)
    params = regime_parameters(torch.tensor([ADAPTIVE]), metrics, config)
    assert int(params.top_k) == want


def test_attention_varentropy_is_the_population_variance_across_heads():
    # two heads, one attending to one key (0 bits), one uniform over 4 keys (2 bits): variance 1, not 2
    scores = torch.tensor([[[50.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    got = attention_metrics(scores, None)
    assert got["attn_entropy"].item() == pytest.approx(1.0, abs=1e-5)
    assert got["attn_varentropy"].item() == pytest.approx(1.0, abs=1e-5)
    assert attention_metrics(scores[:, :1], None)["attn_varentropy"].item() == 0.0


# ------------------------------------------------------------------ config
def test_config_defaults_are_entropix_classic_and_load_from_yaml(tmp_path):
    cfg = EntropixConfig()
    assert (cfg.temp, cfg.top_p, cfg.top_k, cfg.min_p) == (0.666, 0.90, 27, 0.03)
    assert (cfg.low_ent_thresh, cfg.med_ent_thresh, cfg.high_ent_thresh, cfg.high_vent_thresh) == (0.1, 3.0, 5.0, 5.0)
    path = tmp_path / "entropix.yaml"
    path.write_text("temp: 0.5\nhigh_ent_thresh: 6.0\nclarifying_token: '?'\n")
    loaded = EntropixConfig.from_yaml(path)
    assert (loaded.temp, loaded.high_ent_thresh, loaded.clarifying_token, loaded.top_k) == (0.5, 6.0, "?", 27)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"low_ent_thresh": 4.0}, "entropy thresholds must ascend"),
        ({"med_ent_thresh": 6.0}, "entropy thresholds must ascend"),
        ({"low_vent_thresh": 6.0}, "varentropy thresholds must ascend"),
        ({"top_p": 1.5}, "top_p must lie in"),
        ({"n_adaptive_samples": 0}, "n_adaptive_samples must be an int"),
        ({"tempp": 1.0}, r"unknown entropix sampler settings \['tempp'\]"),
    ],
)
def test_bad_config_is_rejected_with_the_bad_value(values, match):
    with pytest.raises(ValueError, match=match):
        EntropixConfig.from_dict(values)


def test_clarifying_token_string_resolves_through_the_tokenizer():
    from entropy_guided_generation import kit

    tok = kit.load_tokenizer()
    assert resolve_clarifying_token("?", tok) == tok.encode("?", add_bos=False, add_eos=False)[0]
    with pytest.raises(ValueError, match="unknown clarifying_token 'what now'"):
        resolve_clarifying_token("what now", tok)
    with pytest.raises(ValueError, match="pass tokenizer="):
        resolve_clarifying_token("?", None)
