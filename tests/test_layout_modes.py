"""The interleaving mode is a value: one table of modes, each one slot rule for training and its
online twin for decoding, and a new mode works everywhere once registered."""
from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import (
    ConfidenceCodec,
    check_config_matches,
    read_confidence_json,
    write_confidence_json,
)
from entropy_guided_generation.eval.lm import TorchtuneLM
from entropy_guided_generation.eval.teacher_forcing import score_continuations
from entropy_guided_generation.generation import decode, generate_answer_interleaved_marker, get_decoder
from entropy_guided_generation.layout import (
    MODES,
    POSITION_RULES,
    Interleaving,
    Mode,
    ResponseRule,
    compute_bins,
    register_mode,
)
from entropy_guided_generation.training.loss_step import ConfidenceLayout, shifted_labels, summed_token_loss
from entropy_guided_generation.training.options import interleaving_options

from helpers import quantile_codec, tiny_decoder

VOCAB = 64
CONF_IDS = list(range(VOCAB - 11, VOCAB))
EOS, PAD = 1, 0
MARKER = [7, 9]


class EveryOtherResponseToken(ResponseRule):
    """A toy rule: the 1st, 3rd, 5th ... response token gets a confidence token."""

    def slots(self, tokens, response, marker_ids):
        index = response.long().cumsum(1) - 1
        return response & (index % 2 == 0)

    def tracker(self, batch_size, device, marker_ids):
        state = {"count": torch.zeros(batch_size, dtype=torch.long, device=device)}

        def every_other(token: torch.Tensor) -> torch.Tensor:
            wants = state["count"] % 2 == 0
            state["count"] = state["count"] + 1
            return wants

        return every_other


TOY = Mode("every_other", prompt=False, response=EveryOtherResponseToken(), summary="a test's toy mode")


@pytest.fixture
def toy_mode():
    register_mode(TOY)
    yield TOY
    MODES.pop(TOY.name)


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(VOCAB, seed=5, weight_scale=3.0)


@pytest.fixture(scope="module")
def codec(model):
    return quantile_codec(model, VOCAB, CONF_IDS)


def random_responses(seed: int, rows: int = 16, prompt: int = 5, response: int = 14):
    """Rows of prompt + response over a 10-token alphabet (so the marker and EOS occur often),
    each row ending at its first EOS, then padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 11, (rows, prompt + response), generator=g)
    tokens[:, :prompt].clamp_(min=2)  # no EOS inside prompts
    is_eos = tokens == EOS
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    valid = ~after_eos
    response_mask = torch.zeros_like(valid)
    response_mask[:, prompt:] = True
    return tokens.masked_fill(~valid, PAD), response_mask, valid


@pytest.mark.parametrize("name", ["none", "full", "answer", "marker", "every_other"])
def test_online_step_policy_equals_the_batch_slot_rule(name, toy_mode):
    tokens, response, valid = random_responses(seed=len(name))
    interleaving = Interleaving.of(name, stop_ids=[EOS], marker_ids=MARKER if MODES[name].needs_marker else None)
    slots = interleaving.slots(tokens, response_mask=response, valid_mask=valid)
    prompt = int((~response[0]).sum())
    policy = interleaving.step_policy(tokens.shape[0], tokens.device)
    active = torch.ones(tokens.shape[0], dtype=torch.bool)
    online = []
    for t in range(prompt, tokens.shape[1]):  # one content token at a time, as the decoder feeds them
        online.append(policy(tokens[:, t], active))
        active = active & (tokens[:, t] != EOS)
    assert torch.equal(torch.stack(online, 1), slots[:, prompt:])
    if name != "none":
        assert slots[:, prompt:].any() and not slots[:, prompt:].all()


def test_marker_mode_without_marker_ids_is_a_clear_error(model, codec):
    with pytest.raises(ValueError, match="mode 'marker' needs marker ids"):
        generate_answer_interleaved_marker(model, torch.tensor([[5, 6]]), codec=codec, max_generated_tokens=2)
    with pytest.raises(ValueError, match="marker must tokenize to at least one id"):
        Interleaving.of("marker", marker_ids=[])
    with pytest.raises(ValueError, match="unknown interleaving.mode 'answr'; expected one of none, full, answer, marker"):
        Interleaving.of("answr")


def test_a_registered_mode_trains_decodes_and_scores_with_no_other_change(toy_mode, model, codec):
    interleaving = Interleaving.of(toy_mode.name, stop_ids=[EOS])
    # Decoding: get_decoder knows the new mode, and what it decodes is the training layout.
    prompt = torch.tensor([[PAD, PAD, 5, 9, 12, 7], [14, 15, 16, 17, 18, 19]])
    result = get_decoder(toy_mode.name)(
        model, prompt, codec=codec, max_generated_tokens=9, pad_id=PAD, temperature=0.0, stop_tokens=[EOS]
    )
    assert result.bins[:, 0].ge(0).all() and result.bins[:, 1].eq(-1).all()
    for row in range(prompt.shape[0]):
        prompt_row = prompt[row][prompt[row] != PAD].tolist()
        content = result.content[row, : int(result.generated_lengths[row])].tolist()
        tokens = torch.tensor([prompt_row + content])
        response = torch.arange(tokens.shape[1]).unsqueeze(0) >= len(prompt_row)
        slots = interleaving.slots(tokens, response_mask=response)
        fixed = compute_bins(model, tokens, codec=codec, slots=slots, max_passes=tokens.shape[1] + 1)
        seen = result.interleaved[row][result.interleaved_valid[row]]
        assert seen.tolist() == fixed.interleaved.tokens[0].tolist()

    # Training: options accept it, the layout builds it, no confidence token is ever a target.
    options = interleaving_options(OmegaConf.create({"interleaving": {"mode": toy_mode.name}}))
    assert options.mode is toy_mode and options.interleaved
    tokens, response, valid = random_responses(seed=3, rows=4)
    labels = tokens.masked_fill(~response | ~valid, -100)
    batch = {"tokens": tokens + 1, "labels": labels, "response_mask": response, "valid_mask": valid}
    built = ConfidenceLayout(interleaving, codec, pad_id=PAD).build(model, batch)
    assert built.is_confidence.any()
    assert not torch.isin(shifted_labels(built.labels), torch.tensor(CONF_IDS)).any()

    # Eval: teacher forcing scores it, and lm-eval's model takes the mode by name.
    scores = score_continuations(model, tokens + 1, response & valid, interleaving=interleaving, codec=codec, valid_mask=valid)
    assert scores.converged and torch.isfinite(scores.logprob).all()
    tokenizer = kit.load_tokenizer()
    kit_codec = ConfidenceCodec.from_config({"edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}, tokenizer)
    lm = TorchtuneLM(tiny_decoder(kit.vocab_size_of(), seed=1, weight_scale=4.0), tokenizer, mode=toy_mode.name,
                     codec=kit_codec, batch_size=2, max_seq_length=128, enable_kv_cache=False)
    request = Instance("generate_until", {}, (kit.prompt_of("1 + 2 = ?"), {"until": ["\n\n"], "max_gen_toks": 5}), 0)
    (text,) = lm.generate_until([request], disable_tqdm=True)
    trace = lm.traces[-1]
    assert trace.mode == toy_mode.name and isinstance(text, str)
    covered = len(trace.bins)
    assert all((b >= 0) == (i % 2 == 0) for i, b in enumerate(trace.bins[:covered]))


# ---------------------------------------------------------------- interleaving.positions: shared


@pytest.mark.parametrize("name", ["full", "answer", "marker"])
def test_shared_positions_decode_exactly_the_training_layout(name, model, codec):
    """Under shared positions (a confidence token takes its content token's position id) the
    decoder's KV cache, the fixed point and a whole-sequence forward agree token for token."""
    marker = MARKER if MODES[name].needs_marker else None
    shared = Interleaving.of(name, stop_ids=[EOS], marker_ids=marker, positions="shared")
    prompt = torch.tensor([[PAD, PAD, 5, 9, 12, 7], [14, 15, 16, 17, 18, 19]])
    result = decode(model, prompt, interleaving=shared, codec=codec, max_generated_tokens=10, pad_id=PAD,
                    temperature=0.0, stop_tokens=[EOS], marker=marker)
    sequential = decode(model, prompt, interleaving=name, codec=codec, max_generated_tokens=10, pad_id=PAD,
                        temperature=0.0, stop_tokens=[EOS], marker=marker)
    assert not torch.equal(result.entropies.nan_to_num(), sequential.entropies.nan_to_num()), "positions had no effect"
    for row in range(prompt.shape[0]):
        prompt_row = prompt[row][prompt[row] != PAD].tolist()
        content = result.content[row, : int(result.generated_lengths[row])].tolist()
        tokens = torch.tensor([prompt_row + content])
        response = torch.arange(tokens.shape[1]).unsqueeze(0) >= len(prompt_row)
        slots = shared.slots(tokens, response_mask=response)
        fixed = compute_bins(model, tokens, codec=codec, slots=slots, positions="shared")
        seen = result.interleaved[row][result.interleaved_valid[row]]
        assert seen.tolist() == fixed.interleaved.tokens[0].tolist()
        # Teacher forcing the decoded content scores what the decoder saw: same entropies.
        scores = score_continuations(model, tokens, response, interleaving=shared, codec=codec)
        n = len(content)
        assert torch.allclose(scores.entropies[0, len(prompt_row):], result.entropies[row, :n], atol=1e-4)


def test_shared_position_ids_repeat_the_content_position():
    shared = Interleaving.of("answer", positions="shared")
    valid = torch.tensor([[False, True, True, True, True, True]])
    is_conf = torch.tensor([[False, False, False, True, False, True]])
    assert shared.position_ids(valid, is_conf).tolist() == [[0, 0, 1, 1, 2, 2]]
    assert Interleaving.of("answer").position_ids(valid, is_conf).tolist() == [[0, 0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="unknown interleaving.positions 'shard'; expected one of sequential, shared"):
        Interleaving.of("answer", positions="shard")


def test_shared_positions_reach_the_training_forward_and_the_metadata(model, codec, tmp_path):
    tokens, response, valid = random_responses(seed=4, rows=4)
    tokens = tokens + 1
    labels = tokens.masked_fill(~response | ~valid, -100)
    batch = {"tokens": tokens, "labels": labels, "response_mask": response, "valid_mask": valid}
    losses = {}
    for rule in POSITION_RULES:
        interleaving = Interleaving.of("answer", stop_ids=[EOS + 1], positions=rule)
        built = ConfidenceLayout(interleaving, codec, pad_id=PAD).build(model, batch)
        if rule == "sequential":
            assert built.positions is None  # the model's own 0..L-1
        else:
            expected = interleaving.position_ids(built.bins.interleaved.valid_mask, built.is_confidence)
            assert torch.equal(built.positions, expected)
        losses[rule] = float(summed_token_loss(model, torch.nn.CrossEntropyLoss(), built).loss.detach())
    assert losses["shared"] != pytest.approx(losses["sequential"], rel=1e-6)

    options = interleaving_options(OmegaConf.create({"interleaving": {"mode": "answer", "positions": "shared"}}))
    assert options.positions == "shared"
    path = write_confidence_json(tmp_path, codec, "answer", positions="shared")
    meta = read_confidence_json(path)
    assert meta.positions == "shared"
    with pytest.raises(ValueError, match="config interleaving.positions is 'sequential' but .* says 'shared'"):
        check_config_matches(meta, positions="sequential", source=str(path))
