"""SequenceProcessor end to end on real tiny models and the kit tokenizer: generation records the
same log q that teacher forcing recomputes, teacher-forced scores equal a direct unpadded forward,
with-grad gradients equal autograd of a direct computation, text paths (stop strings, GSM8K reward)."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from entropy_guided_generation.generation import generate_plain, left_pad
from entropy_guided_generation.kit import build_tokenizer, load_tokenizer, vocab_size_of, write_gsm8k_jsonl
from entropy_guided_generation.scoring import (
    BASELINE_FEATURES,
    BatchedSequences,
    DistributionDiagnostics,
    GenerationConfig,
    SequenceProcessor,
    gsm8k_answer_reward,
    load_prompt_dataset,
    register_gsm8k_jsonl,
)
from entropy_guided_generation.scoring.diagnostics import STEP_FIELDS
from helpers import tiny_decoder

PROMPTS = ["What is 6 * 7?\n", "Ann has 3 bags with 4 shells each. How many?\n", "Go\n"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    # weight_scale 2 spreads the distributions: nucleus truncation then cuts real mass.
    return tiny_decoder(vocab_size=vocab_size_of(), seed=0, weight_scale=2.0)


def processor(model, tokenizer, **generation) -> SequenceProcessor:
    settings = dict(max_new_tokens=10, stop_strings=())
    settings.update(generation)
    return SequenceProcessor(model, tokenizer, GenerationConfig(**settings), progress=False)


# ---------------------------------------------------------------- direct references (one row at a time)
def real_rows(seqs: BatchedSequences):
    """Per response, in [b][g] order: (unpadded ids [n], index of the first response token)."""
    out = []
    for b in range(seqs.num_prompts):
        for g in range(seqs.num_responses):
            ids = seqs.sequences[b, g][seqs.attention_masks[b, g].bool()]
            out.append((ids, ids.numel() - seqs.gen_lens[b][g]))
    return out


def brute_log_q(z: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log q by definition on logits [T, v]: j kept iff the tempered mass strictly above z_j is < top_p."""
    scaled = z / temperature
    p = scaled.softmax(-1)
    above = (scaled.unsqueeze(-2) > scaled.unsqueeze(-1)).to(p.dtype)  # [T, j, k]: z_k > z_j
    kept = (above * p.unsqueeze(-2)).sum(-1) < top_p
    return torch.where(kept, scaled, torch.full_like(scaled, float("-inf"))).log_softmax(-1)


def direct_scores(model, ids: torch.Tensor, start: int, temperature: float, top_p: float) -> dict:
    """log p, log q and H(q) of response tokens ids[start:] from one unpadded forward."""
    z = model(ids.unsqueeze(0))[0, start - 1 : -1].double()
    target = ids[start:].unsqueeze(-1)
    log_q = brute_log_q(z, temperature, top_p)
    q = log_q.exp()
    return {
        "log_p": z.log_softmax(-1).gather(-1, target).squeeze(-1),
        "log_q": log_q.gather(-1, target).squeeze(-1),
        "rb": -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1),
        "logits": z,
    }


# ---------------------------------------------------------------- generation vs teacher forcing
@pytest.mark.parametrize(
    "settings",
    [dict(temperature=1.0, top_p=1.0), dict(temperature=0.7, top_p=0.8), dict(temperature=1.3, top_p=0.5), dict(do_sample=False)],
    ids=["plain", "t0.7-p0.8", "t1.3-p0.5", "greedy"],
)
def test_log_q_recorded_at_generation_equals_teacher_forced_log_q(model, tokenizer, settings):
    sp = processor(model, tokenizer, **settings)
    seqs = sp.generate_batched(PROMPTS, G=3, seed=1)
    scores = sp.teacher_force_logprobs(seqs, tf_batch_size=4)
    for b in range(3):
        for g in range(3):
            n = seqs.gen_lens[b][g]
            recorded = seqs.gen_logqs[b, g, :n]
            assert torch.isfinite(recorded).all() and torch.isnan(seqs.gen_logqs[b, g, n:]).all()
            # KV-cached generation vs one full teacher-forced forward: float32 noise only.
            torch.testing.assert_close(scores.token_logqs[b][g], recorded, rtol=0, atol=1e-4)
            assert scores.sequence_logqs[b][g] == pytest.approx(float(recorded.sum()), abs=1e-3)
    if settings.get("do_sample") is False:
        assert all(float(v.abs().max()) == 0.0 for row in scores.token_logqs for v in row)


def twin_token_decoder(vocab_size: int) -> torch.nn.Module:
    """A tiny decoder whose tokens come in pairs with one (tied) embedding row: every logit has an
    exact twin, so every nucleus boundary falls on a tie."""
    model = tiny_decoder(vocab_size=vocab_size, seed=0, weight_scale=2.0)
    with torch.no_grad():
        emb = model.tok_embeddings.weight
        emb[1::2] = emb[0 : 2 * emb[1::2].shape[0] : 2]
    return model


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.5), (0.7, 0.8), (1.3, 0.95)])
def test_decoder_samples_have_finite_log_q_under_the_scorers_policy(tokenizer, temperature, top_p):
    model = twin_token_decoder(vocab_size_of())
    prompt = left_pad([tokenizer.encode(p, add_bos=True, add_eos=False) for p in PROMPTS] * 4, tokenizer.pad_id)
    out = generate_plain(
        model, prompt, max_generated_tokens=16, pad_id=tokenizer.pad_id, temperature=temperature, top_p=top_p,
        stop_tokens=[tokenizer.eos_id], rng=torch.Generator().manual_seed(0),
    )
    rows, width = out.content.shape
    assert torch.equal(model(out.tokens)[..., 0:-1:2], model(out.tokens)[..., 1::2])  # the ties are exact
    generated = torch.arange(width).unsqueeze(0) < out.generated_lengths.unsqueeze(1)
    seqs = BatchedSequences(
        sequences=out.tokens.unsqueeze(1), prompt_lens=[out.prompt_length] * rows,
        gen_lens=[[int(n)] for n in out.generated_lengths],
        attention_masks=torch.cat([prompt != tokenizer.pad_id, generated], dim=1).long().unsqueeze(1),
        responses_text=[[""]] * rows,
    )
    scores = processor(model, tokenizer, temperature=temperature, top_p=top_p).teacher_force_logprobs(seqs)
    assert all(torch.isfinite(row[0]).all() for row in scores.token_logqs)
    drawn = out.content[generated]
    assert (drawn % 2 == 0).any() and (drawn % 2 == 1).any()  # both twins of tied pairs get drawn


def test_generation_is_reproducible_with_a_seed_and_varies_without_it(model, tokenizer):
    sp = processor(model, tokenizer, temperature=1.0, top_p=0.9)
    a, b = sp.generate_batched(PROMPTS, G=2, seed=5), sp.generate_batched(PROMPTS, G=2, seed=5)
    c = sp.generate_batched(PROMPTS, G=2, seed=6)
    assert torch.equal(a.sequences, b.sequences) and a.responses_text == b.responses_text
    assert not torch.equal(a.sequences, c.sequences)
    # Prompts are left-padded to one width; the prompt block is the same for every response.
    p = a.prompt_length
    assert a.prompt_lens == [p] * 3
    for row in range(3):
        ids = tokenizer.encode(PROMPTS[row], add_bos=True, add_eos=False)
        assert a.sequences[row, :, p - len(ids) : p].tolist() == [ids, ids]
        assert (a.attention_masks[row, :, : p - len(ids)] == 0).all()


# ---------------------------------------------------------------- teacher forcing vs a direct computation
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_teacher_forced_scores_equal_a_direct_unpadded_forward(model, tokenizer, temperature, top_p):
    sp = processor(model, tokenizer, temperature=temperature, top_p=top_p)
    seqs = sp.generate_batched(PROMPTS, G=2, seed=3)
    whole = sp.teacher_force_logprobs(seqs, tf_batch_size=6, compute_rb=True)
    pieces = sp.teacher_force_logprobs(seqs, tf_batch_size=1, compute_rb=True)
    with torch.no_grad():
        for i, (ids, start) in enumerate(real_rows(seqs)):
            b, g = divmod(i, 2)
            ref = direct_scores(model, ids, start, temperature, top_p)
            for res in (whole, pieces):
                torch.testing.assert_close(res.logprobs[b][g].double(), ref["log_p"], rtol=0, atol=1e-4)
                torch.testing.assert_close(res.token_logqs[b][g].double(), ref["log_q"], rtol=0, atol=1e-4)
                torch.testing.assert_close(torch.from_numpy(res.rb_entropies[b][g]).double(), ref["rb"], rtol=0, atol=1e-4)
                assert res.entropies[b][g] == pytest.approx((-ref["log_p"]).numpy(), abs=1e-4)
                assert res.sequence_logprobs[b][g] == pytest.approx(float(ref["log_p"].sum()), abs=1e-3)
                assert not res.logprobs[b][g].requires_grad and res.logprobs[b][g].device.type == "cpu"


def test_scoring_chunks_across_forward_batches_change_no_value(model, tokenizer, monkeypatch):
    # Scoring waits for several forward batches before its vocabulary math; with a chunk of three
    # tokens every batch is scored alone and split into many chunks. Values are identical, and
    # the public score_generated_tokens on one region's logits gives them too.
    import entropy_guided_generation.scoring.processor as processor_module
    from entropy_guided_generation.scoring import score_generated_tokens
    from entropy_guided_generation.scoring.forward import region_logits

    sp = processor(model, tokenizer, temperature=0.8, top_p=0.7, max_new_tokens=8)
    seqs = sp.generate_batched(PROMPTS, G=3, seed=5)
    kwargs = dict(tf_batch_size=2, compute_rb=True, return_baseline_features=True)
    together, together_diag = sp.teacher_force_logprobs_with_diagnostics(seqs, **kwargs)
    monkeypatch.setattr(processor_module, "DEFAULT_CHUNK_ELEMENTS", 3 * vocab_size_of())
    alone, alone_diag = sp.teacher_force_logprobs_with_diagnostics(seqs, **kwargs)
    B, G, L = seqs.sequences.shape
    with torch.no_grad():
        z = region_logits(model, seqs.sequences.reshape(B * G, L), seqs.attention_masks.reshape(B * G, L).bool(), seqs.prompt_length)
        direct = score_generated_tokens(
            z, seqs.sequences.reshape(B * G, L)[:, seqs.prompt_length :], torch.tensor(sum(seqs.gen_lens, [])),
            sp.policy, rb=True, diagnostics=sp.distribution_diagnostics, baseline=True,
        )
    direct_log_q, direct_rb = direct.per_row(direct.log_q), direct.per_row(direct.rb_entropy)
    for b in range(B):
        for g in range(G):
            assert torch.equal(together.token_logqs[b][g], alone.token_logqs[b][g])
            assert torch.equal(together.logprobs[b][g], alone.logprobs[b][g])
            assert torch.equal(together.baseline_feats_torch[b][g], alone.baseline_feats_torch[b][g])
            assert (together.rb_entropies[b][g] == alone.rb_entropies[b][g]).all()
            for name in STEP_FIELDS:
                assert (getattr(together_diag.diagnostics[b][g].step, name) == getattr(alone_diag.diagnostics[b][g].step, name)).all()
            assert together_diag.diagnostics[b][g].sequence == alone_diag.diagnostics[b][g].sequence
            torch.testing.assert_close(direct_log_q[b * G + g], together.token_logqs[b][g], rtol=0, atol=1e-5)
            torch.testing.assert_close(direct_rb[b * G + g], torch.from_numpy(together.rb_entropies[b][g]), rtol=0, atol=1e-5)


def test_diagnostics_and_baseline_features_follow_the_sampling_policy(model, tokenizer):
    sp = processor(model, tokenizer, temperature=0.9, top_p=0.85)
    seqs = sp.generate_batched(PROMPTS[:2], G=2, seed=4)
    res, diags = sp.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True, return_baseline_features=True)
    reference = DistributionDiagnostics(top_p=0.85, temperature=0.9, eos_token_id=tokenizer.eos_id, dtype=torch.float64)
    with torch.no_grad():
        for i, (ids, start) in enumerate(real_rows(seqs)):
            b, g = divmod(i, 2)
            z = model(ids.unsqueeze(0))[0, start - 1 : -1].double()
            expected = reference.compute_from_logits(z, ids[start:])
            pack = diags.diagnostics[b][g]
            for name in STEP_FIELDS:
                assert getattr(pack.step, name) == pytest.approx(getattr(expected.step, name), abs=2e-4, rel=1e-4), name
            assert pack.sequence.length == seqs.gen_lens[b][g]
            assert pack.sequence.rb_entropy.mean == pytest.approx(float(res.rb_entropies[b][g].mean()), abs=1e-6)
            feats = res.baseline_feats_torch[b][g]
            assert feats.shape == (seqs.gen_lens[b][g], len(BASELINE_FEATURES)) and not feats.requires_grad
            column = {name: feats[:, k].numpy() for k, name in enumerate(BASELINE_FEATURES)}
            assert column["rb_entropy"] == pytest.approx(pack.step.rb_entropy, abs=1e-6)
            assert column["top1_prob"] == pytest.approx(pack.step.top1_prob, abs=1e-6)
            assert column["tail_mass"] == pytest.approx(pack.step.tail_mass, abs=1e-6)
            assert column["position"].tolist() == list(range(seqs.gen_lens[b][g]))


def test_with_grad_gradients_match_autograd_through_a_direct_computation(model, tokenizer):
    temperature, top_p = 0.8, 0.9
    sp = processor(model, tokenizer, temperature=temperature, top_p=top_p, rb_requires_grad=True)
    seqs = sp.generate_batched(PROMPTS[:2], G=2, seed=2)
    params = dict(model.named_parameters())
    weights = torch.linspace(0.5, 1.5, 4)  # a different advantage per response, as in REINFORCE

    res = sp.teacher_force_logprobs(seqs, with_grad=True, tf_batch_size=3, compute_rb=True)
    flat_lp = [lp for row in res.logprobs for lp in row]
    flat_rb = [h for row in res.rb_entropies_torch for h in row]
    assert all(t.requires_grad for t in flat_lp + flat_rb)
    loss = sum(w * lp.sum() for w, lp in zip(weights, flat_lp)) + sum(h.sum() for h in flat_rb)
    got = torch.autograd.grad(loss, list(params.values()))

    ref_loss = 0.0
    for w, (ids, start) in zip(weights, real_rows(seqs)):
        z = model(ids.unsqueeze(0))[0, start - 1 : -1]
        log_p = z.log_softmax(-1).gather(-1, ids[start:].unsqueeze(-1)).squeeze(-1)
        log_q = brute_log_q(z, temperature, top_p)  # the kept set is piecewise constant: no gradient through it
        q = log_q.exp()
        rb = -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1)
        ref_loss = ref_loss + w * log_p.sum() + rb.sum()
    expected = torch.autograd.grad(ref_loss, list(params.values()))
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    # Stated tolerance: per parameter, relative L2 error < 1e-4. Padded batched vs unpadded
    # one-row forwards round differently in float32 (single entries with cancellation differ by
    # ~1e-5 absolute); a wrong alignment or a missing term gives errors of order 1.
    for name, a, e in zip(params, got, expected):
        rel = float((a - e).norm() / e.norm().clamp(min=1e-12))
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"
    assert any(float(g.abs().max()) > 0 for g in got)


def test_rb_graph_is_kept_only_when_asked(model, tokenizer):
    sp = processor(model, tokenizer)
    seqs = sp.generate_batched(PROMPTS[:1], G=1, seed=0)
    res = sp.teacher_force_logprobs(seqs, with_grad=True, compute_rb=True)
    assert res.rb_entropies_torch is None and res.rb_entropies is not None
    assert res.logprobs[0][0].requires_grad


# ---------------------------------------------------------------- precision
def test_entropy_fp64_is_used_when_asked_and_agrees_with_fp32(model, tokenizer):
    gen = dict(temperature=0.9, top_p=0.95, max_new_tokens=8, stop_strings=[])
    sp32 = SequenceProcessor(model, tokenizer, {"generation": gen}, progress=False)
    sp64 = SequenceProcessor(model, tokenizer, {"generation": gen, "precision": {"entropy_fp64": True}}, progress=False)
    seqs = sp32.generate_batched(PROMPTS, G=2, seed=0)
    r32, d32 = sp32.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True)
    r64, d64 = sp64.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True)
    assert r32.rb_entropies[0][0].dtype.name == "float32" and r64.rb_entropies[0][0].dtype.name == "float64"
    assert r64.logprobs[0][0].dtype == torch.float64 and d64.diagnostics[0][0].step.top1_prob.dtype.name == "float64"
    # Stated tolerance: the forward is float32 in both; only the softmax/entropy math differs.
    for a, b in zip(sum(r32.rb_entropies, []), sum(r64.rb_entropies, [])):
        assert abs(a.astype("float64") - b).max() < 1e-5
    for a, b in zip(sum(r32.logprobs, []), sum(r64.logprobs, [])):
        assert float((a.double() - b).abs().max()) < 1e-5


def test_dict_config_sections_and_bad_keys(model, tokenizer):
    cfg = {
        "generation": {"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 4, "tf_batch_size": 2},
        "precision": {
            "func_override": {"autocast": False, "dtype": "float32", "cast_params": True},
            "tf_nograd": {"autocast": False, "dtype": "float32", "cast_logits_fp32": True},
            "tf_withgrad": {"autocast": False},
            "allow_tf32": False,
            "entropy_fp64": True,
        },
    }
    before = torch.get_float32_matmul_precision()
    try:
        sp = SequenceProcessor(model, tokenizer, cfg, progress=False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    assert sp.policy.temperature == 0.5 and sp.policy.top_p == 0.9 and sp.policy.dtype == torch.float64
    assert sp.config.tf_batch_size == 2 and sp.config.do_sample
    with pytest.raises(ValueError, match="'tempreature'"):
        SequenceProcessor(model, tokenizer, {"generation": {"tempreature": 1.0}})
    with pytest.raises(ValueError, match="'tf_nograd_x'"):
        SequenceProcessor(model, tokenizer, {"precision": {"tf_nograd_x": {}}})
    with pytest.raises(ValueError, match="autocast needs a low-precision dtype"):
        SequenceProcessor(model, tokenizer, {"precision": {"tf_nograd": {"autocast": True, "dtype": "float32"}}})
    with pytest.raises(ValueError, match="top_p must lie in"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"no responses \(shape \(2, 0, 5\)\)"):
        BatchedSequences(torch.zeros(2, 0, 5, dtype=torch.long), [3, 3], [[], []], torch.zeros(2, 0, 5), [[], []])


# ---------------------------------------------------------------- text paths with a scripted model
class ScriptedLM(nn.Module):
    """A tokens -> logits module that writes ``script`` after a prompt of ``prompt_len`` real tokens:
    the logits at position p favour ``script[p - prompt_len + 1]`` (the last entry repeats)."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, 1)  # gives the module a parameter and its vocabulary size
        self.register_buffer("script", torch.tensor(script))
        self.prompt_len = prompt_len

    def forward(self, tokens: torch.Tensor, mask=None, input_pos=None) -> torch.Tensor:
        if input_pos is None:
            input_pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        index = (input_pos - (self.prompt_len - 1)).clamp(0, self.script.numel() - 1)
        logits = torch.full((*tokens.shape, self.tok_embeddings.num_embeddings), -8.0)
        return logits.scatter(-1, self.script[index].unsqueeze(-1), 8.0)


ANSWER_TEXT = "3 * 4 = 12\n12 + 5 = 17\n#### 17"
SAME_LENGTH_PROMPTS = ["What is 6 * 7?\n", "What is 2 * 9?\n"]


@pytest.fixture(scope="module")
def scripted(tokenizer):
    lengths = {len(tokenizer.encode(p, add_bos=True, add_eos=False)) for p in SAME_LENGTH_PROMPTS}
    assert len(lengths) == 1, "the scripted model needs prompts of one token length"
    script = tokenizer.encode(ANSWER_TEXT, add_bos=False, add_eos=False) + [tokenizer.eos_id]
    return ScriptedLM(script, lengths.pop(), vocab_size_of()), script


@pytest.mark.parametrize("stop", ["= 1", "\n#", "17\n", "####"])
def test_stop_string_ends_the_response_after_the_token_that_completes_it(tokenizer, scripted, stop):
    lm, script = scripted
    sp = processor(lm, tokenizer, do_sample=False, max_new_tokens=40, stop_strings=[stop])
    seqs = sp.generate_batched(SAME_LENGTH_PROMPTS, G=2)
    first = next(t for t in range(len(script)) if stop in tokenizer.decode(script[: t + 1]))
    assert seqs.gen_lens == [[first + 1] * 2] * 2
    assert seqs.responses_text[0][0] == tokenizer.decode(script[: first + 1])
    assert seqs.responses_text[0][0].endswith(stop) or stop in seqs.responses_text[0][0]
    p = seqs.prompt_length
    assert seqs.sequences[0, 0, p : p + first + 1].tolist() == script[: first + 1]
    assert (seqs.attention_masks[:, :, p + first + 1 :] == 0).all()


def test_rows_stop_at_eos_and_gsm8k_reward_reads_the_final_answer(tokenizer, scripted):
    lm, script = scripted
    sp = processor(lm, tokenizer, do_sample=False, max_new_tokens=60, stop_strings=["</answer>"])
    seqs, res, diags = sp.generate_with_logprobs(
        prompts=SAME_LENGTH_PROMPTS, G=2, answers=["6 * 7 = 42\n#### 17", "2 * 9 = 18\n#### 18"], compute_rb=True
    )
    assert seqs.gen_lens == [[len(script)] * 2] * 2  # EOS ends the row and is counted
    assert seqs.responses_text == [[ANSWER_TEXT] * 2] * 2  # special tokens are left out of the text
    assert res.rewards == [[1.0, 1.0], [0.0, 0.0]]
    assert len(diags.diagnostics) == 2 and diags.diagnostics[1][1].sequence.length == len(script)
    # Without reference answers, no rewards are computed unless asked (and then the reward says why it cannot).
    _, res_no_answers, _ = sp.generate_with_logprobs(prompts=SAME_LENGTH_PROMPTS, G=1)
    assert res_no_answers.rewards is None
    with pytest.raises(ValueError, match="needs a reference answer"):
        sp.generate_with_logprobs(prompts=SAME_LENGTH_PROMPTS, G=1, compute_rewards=True)


# ---------------------------------------------------------------- prompt sources
def test_gsm8k_jsonl_dataset_and_replacement_sampling(model, tokenizer, tmp_path):
    path = write_gsm8k_jsonl(tmp_path / "test.jsonl", 6, seed=0)
    register_gsm8k_jsonl("scoring_test_gsm8k", {"test": path}, overwrite=True)
    sp = processor(model, tokenizer, max_new_tokens=4)
    seqs, res, _ = sp.generate_with_replacement_sampling(5, "scoring_test_gsm8k", split="test", seed=3, max_prompts_pool=4)
    again, _, _ = sp.generate_with_replacement_sampling(5, "scoring_test_gsm8k", split="test", seed=3, max_prompts_pool=4)
    assert seqs.sequences.shape[:2] == (5, 1) and torch.equal(seqs.sequences, again.sequences)
    pool = [e.prompt for e in load_prompt_dataset("scoring_test_gsm8k", "test")[:4]]
    assert all(p in pool for p in seqs.prompts) and all(p.startswith("Question: ") for p in seqs.prompts)
    expected = [[gsm8k_answer_reward(text, ex) for text in texts] for texts, ex in zip(seqs.responses_text, seqs.examples)]
    assert res.rewards == expected
    with pytest.raises(ValueError, match="unknown prompt dataset 'nope'"):
        sp.generate_with_replacement_sampling(2, "nope")
    with pytest.raises(ValueError, match="G=1"):
        sp.generate_with_replacement_sampling(2, "scoring_test_gsm8k", split="test", G=2)


def test_kit_gsm8k_prompts_through_generate_with_logprobs(model, tokenizer):
    sp = processor(model, tokenizer, max_new_tokens=3)
    seqs, res, diags = sp.generate_with_logprobs(dataset_name="kit_gsm8k", split="test", num_prompts=2, G=2, seed=0)
    assert len(seqs.prompts) == 2 and all(p.endswith("\n") for p in seqs.prompts)
    assert res.rewards is not None and all(r in (0.0, 1.0) for row in res.rewards for r in row)
    assert math.isfinite(diags.diagnostics[0][0].sequence.top1_prob.mean)


# ---------------------------------------------------------------- Hugging Face models
def test_hugging_face_model_generation_log_q_equals_teacher_forced(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size_of(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight.normal_(0.0, 1.0)
    sp = processor(hf, tokenizer, temperature=0.8, top_p=0.9, max_new_tokens=6)
    seqs = sp.generate_batched(PROMPTS, G=2, seed=0)
    res = sp.teacher_force_logprobs(seqs, compute_rb=True)
    for b in range(3):
        for g in range(2):
            n = seqs.gen_lens[b][g]
            torch.testing.assert_close(res.token_logqs[b][g], seqs.gen_logqs[b, g, :n], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- Hugging Face tokenizers, logger
def test_hugging_face_tokenizer_encodes_pads_and_scores_as_the_torchtune_one(model, tokenizer):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(build_tokenizer()))
    sp_hf, sp_tt = processor(model, hf_tok, max_new_tokens=5), processor(model, tokenizer, max_new_tokens=5)
    assert sp_hf.pad_id == hf_tok.pad_token_id == tokenizer.pad_id and sp_hf.eos_id == tokenizer.eos_id
    for got, want in zip(sp_hf.encode_prompts(PROMPTS), sp_tt.encode_prompts(PROMPTS)):
        assert torch.equal(got, want)
    seqs = sp_tt.generate_batched(PROMPTS, G=2, seed=0)
    hf_scores, hf_diags = sp_hf.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True)
    tt_scores, tt_diags = sp_tt.teacher_force_logprobs_with_diagnostics(seqs, compute_rb=True)
    assert hf_scores.sequence_logprobs == tt_scores.sequence_logprobs
    assert hf_diags.diagnostics[0][0].sequence == tt_diags.diagnostics[0][0].sequence  # eos_prob included
    hf_seqs = sp_hf.generate_batched(PROMPTS, G=2, seed=0)
    assert hf_seqs.responses_text[0][0] == hf_tok.decode(
        hf_seqs.sequences[0, 0, hf_seqs.prompt_length : hf_seqs.prompt_length + hf_seqs.gen_lens[0][0]], skip_special_tokens=True
    )
    # no pad token: pads with eos, as transformers' generate does; neither: a clear error
    no_pad = AutoTokenizer.from_pretrained(str(build_tokenizer()), pad_token=None)
    assert no_pad.pad_token_id is None and processor(model, no_pad).pad_id == no_pad.eos_token_id
    no_pad.eos_token = None
    with pytest.raises(ValueError, match="no pad id .*pad_token_id"):
        processor(model, no_pad)


def test_logger_given_to_the_constructor_reports_generation_and_scoring(model, tokenizer, caplog):
    log = logging.getLogger("seed-processor-test")
    sp = SequenceProcessor(model, tokenizer, GenerationConfig(max_new_tokens=2, stop_strings=()), logger=log, progress=False)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        sp.teacher_force_logprobs(sp.generate_batched(PROMPTS[:1], G=1, seed=0))
    messages = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert any(m.startswith("generated 1 prompts") for m in messages) and any(m.startswith("teacher-forced 1 rows") for m in messages)
    assert SequenceProcessor(model, tokenizer, logger=None, progress=False).logger.name == "entropy_guided_generation.scoring.processor"
