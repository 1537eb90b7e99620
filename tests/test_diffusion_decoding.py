"""LLaDA-style masked-diffusion decoding (``diffusion.generate``) against a plain reference loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_models import MASK_ID, PAD_ID, ScriptedModel, random_predictor
from entropy_guided_generation.diffusion import LLADA_MASK_ID, generate, generate_with_tta_uncertainty
from entropy_guided_generation.diffusion.decoding import check_block_layout, tokens_per_step


@pytest.fixture(scope="module")
def predictor():
    return random_predictor(seed=0)


def llada_reference(model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=MASK_ID):
    """LLaDA's ``generate`` for ONE sequence ``prompt [1, p]``, written plainly (loops, no batching).

    Documented differences from LLaDA's file: the mask token's logit is set to -inf; and Gumbel noise is drawn only when temperature > 0
    (LLaDA draws and discards it at temperature 0), so ``random`` remasking sees the same random stream.
    """
    assert prompt.shape[0] == 1
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        hi = lo + block_length
        mask_num = int((x[0, lo:hi] == mask_id).sum())
        schedule = [mask_num // steps_per_block + (1 if i < mask_num % steps_per_block else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = model(torch.cat([x, un_x])).logits
                logits, un_logits = both[:1], both[1:]
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits
            logits[..., mask_id] = -np.inf  # ours: the mask token is never predicted (see never_predict_mask)
            if temperature > 0:
                logits64 = logits.to(torch.float64)
                noise = torch.rand_like(logits64)
                x0 = torch.argmax(logits64.exp() / (-torch.log(noise)) ** temperature, dim=-1)
            else:
                x0 = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape)
            x0_p[:, hi:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=x0_p.dtype))
            _, select = torch.topk(confidence[0], k=schedule[i])
            x[0, select] = x0[0, select]
    return x


PROMPTS = torch.tensor([[PAD_ID, PAD_ID, 5, 9, 2], [3, 4, 7, 8, 6], [PAD_ID, 11, 12, 13, 14]])


@pytest.mark.parametrize(
    "steps, gen_length, block_length",
    [(8, 8, 8), (4, 8, 8), (8, 8, 2), (6, 12, 4), (12, 12, 3), (3, 6, 6)],
)
def test_greedy_batched_equals_reference_per_sequence(predictor, steps, gen_length, block_length):
    tokens, logs = generate(predictor, PROMPTS, steps=steps, gen_length=gen_length, block_length=block_length, mask_id=MASK_ID)
    expected = torch.cat([llada_reference(predictor, PROMPTS[i : i + 1], steps, gen_length, block_length) for i in range(len(PROMPTS))])
    assert torch.equal(tokens, expected)
    assert logs == {"nfe": steps, "total_steps": steps}
    assert not bool((tokens == MASK_ID).any())
    assert torch.equal(tokens[:, : PROMPTS.shape[1]], PROMPTS)


@pytest.mark.parametrize(
    "steps, gen_length, block_length, temperature, remasking",
    [(8, 8, 4, 0.0, "random"), (6, 12, 4, 0.0, "random"), (8, 8, 2, 0.7, "low_confidence"), (6, 12, 4, 1.0, "random")],
)
def test_seeded_sampling_and_random_remasking_equal_reference(predictor, steps, gen_length, block_length, temperature, remasking):
    prompt = PROMPTS[1:2]
    torch.manual_seed(123)
    tokens, _ = generate(predictor, prompt, steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature, remasking=remasking, mask_id=MASK_ID)
    torch.manual_seed(123)
    expected = llada_reference(predictor, prompt, steps, gen_length, block_length, temperature=temperature, remasking=remasking)
    assert torch.equal(tokens, expected)
    again = [generate(predictor, prompt, steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature, remasking=remasking, mask_id=MASK_ID, generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(again[0], again[1]), "the same generator seed must give the same tokens"


def test_classifier_free_guidance_equals_reference_and_counts_two_evaluations(predictor):
    tokens, logs = generate(predictor, PROMPTS, steps=8, gen_length=8, block_length=4, cfg_scale=1.5, mask_id=MASK_ID)
    expected = torch.cat([llada_reference(predictor, PROMPTS[i : i + 1], 8, 8, 4, cfg_scale=1.5) for i in range(len(PROMPTS))])
    assert torch.equal(tokens, expected)
    assert logs["nfe"] == 16 and logs["total_steps"] == 8


def test_positions_past_the_current_block_are_never_committed():
    # A model that is most confident far right: LLaDA must still fill block by block.
    def logits_fn(call, tokens):
        b, s = tokens.shape
        logits = torch.zeros(b, s, MASK_ID + 1)
        logits[..., 3] = torch.arange(s, dtype=torch.float32)  # confidence grows to the right
        return logits

    model = ScriptedModel(logits_fn)
    prompt = PROMPTS[:1]
    generate(model, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK_ID)
    p = prompt.shape[1]
    for step, x in enumerate(model.inputs):
        block_end = p + 4 * (step // 2 + 1)
        assert bool((x[:, block_end:] == MASK_ID).all()), f"step {step} sees committed tokens past its block end {block_end}"
    committed_per_step = [int((x[:, p:] != MASK_ID).sum()) for x in model.inputs[1:]]
    assert committed_per_step == [2, 4, 6]


def test_model_output_may_be_a_tensor_or_have_logits(predictor):
    plain = ScriptedModel(lambda call, tokens: predictor(tokens).logits)
    a, _ = generate(plain, PROMPTS, steps=4, gen_length=8, block_length=4, mask_id=MASK_ID)
    b, _ = generate(predictor, PROMPTS, steps=4, gen_length=8, block_length=4, mask_id=MASK_ID)
    assert torch.equal(a, b)


def test_threshold_commits_at_least_one_per_step_and_fills_every_block(predictor):
    tokens, logs = generate(predictor, PROMPTS, steps=8, gen_length=8, block_length=4, mask_id=MASK_ID, threshold=0.9)
    assert not bool((tokens == MASK_ID).any())
    assert 2 <= logs["total_steps"] <= 8 and logs["nfe"] == logs["total_steps"]
    strict, _ = generate(predictor, PROMPTS, steps=8, gen_length=8, block_length=4, mask_id=MASK_ID, threshold=1.0)
    greedy, _ = generate(predictor, PROMPTS, steps=8, gen_length=8, block_length=4, mask_id=MASK_ID)
    assert torch.equal(strict, greedy), "threshold 1.0 commits one token per step, as the one-per-step schedule"


def test_schedule_spreads_remainder_over_first_steps():
    masked = torch.tensor([[True] * 7 + [False], [True] * 2 + [False] * 6])
    assert tokens_per_step(masked, 3).tolist() == [[3, 2, 2], [1, 1, 0]]


@pytest.mark.parametrize(
    "steps, gen_length, block_length, message",
    [(8, 10, 4, "gen_length 10 is not a multiple of block_length 4"), (3, 8, 4, "steps 3 is not a multiple of the number of blocks 2"), (0, 8, 8, "steps must be a positive int")],
)
def test_bad_layout_is_rejected(steps, gen_length, block_length, message):
    with pytest.raises(ValueError, match=message):
        check_block_layout(steps, gen_length, block_length)


def test_prompt_with_mask_and_unknown_remasking_are_rejected(predictor):
    with pytest.raises(ValueError, match=f"holds the mask id {MASK_ID} at position 1"):
        generate(predictor, torch.tensor([[3, MASK_ID]]), steps=2, gen_length=2, block_length=2, mask_id=MASK_ID)
    with pytest.raises(ValueError, match="unknown remasking 'lowest'; expected one of low_confidence, random"):
        generate(predictor, PROMPTS, steps=2, gen_length=2, block_length=2, remasking="lowest", mask_id=MASK_ID)
    flat = ScriptedModel(lambda call, tokens: torch.zeros(*tokens.shape, 24))
    with pytest.raises(ValueError, match="mask_id 99 is outside the predictor's vocabulary of 24 ids"):
        generate(flat, PROMPTS, steps=2, gen_length=2, block_length=2, mask_id=99)


@pytest.mark.parametrize("decoder", [generate, generate_with_tta_uncertainty], ids=["generate", "tta"])
def test_mask_id_defaults_to_the_models_config_or_is_asked_for_by_name(predictor, decoder):
    layout = dict(steps=4, gen_length=4, block_length=4)
    assert predictor.config.mask_token_id == MASK_ID
    implicit, _ = decoder(predictor, PROMPTS, **layout)
    explicit, _ = decoder(predictor, PROMPTS, mask_id=MASK_ID, **layout)
    assert torch.equal(implicit, explicit)
    flat = ScriptedModel(lambda call, tokens: torch.zeros(*tokens.shape, 24))
    with pytest.raises(ValueError, match="mask_id is required: the ScriptedModel has no config.mask_token_id"):
        decoder(flat, PROMPTS, **layout)
    # LLaDA's id against a small vocabulary: a clear error before any forward, not an IndexError
    with pytest.raises(ValueError, match=f"mask_id {LLADA_MASK_ID} is outside the predictor's vocabulary of 24 ids"):
        decoder(predictor, PROMPTS, mask_id=LLADA_MASK_ID, **layout)
