"""Parameter overrides theta + eta * v through ``torch.func.functional_call``: eta = 0 is the live
model, small eta moves the scores along the JVP, tied embeddings move in both places."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from entropy_guided_generation.kit import load_tokenizer, vocab_size_of
from entropy_guided_generation.scoring import GenerationConfig, ParamsOverrideBuilder, SequenceProcessor
from helpers import tiny_decoder

PROMPTS = ["What is 6 * 7?\n", "Go\n"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(vocab_size=vocab_size_of(), seed=1, weight_scale=2.0)


def tiny_hf_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size_of(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight.normal_(0.0, 0.3)
    return hf


def processor(model, tokenizer) -> SequenceProcessor:
    config = GenerationConfig(temperature=0.9, top_p=0.9, max_new_tokens=8, stop_strings=())
    return SequenceProcessor(model, tokenizer, config, progress=False)


def direction(model, seed: int = 0, names=None) -> dict[str, torch.Tensor]:
    """A random direction with each tensor scaled like its parameter."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if names is None or name in names:
            out[name] = torch.randn(p.shape, generator=g) * p.detach().std().clamp(min=1e-3)
    return out


def flat(scores) -> torch.Tensor:
    return torch.cat([t.detach() for row in scores.logprobs for t in row])


# ---------------------------------------------------------------- eta = 0
@pytest.mark.parametrize("arch", ["torchtune", "hf"])
def test_eta_zero_override_reproduces_the_live_model(model, tokenizer, arch):
    net = model if arch == "torchtune" else tiny_hf_qwen2()
    sp = processor(net, tokenizer)
    seqs = sp.generate_batched(PROMPTS, G=2, seed=0)
    zero = sp.build_params_override(direction(net), 0.0)
    assert zero is sp.build_params_override({}, 0.0)  # cached
    assert all(not t.requires_grad for t in zero.values())
    live, _ = sp.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True)
    over, _ = sp.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True, params_override=zero)
    assert torch.equal(flat(live), flat(over))
    for a, b in zip(sum(live.rb_entropies, []), sum(over.rb_entropies, [])):
        assert (a == b).all()


def test_zero_mapping_follows_in_place_parameter_updates(model, tokenizer):
    net = copy.deepcopy(model)
    sp = processor(net, tokenizer)
    seqs = sp.generate_batched(PROMPTS, G=1, seed=0)
    before = sp.build_params_override({}, 0.0)
    with torch.no_grad():
        net.layers[0].mlp.w1.weight.mul_(1.5)
    after = sp.build_params_override({}, 0.0)
    assert after is not before
    assert torch.equal(after["layers.0.mlp.w1.weight"], net.layers[0].mlp.w1.weight)
    live = sp.teacher_force_logprobs(seqs)
    assert torch.equal(flat(live), flat(sp.teacher_force_logprobs(seqs, params_override=after)))


# ---------------------------------------------------------------- small eta: JVP
def test_small_eta_change_matches_the_jvp_along_v(model, tokenizer):
    sp = processor(model, tokenizer)
    seqs = sp.generate_batched(PROMPTS, G=2, seed=0)
    v = direction(model, seed=3)
    eta = 1e-3
    plus = flat(sp.teacher_force_logprobs(seqs, params_override=sp.build_params_override(v, eta)))
    minus = flat(sp.teacher_force_logprobs(seqs, params_override=sp.build_params_override(v, -eta)))
    base = flat(sp.teacher_force_logprobs(seqs))
    central = (plus - minus) / (2 * eta)

    # Reference: forward-mode JVP of log p(realized tokens) w.r.t. theta along v, on each unpadded row.
    params = {name: p.detach() for name, p in model.named_parameters()}
    jvps = []
    for b in range(seqs.num_prompts):
        for g in range(seqs.num_responses):
            ids = seqs.sequences[b, g][seqs.attention_masks[b, g].bool()].unsqueeze(0)
            start = ids.shape[1] - seqs.gen_lens[b][g]

            def log_p(theta, ids=ids, start=start):
                z = torch.func.functional_call(model, theta, (ids,))[0, start - 1 : -1]
                return z.log_softmax(-1).gather(-1, ids[0, start:].unsqueeze(-1)).squeeze(-1)

            # The CPU flash-attention kernel has no forward-mode AD; the math kernel does.
            with sdpa_kernel(SDPBackend.MATH):
                _, tangent = torch.func.jvp(log_p, (params,), ({k: v[k] for k in params},))
            jvps.append(tangent)
    jvp = torch.cat(jvps)
    assert float((plus - base).abs().max()) > 1e-4  # the step moves the scores visibly
    # Stated tolerance: relative L2 error < 3e-3 at eta = 1e-3 (float32 forward; measured 8e-4:
    # central-difference truncation O(eta^2) plus rounding O(eps / eta)). A wrong or missing
    # override, or v applied with the wrong scale, gives errors of order 1.
    rel = float((central - jvp).norm() / jvp.norm())
    assert rel < 3e-3, f"relative error {rel:.2e} between the finite difference and the JVP"


# ---------------------------------------------------------------- tied embeddings
def test_torchtune_tied_embedding_is_overridden_in_both_places(model, tokenizer):
    sp = processor(model, tokenizer)
    assert "output.weight" not in dict(model.named_parameters())  # TiedLinear reads the embedding
    seqs = sp.generate_batched(PROMPTS, G=1, seed=0)
    eta, v = 0.05, direction(model, seed=4, names={"tok_embeddings.weight"})
    got = flat(sp.teacher_force_logprobs(seqs, params_override=sp.build_params_override(v, eta)))

    both = copy.deepcopy(model)
    with torch.no_grad():
        both.tok_embeddings.weight.add_(eta * v["tok_embeddings.weight"])  # tied: input and output move
    input_only = copy.deepcopy(model)
    moved = torch.nn.Embedding.from_pretrained(input_only.tok_embeddings.weight.detach() + eta * v["tok_embeddings.weight"])
    input_only.tok_embeddings = moved  # the output projection still reads the old embedding module
    expected = flat(processor(both, tokenizer).teacher_force_logprobs(seqs))
    partial = flat(processor(input_only, tokenizer).teacher_force_logprobs(seqs))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float((got - partial).abs().max()) > 1e-3


def test_hf_tied_lm_head_is_one_parameter_and_may_be_named_by_its_alias(tokenizer):
    hf = tiny_hf_qwen2()
    sp = processor(hf, tokenizer)
    builder = ParamsOverrideBuilder(hf)
    assert builder.tied_names == {"lm_head.weight": "model.embed_tokens.weight"}
    seqs = sp.generate_batched(PROMPTS, G=1, seed=0)
    eta = 0.05
    v = torch.randn(hf.lm_head.weight.shape, generator=torch.Generator().manual_seed(5))
    by_alias = sp.build_params_override({"lm_head.weight": v}, eta)
    by_name = sp.build_params_override({"model.embed_tokens.weight": v}, eta)
    assert set(by_alias) == set(by_name) and "lm_head.weight" not in by_alias
    torch.testing.assert_close(by_alias["model.embed_tokens.weight"], by_name["model.embed_tokens.weight"])
    got = flat(sp.teacher_force_logprobs(seqs, params_override=by_alias))
    both = copy.deepcopy(hf)
    assert both.lm_head.weight is both.model.embed_tokens.weight
    with torch.no_grad():
        both.model.embed_tokens.weight.add_(eta * v)
    torch.testing.assert_close(got, flat(processor(both, tokenizer).teacher_force_logprobs(seqs)), rtol=0, atol=1e-5)
    assert float((got - flat(sp.teacher_force_logprobs(seqs))).abs().max()) > 1e-3


# ---------------------------------------------------------------- buffers
def test_buffers_override_equals_a_model_holding_those_buffers(tokenizer):
    hf = tiny_hf_qwen2()
    with torch.no_grad():  # sharp attention, so that the rotary frequencies (a buffer) matter
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    sp = processor(hf, tokenizer)
    seqs = sp.generate_batched(PROMPTS, G=1, seed=0)
    name = "model.rotary_emb.inv_freq"
    faster = dict(hf.named_buffers())[name] * 4.0
    got = flat(sp.teacher_force_logprobs(seqs, buffers_override={name: faster}))
    moved = copy.deepcopy(hf)
    dict(moved.named_buffers())[name].copy_(faster)
    torch.testing.assert_close(got, flat(processor(moved, tokenizer).teacher_force_logprobs(seqs)), rtol=0, atol=1e-5)
    live = flat(sp.teacher_force_logprobs(seqs))
    assert float((got - live).abs().max()) > 1e-3
    # with a params override too: both apply; the eta = 0 mapping with the live buffers is the live model
    zero = sp.build_params_override({}, 0.0)
    same = sp.teacher_force_logprobs(seqs, params_override=zero, buffers_override={name: dict(hf.named_buffers())[name]})
    torch.testing.assert_close(flat(same), live, rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="'model.nope'"):
        sp.teacher_force_logprobs(seqs, buffers_override={"model.nope": faster})
    with pytest.raises(ValueError, match=r"buffers_override\['model.rotary_emb.inv_freq'\] has shape \(3,\)"):
        sp.teacher_force_logprobs_with_diagnostics(seqs, buffers_override={name: torch.zeros(3)})


def test_seed_name_build_params_override_is_the_public_builder():
    assert SequenceProcessor._build_params_override is SequenceProcessor.build_params_override


# ---------------------------------------------------------------- bad directions
def test_bad_directions_are_rejected_with_the_name(model):
    builder = ParamsOverrideBuilder(model)
    with pytest.raises(KeyError, match="'layers.9.nope'"):
        builder.build({"layers.9.nope": torch.zeros(1)}, 0.1)
    with pytest.raises(ValueError, match=r"v\['norm.scale'\] has shape \(3,\)"):
        builder.build({"norm.scale": torch.zeros(3)}, 0.1)


def test_conflicting_tensors_for_one_tied_weight_are_rejected():
    hf = tiny_hf_qwen2()
    shape = hf.lm_head.weight.shape
    with pytest.raises(ValueError, match="one tied weight"):
        ParamsOverrideBuilder(hf).build({"lm_head.weight": torch.zeros(shape), "model.embed_tokens.weight": torch.ones(shape)}, 0.1)


def test_with_grad_override_differentiates_through_v(model, tokenizer):
    # d/dv sum log p(theta + eta v) = eta * (gradient w.r.t. theta at theta + eta v).
    sp = processor(model, tokenizer)
    seqs = sp.generate_batched(PROMPTS, G=1, seed=0)
    eta, name = 0.1, "layers.1.attn.q_proj.weight"
    v = direction(model, seed=6, names={name})[name].requires_grad_(True)
    res = sp.teacher_force_logprobs(seqs, with_grad=True, params_override=sp.build_params_override({name: v}, eta))
    (grad_v,) = torch.autograd.grad(sum(t.sum() for row in res.logprobs for t in row), v)

    moved = copy.deepcopy(model)
    with torch.no_grad():
        dict(moved.named_parameters())[name].add_(eta * v.detach())
    ref = processor(moved, tokenizer).teacher_force_logprobs(seqs, with_grad=True)
    (grad_theta,) = torch.autograd.grad(sum(t.sum() for row in ref.logprobs for t in row), dict(moved.named_parameters())[name])
    assert float(grad_v.abs().max()) > 0
    rel = float((grad_v - eta * grad_theta).norm() / (eta * grad_theta).norm())
    assert rel < 1e-4, f"relative error {rel:.2e}"
