"""Entropix front-ends: the transformers LogitsProcessor inside ``generate`` and the torchtune
decoder; observed attention == an eager forward's weights; both front-ends agree on one model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entropy_guided_generation import kit
from entropy_guided_generation.generation import get_decoder, kv_session
from entropy_guided_generation.sampling import HookBasedEntropySampler, generate_entropix
from entropy_guided_generation.sampling.entropix import REGIMES, LastQueryAttention

PAD = 0
PROMPTS = [[5, 9, 12, 7, 3], [22, 3], [14, 15, 16]]


def left_pad(rows, pad=PAD):
    width = max(map(len, rows))
    return torch.tensor([[pad] * (width - len(r)) + r for r in rows])


def tiny_hf(arch: str, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, attn_implementation=attn,
    )
    return model_cls(config).eval()


def eager_last_attention(model, ids: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Last layer's attention weights ``[b, h, L]`` at the last position, from a full eager forward."""
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    valid = ids != pad
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=valid.long(), position_ids=(valid.long().cumsum(-1) - 1).clamp(min=0),
                    output_attentions=True)
    return out.attentions[-1][:, :, -1, :]


def observed_probs(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~visible.unsqueeze(1), float("-inf")), dim=-1)


@pytest.fixture(scope="module")
def kit_models():
    """The kit's tiny Qwen2 checkpoint as a torchtune decoder and as a transformers model (same weights)."""
    from transformers import AutoModelForCausalLM

    ckpt = kit.build_tiny_checkpoint("qwen2")
    return kit.load_torchtune_model(ckpt).eval(), AutoModelForCausalLM.from_pretrained(ckpt).eval(), kit.load_tokenizer()


# ------------------------------------------------------------------ observed attention == eager weights
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_hook_attention_equals_eager_weights_left_padded(arch):
    model = tiny_hf(arch)
    ids = left_pad(PROMPTS)
    sampler = HookBasedEntropySampler(model, None, None, None)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=(ids != PAD).long())
    obs = sampler._observer
    want = eager_last_attention(model, ids)
    assert torch.allclose(observed_probs(obs.scores, obs.visible), want, atol=1e-6)
    assert torch.equal(obs.visible, ids != PAD)
    sampler.remove_hooks()


def test_torchtune_attention_equals_eager_weights_prefill_and_decode_step(kit_models):
    tt, hf, tok = kit_models
    rows = [tok.encode(t, add_bos=False, add_eos=False) for t in ("Tom has 3 apples.", "12 + 5 =", "Why?")]
    ids = left_pad(rows, tok.pad_id)
    b, p = ids.shape
    nxt = torch.tensor([[11], [12], [13]])
    observer = LastQueryAttention(tt)
    with observer.attached(), kv_session(tt, b, p + 4) as session, torch.no_grad():
        session.feed(ids, ids != tok.pad_id, torch.full((b,), p - 1))
        prefill = observed_probs(observer.scores, observer.visible)
        session.feed(nxt, torch.ones_like(nxt, dtype=torch.bool), torch.zeros(b, dtype=torch.long))
        step = observed_probs(observer.scores, observer.visible)
    want_prefill = eager_last_attention(hf, ids, tok.pad_id)
    want_step = eager_last_attention(hf, torch.cat([ids, nxt], 1), tok.pad_id)
    assert torch.allclose(prefill[..., :p], want_prefill, atol=1e-5) and float(prefill[..., p:].sum()) == 0.0
    assert torch.allclose(step[..., : p + 1], want_step, atol=1e-5) and float(step[..., p + 1 :].sum()) == 0.0


# ------------------------------------------------------------------ the LogitsProcessor in generate
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_hf_processor_runs_inside_generate_reproducibly(arch, batch):
    model = tiny_hf(arch)
    ids = left_pad(PROMPTS[:batch])

    def run():
        sampler = HookBasedEntropySampler(model, None, None, 9, config={"n_adaptive_samples": 3}, rng=torch.Generator().manual_seed(3))
        with sampler:
            out = model.generate(ids, attention_mask=(ids != PAD).long(), logits_processor=[sampler], max_new_tokens=6,
                                 do_sample=True, pad_token_id=PAD, eos_token_id=None)
        return out, sampler.stacked_history()

    (out1, hist1), (out2, hist2) = run(), run()
    assert torch.equal(out1, out2) and torch.equal(hist1["regime"], hist2["regime"])
    assert out1.shape == (batch, ids.shape[1] + 6)
    assert set(hist1) >= {"entropy", "varentropy", "attn_entropy", "attn_varentropy", "agreement", "interaction_strength", "regime"}
    assert hist1["regime"].shape == (batch, 6) and bool(((hist1["regime"] >= 0) & (hist1["regime"] < len(REGIMES))).all())
    assert all(bool(torch.isfinite(v.float()).all()) for v in hist1.values())
    # a clarifying token is never emitted twice in a row by the clarify regime
    clarified = hist1["regime"] == REGIMES.index("clarify")
    assert not bool((clarified[:, 1:] & clarified[:, :-1]).any())
    assert bool((out1[:, ids.shape[1]:][clarified] == 9).all())


def test_unsupported_model_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        HookBasedEntropySampler(model, None, None, 9)
    with pytest.raises(ValueError, match="clarifying_question_token_id must be a token id in \\[0, 64\\)"):
        HookBasedEntropySampler(tiny_hf("llama"), None, None, 64)


# ------------------------------------------------------------------ the torchtune decoder
def test_torchtune_decoder_matches_hf_processor_on_the_same_weights(kit_models):
    tt, hf, tok = kit_models
    rows = [tok.encode(t, add_bos=False, add_eos=False) for t in ("Ann has 3 bags.", "7 * 8 =")]
    ids = left_pad(rows, tok.pad_id)
    cfg = {"clarifying_token": "?"}
    ours = get_decoder("entropix")(
        tt, ids, max_generated_tokens=8, pad_id=tok.pad_id, stop_tokens=[tok.eos_id], temperature=0.0,
        rng=torch.Generator().manual_seed(7), sampler_config=cfg, tokenizer=tok,
    )
    with HookBasedEntropySampler(hf, tok, None, None, config=cfg, rng=torch.Generator().manual_seed(7)) as sampler:
        theirs = hf.generate(ids, attention_mask=(ids != tok.pad_id).long(), logits_processor=[sampler], max_new_tokens=8,
                             do_sample=False, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    n = ours.content.shape[1]
    assert torch.equal(ours.content, theirs[:, ids.shape[1] : ids.shape[1] + n])
    hist = sampler.stacked_history()
    assert torch.equal(ours.extras["regime"], hist["regime"][:, :n])
    for name in ("entropy", "varentropy", "attn_entropy", "attn_varentropy", "agreement", "interaction_strength"):
        assert torch.allclose(ours.extras[name], hist[name][:, :n], rtol=1e-4, atol=1e-4), name


def test_torchtune_decoder_records_steps_and_stops_rows(kit_models):
    tt, _, tok = kit_models
    ids = left_pad([tok.encode("12 + 5 =", add_bos=False, add_eos=False)] * 2, tok.pad_id)
    first = generate_entropix(tt, ids, max_generated_tokens=6, pad_id=tok.pad_id, rng=torch.Generator().manual_seed(0))
    # make the second step's token a stop token for row 0 only: that row's later records are empty
    stop = int(first.content[0, 1])
    res = generate_entropix(tt, ids, max_generated_tokens=6, pad_id=tok.pad_id, stop_tokens=[stop],
                            rng=torch.Generator().manual_seed(0))
    assert res.extras["regime"].shape == res.content.shape
    assert int(res.generated_lengths[0]) == 2
    assert bool((res.extras["regime"][0, 2:] == -1).all()) and bool(res.extras["entropy"][0, 2:].isnan().all())
    assert bool((res.extras["regime"][0, :2] >= 0).all()) and res.extras["regime_names"] == REGIMES
    with pytest.raises(ValueError, match="unknown entropix sampler settings"):
        generate_entropix(tt, ids, max_generated_tokens=2, pad_id=tok.pad_id, sampler_config={"temperature": 1.0})


def test_plots_write_pngs(kit_models, tmp_path):
    from entropy_guided_generation.sampling.entropix_plots import plot_entropy_scatter, plot_token_trace

    tt, _, tok = kit_models
    ids = left_pad([tok.encode("Tom has", add_bos=False, add_eos=False)], tok.pad_id)
    res = generate_entropix(tt, ids, max_generated_tokens=5, pad_id=tok.pad_id, rng=torch.Generator().manual_seed(0))
    ex = res.extras
    scatter = plot_entropy_scatter(ex["entropy"], ex["varentropy"], ex["regime"], tmp_path / "scatter.png")
    texts = [tok.decode([t]) for t in res.content[0].tolist()]
    trace = plot_token_trace(texts, ex["entropy"][0], ex["varentropy"][0], ex["regime"][0], tmp_path / "trace.png")
    for path in (scatter, trace):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one text per step"):
        plot_token_trace(texts[:2], ex["entropy"][0], ex["varentropy"][0], ex["regime"][0], tmp_path / "bad.png")


# ------------------------------------------------------------------ through the eval recipe
def test_eval_recipe_selects_entropix_from_the_sampler_section(tmp_path, monkeypatch, kit_cache):
    from omegaconf import OmegaConf

    from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
    from entropy_guided_generation.generation import DECODERS

    calls = []

    def spy(model, prompt, *, tokenizer, **kwargs):
        assert tokenizer is not None  # the clarifying token string is resolved through it
        result = generate_entropix(model, prompt, tokenizer=tokenizer, **kwargs)
        calls.append((kwargs["sampler_config"], result.extras["regime"]))
        return result

    monkeypatch.setitem(DECODERS, "entropix", spy)
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "eval_none.yaml")
    cfg.merge_with({
        "output_dir": str(tmp_path), "tasks": ["kit_gsm8k"], "limit": 2, "batch_size": 2, "bootstrap_iters": 0,
        "gen_kwargs": {"max_gen_toks": 6}, "sampler": {"name": "entropix", "n_adaptive_samples": 3, "temp": 0.5, "clarifying_token": "?"},
    })
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()
    assert recipe.lm.decoder_name == "entropix" and summary["decoder"] == "entropix"
    assert calls and all(config == {"n_adaptive_samples": 3, "temp": 0.5, "clarifying_token": "?"} for config, _ in calls)
    assert all(bool((regime[:, 0] >= 0).all()) for _, regime in calls)
    assert summary["decode_tokens"] > 0
