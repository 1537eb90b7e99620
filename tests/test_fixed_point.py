"""Exact bins by default: the fixed point equals sequential decoding, narrowed passes equal full
passes bit for bit, and a pass cap still works and says what it left unsettled."""
from __future__ import annotations

import math

import pytest
import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence import ConfidenceCodec, fit_quantile_edges
from entropy_guided_generation.layout import IGNORE_INDEX, compute_bins, confidence_slots
from entropy_guided_generation.modeling import logits_of
from entropy_guided_generation.sessions import kv_session

from helpers import tiny_decoder

VOCAB = 64
CONF_IDS = list(range(VOCAB - 11, VOCAB))
EOS, PAD = 1, 0
MARKER = [40, 41]
MODES = ("full", "answer", "marker")


# ------------------------------------------------------------------ data and references
def plain_batch():
    """Right-padded rows with a stop token and the marker in prompts and responses.

    Returns ``(tokens, labels, valid, response)``, each ``[4, 30]``."""
    g = torch.Generator().manual_seed(7)
    lengths = [30, 27, 24, 19]
    prompt_lengths = [8, 6, 9, 5]
    tokens = torch.randint(2, 40, (4, 30), generator=g)
    tokens[0, 3] = EOS  # a stop token inside a prompt
    tokens[0, 2:4] = torch.tensor(MARKER)  # ... and the marker inside the same prompt
    tokens[1, 14] = EOS  # a stop token inside a response
    tokens[1, 17:19] = torch.tensor(MARKER)  # the marker inside a response, after it
    tokens[2, 12:14] = torch.tensor(MARKER)
    tokens[3, 18] = EOS  # the response ends with its stop token
    valid = torch.arange(30).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    response = valid & (torch.arange(30).unsqueeze(0) >= torch.tensor(prompt_lengths).unsqueeze(1))
    tokens = torch.where(valid, tokens, torch.full_like(tokens, PAD))
    labels = torch.where(response, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return tokens, labels, valid, response


def spread_codec(dtype=torch.float32):
    """Edges every 0.3 nats: enough bins for short rows whose signals cannot fit quantiles."""
    edges = torch.tensor([0.3 * k for k in range(1, 11)])
    return ConfidenceCodec(signal="entropy", edges=edges, token_ids=torch.tensor(CONF_IDS), compute_dtype=dtype)


def slots_of(mode, tokens, valid, response):
    return confidence_slots(tokens, mode=mode, response_mask=response, valid_mask=valid, stop_ids=[EOS], marker_ids=MARKER)


def codec_for(model, tokens, valid, dtype=torch.float32):
    """Edges at quantiles of the plain signals, moved to midpoints between data values, so bins vary
    and interleaving changes them (a signal exactly on an edge would make a comparison between a
    batched forward and KV-cached steps hinge on the last float bit)."""
    values = signals.entropy(logits_of(model, tokens), exclude_ids=CONF_IDS)[valid].double()
    edges = fit_quantile_edges(values, 11)
    distinct = torch.unique(values)
    above = torch.searchsorted(distinct, edges).clamp(1, distinct.numel() - 1)
    edges = (distinct[above - 1] + distinct[above]) / 2
    return ConfidenceCodec(signal="entropy", edges=edges.float(), token_ids=torch.tensor(CONF_IDS), compute_dtype=dtype)


def decoded_row(model, tokens, labels, slots, codec):
    """Teacher-forced decode of one row: step the model one token at a time through the sequence
    being interleaved (KV-cached, as a decoder does); after each content token at a slot, append
    the confidence token of the distribution that produced it. Returns ``(bins, interleaved, labels)``."""
    n = tokens.shape[0]
    bins, seq, seq_labels = [], [], []
    with kv_session(model, 1, 2 * n) as session:
        logits = None
        for t in range(n):
            tok = int(tokens[t])
            steps = [tok]
            if bool(slots[t]):
                b = int(codec.bins_from_signal(codec.signal_from_logits(logits))[0])
                steps.append(int(codec.token_ids[b]))
                bins.append(b)
            else:
                bins.append(-1)
            seq += steps
            seq_labels += [int(labels[t])] + [IGNORE_INDEX] * (len(steps) - 1)
            for s in steps:
                one = torch.tensor([[s]])
                logits = session.feed(one, torch.ones_like(one, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    return torch.tensor(bins), torch.tensor(seq), torch.tensor(seq_labels)


def full_passes(model, tokens, slots, codec, *, valid, left_pad, max_passes):
    """Reference: every pass a full forward over the whole batch and every slot's signal, until a
    pass changes no bin or ``max_passes`` ran (the fixed point as first written)."""
    from entropy_guided_generation.layout import interleave

    def layout(bins):
        conf = codec.token_ids_for_bins(bins.clamp(min=0))
        return interleave(tokens, slots, conf, pad_id=PAD, valid_mask=valid, left_pad=left_pad)

    def pass_signal(seq, seq_valid, plain_index):
        logits = logits_of(model, seq, padding_mask=seq_valid if left_pad else None)
        picked = logits.gather(1, (plain_index - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        out = torch.full(slots.shape, float("nan"), dtype=codec.compute_dtype)
        out[slots] = codec.signal_from_logits(picked[slots])
        return out

    identity = torch.arange(tokens.shape[1]).expand_as(tokens)
    signal = pass_signal(tokens, valid, identity)
    bins = torch.where(slots, codec.bins_from_signal(signal.nan_to_num(0.0)), torch.full_like(tokens, -1))
    passes, changed = 1, math.nan
    while passes < max_passes:
        lay = layout(bins)
        signal = pass_signal(lay.tokens, lay.valid_mask, lay.plain_index)
        new = torch.where(slots, codec.bins_from_signal(signal.nan_to_num(0.0)), torch.full_like(tokens, -1))
        passes += 1
        changed = int((new != bins)[slots].sum()) / int(slots.sum())
        bins = new
        if changed == 0:
            break
    return bins, signal, passes, changed, layout(bins)


def left_padded(valid, *tensors):
    """``tensors`` ``[b, n]`` (right-padded rows, ``valid`` marking real tokens) moved to left padding."""
    shift = (~valid).sum(1)
    cols = (torch.arange(valid.shape[1]).unsqueeze(0) - shift.unsqueeze(1)) % valid.shape[1]
    return [t.gather(1, cols) for t in tensors]


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(VOCAB, seed=11, weight_scale=3.0)


@pytest.fixture(scope="module")
def batch():
    return plain_batch()


# ------------------------------------------------------------------ (a) default == sequential decoding
@pytest.mark.parametrize("mode", MODES)
def test_default_bins_tokens_and_labels_equal_sequential_decoding(mode, model, batch):
    tokens, labels, valid, response = batch
    slots = slots_of(mode, tokens, valid, response)
    codec = codec_for(model, tokens, valid)
    result = compute_bins(model, tokens, codec=codec, slots=slots, labels=labels, valid_mask=valid, pad_id=PAD)
    capped = compute_bins(model, tokens, codec=codec, slots=slots, labels=labels, valid_mask=valid, pad_id=PAD, max_passes=4)
    assert result.converged and result.unconverged_rows == 0 and result.changed_fraction == 0.0
    wrong = 0
    for row in range(tokens.shape[0]):
        n = int(valid[row].sum())
        ref_bins, ref_seq, ref_labels = decoded_row(model, tokens[row, :n], labels[row, :n], slots[row, :n], codec)
        assert torch.equal(result.bins[row, :n], ref_bins), f"row {row}"
        keep = result.interleaved.valid_mask[row]
        assert torch.equal(result.interleaved.tokens[row][keep], ref_seq), f"row {row}"
        assert torch.equal(result.interleaved.labels[row][keep], ref_labels), f"row {row}"
        wrong += int((capped.bins[row, :n] != ref_bins).sum())
    # The model is one on which the old 4-pass cap was far from exact.
    assert wrong >= 0.1 * int(slots.sum()), (wrong, int(slots.sum()))
    assert not capped.converged and capped.unconverged_rows > 0


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_passes_alone_equal_sequential_stepping(mode, left_pad, model, batch):
    """Without the stepping fallback the passes run to the fixed point: the same bins, within the bound."""
    tokens, labels, valid, response = batch
    codec = codec_for(model, tokens, valid)
    if left_pad:
        tokens, response, valid = left_padded(valid, tokens, response, valid)
    slots = slots_of(mode, tokens, valid, response)
    kwargs = dict(codec=codec, slots=slots, valid_mask=valid, pad_id=PAD, left_pad=left_pad)
    stepped = compute_bins(model, tokens, **kwargs)
    passes = compute_bins(model, tokens, sequential_fallback=False, **kwargs)
    assert passes.converged and passes.stepped_slots == 0
    assert stepped.stepped_slots > 0  # this random model settles about one slot per pass
    assert torch.equal(passes.bins, stepped.bins)
    assert passes.passes <= int(slots.sum(1).max())
    # Converged rows drop out; later passes compute only from each row's first unsettled slot.
    assert list(passes.pass_rows) == sorted(passes.pass_rows, reverse=True) and passes.pass_rows[-1] < tokens.shape[0]
    assert passes.pass_slots[0] == int(slots.sum()) and max(passes.pass_slots[1:]) < passes.pass_slots[0]
    assert 0.0 < passes.recomputed_fraction < 1.0


def test_a_large_vocabulary_on_cpu_steps_right_after_pass_0(batch):
    """On a CPU, with 4+ rows and an output projection of 2**22 multiply-adds per signal (a 65,536-token
    vocabulary x hidden 64), stepping does less work than passes: it starts right after pass 0, and
    its bins are the passes' and the sequential decode's. With 3 rows passes run; in training (no grad:
    the same forward) it steps as in eval mode."""
    tokens, labels, valid, response = batch
    model = tiny_decoder(1 << 16, seed=3, weight_scale=3.0, embed_dim=64)
    codec = codec_for(model, tokens, valid)
    slots = slots_of("full", tokens, valid, response)
    kwargs = dict(codec=codec, slots=slots, valid_mask=valid, pad_id=PAD)
    stepped = compute_bins(model, tokens, **kwargs)
    assert stepped.passes == 1 and stepped.stepped_slots == int(slots.sum()) - tokens.shape[0]
    passes = compute_bins(model, tokens, sequential_fallback=False, **kwargs)
    assert passes.passes > 1 and passes.stepped_slots == 0
    assert torch.equal(stepped.bins, passes.bins)
    for row in range(tokens.shape[0]):
        n = int(valid[row].sum())
        ref_bins, ref_seq, _ = decoded_row(model, tokens[row, :n], labels[row, :n], slots[row, :n], codec)
        assert torch.equal(stepped.bins[row, :n], ref_bins), f"row {row}"
        assert torch.equal(stepped.interleaved.tokens[row][stepped.interleaved.valid_mask[row]], ref_seq), f"row {row}"
    three = dict(kwargs, slots=slots[:3], valid_mask=valid[:3])
    assert compute_bins(model, tokens[:3], **three).passes > 1
    model.train()
    try:
        training = compute_bins(model, tokens, **kwargs)
    finally:
        model.eval()
    assert training.stepped_slots == stepped.stepped_slots and torch.equal(training.bins, passes.bins)


# ------------------------------------------------------------------ (b) narrowed == full, bit for bit
@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_narrowed_passes_equal_full_passes_bit_for_bit(mode, dtype, left_pad, batch):
    tokens, _, valid, response = batch
    if left_pad:
        tokens, response, valid = left_padded(valid, tokens, response, valid)
    for seed in (3, 4):
        model = tiny_decoder(VOCAB, seed=seed, weight_scale=3.0, embed_dim=48)
        codec = codec_for(model, tokens, valid, dtype)
        slots = slots_of(mode, tokens, valid, response)
        bound = int(slots.sum(1).max())
        ref_bins, ref_signal, _, _, ref_layout = full_passes(
            model, tokens, slots, codec, valid=valid, left_pad=left_pad, max_passes=bound + 1
        )
        got = compute_bins(
            model, tokens, codec=codec, slots=slots, valid_mask=valid, pad_id=PAD, left_pad=left_pad, sequential_fallback=False
        )
        assert got.converged
        assert torch.equal(got.bins, ref_bins)
        assert got.signal.dtype == dtype and torch.equal(got.signal.nan_to_num(-1.0), ref_signal.nan_to_num(-1.0))
        assert torch.equal(got.interleaved.tokens, ref_layout.tokens)
        assert torch.equal(got.interleaved.valid_mask, ref_layout.valid_mask)


@pytest.mark.parametrize("max_passes", [None, 3])
def test_passes_in_small_chunks_give_the_same_bits(max_passes, model, batch, monkeypatch):
    """A large vocabulary makes a pass compute its signals a few slots at a time (and, uncapped,
    stop each row at its first changed slot); a tiny chunk budget does the same here."""
    from entropy_guided_generation import fixed_point

    tokens, _, valid, response = batch
    slots = slots_of("answer", tokens, valid, response)
    codec = codec_for(model, tokens, valid)
    kwargs = dict(codec=codec, slots=slots, valid_mask=valid, pad_id=PAD, max_passes=max_passes, sequential_fallback=False)
    # Signals dear against a token's forward (a large vocabulary on a small model): lazy passes.
    monkeypatch.setattr(fixed_point, "_signals_are_cheap", lambda model: False)
    whole = compute_bins(model, tokens, **kwargs)
    monkeypatch.setattr(fixed_point, "_CHUNK_LOGITS", 3 * VOCAB)
    chunked = compute_bins(model, tokens, **kwargs)
    assert torch.equal(chunked.bins, whole.bins)
    assert torch.equal(chunked.signal.nan_to_num(-1.0), whole.signal.nan_to_num(-1.0))
    assert chunked.converged == whole.converged
    if max_passes is None:  # lazy: each row's signals stop at its first change
        assert sum(chunked.pass_slots[1:]) < sum(whole.pass_slots[1:])


# ------------------------------------------------------------------ (c) a cap still works
@pytest.mark.parametrize("cap", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_a_cap_matches_capped_full_passes_and_reports_unconverged_rows(mode, cap, model, batch):
    tokens, labels, valid, response = batch
    slots = slots_of(mode, tokens, valid, response)
    codec = codec_for(model, tokens, valid)
    ref_bins, ref_signal, ref_passes, ref_changed, _ = full_passes(model, tokens, slots, codec, valid=valid, left_pad=False, max_passes=cap)
    got = compute_bins(model, tokens, codec=codec, slots=slots, labels=labels, valid_mask=valid, pad_id=PAD, max_passes=cap)
    exact = compute_bins(model, tokens, codec=codec, slots=slots, valid_mask=valid, pad_id=PAD)
    assert got.passes == ref_passes == cap and not got.converged
    assert torch.equal(got.bins, ref_bins)
    assert torch.equal(got.signal.nan_to_num(-1.0), ref_signal.nan_to_num(-1.0))
    assert (math.isnan(got.changed_fraction) and math.isnan(ref_changed)) or got.changed_fraction == ref_changed
    wrong_rows = int(((got.bins != exact.bins) & slots).any(1).sum())
    assert 0 < wrong_rows <= got.unconverged_rows <= tokens.shape[0]
    assert got.stepped_slots == 0 and len(got.pass_rows) == cap == len(got.pass_slots)


def test_a_cap_that_suffices_converges():
    model = tiny_decoder(VOCAB, seed=2, weight_scale=3.0)
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    slots = confidence_slots(tokens, mode="full")  # 3 slots a row: at most 3 passes
    codec = spread_codec()
    got = compute_bins(model, tokens, codec=codec, slots=slots, max_passes=10)
    assert got.converged and got.unconverged_rows == 0 and got.passes <= 3
    assert torch.equal(got.bins, compute_bins(model, tokens, codec=codec, slots=slots).bins)


def test_rows_with_one_slot_are_exact_after_the_plain_pass(model):
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    response = torch.tensor([[False, False, False, True], [False, False, False, True]])
    slots = confidence_slots(tokens, mode="answer", response_mask=response)
    codec = spread_codec()
    got = compute_bins(model, tokens, codec=codec, slots=slots)
    assert got.passes == 1 and got.converged and got.changed_fraction == 0.0 and math.isnan(got.recomputed_fraction)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_max_passes_is_named(bad, model):
    tokens = torch.tensor([[5, 6, 7]])
    codec = spread_codec()
    with pytest.raises(ValueError, match=f"max_passes must be None .* or an int >= 1, got {bad!r}"):
        compute_bins(model, tokens, codec=codec, slots=confidence_slots(tokens, mode="full"), max_passes=bad)


# ------------------------------------------------------------------ (d) FSDP2: ranks keep forwards in step
RANK_WIDTHS = (30, 10)  # rank 1's rows are cut short: torch.chunk(8) makes 8 output chunks of 30 columns, 5 of 10


def sharded_tiny_model():
    """The module's model, untied, with torchtune's chunked output (8 chunks) as training sets it."""
    model = tiny_decoder(VOCAB, seed=11, weight_scale=3.0, tie_word_embeddings=False)
    model.set_num_output_chunks(8)
    return model


def rank_rows(rank: int, mode: str):
    """Rank ``rank``'s batch: rank 0 every row at full width; rank 1 the rows cut to 10 columns and,
    in mode answer, no slot at all (no pass of its own)."""
    tokens, labels, valid, response = (t[:, : RANK_WIDTHS[rank]] for t in plain_batch())
    if rank == 1 and mode == "answer":
        response = torch.zeros_like(response)
    return tokens, labels, valid, response


def _sharded_fixed_point_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank (gloo): the fixed point and a training loss step on an FSDP2-sharded copy of
    :func:`sharded_tiny_model`, with ``tok_embeddings`` and ``output`` sharded on their own (the
    8B configs' ``custom_sharded_layers``). The ranks need different numbers of passes and
    forwards of different widths; any difference in the all-gathers they join would hang."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from entropy_guided_generation.training.loss_step import ModelBatch, summed_token_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = sharded_tiny_model()
        codec = codec_for(model, *(plain_batch()[i] for i in (0, 2)))
        for module in (*model.layers, model.tok_embeddings, model.output, model):
            fully_shard(module)
        results = {}
        for mode in ("full", "answer"):
            tokens, labels, valid, response = rank_rows(rank, mode)
            slots = slots_of(mode, tokens, valid, response)
            result = compute_bins(model, tokens, codec=codec, slots=slots, labels=labels, valid_mask=valid, pad_id=PAD)
            layout = result.interleaved
            batch = ModelBatch(layout.tokens, layout.labels, layout.is_confidence)
            loss = summed_token_loss(model, CEWithChunkedOutputLoss(num_output_chunks=8), batch)
            loss.loss.backward()
            results[mode] = (result.bins, result.passes, loss.loss.detach())
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp2_ranks_needing_different_passes_and_widths_keep_in_step(tmp_path):
    import torch.multiprocessing as mp
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from entropy_guided_generation.training.loss_step import ModelBatch, summed_token_loss

    mp.spawn(_sharded_fixed_point_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = sharded_tiny_model()
    codec = codec_for(model, *(plain_batch()[i] for i in (0, 2)))
    for mode in ("full", "answer"):
        for rank in range(2):
            tokens, labels, valid, response = rank_rows(rank, mode)
            slots = slots_of(mode, tokens, valid, response)
            alone = compute_bins(model, tokens, codec=codec, slots=slots, labels=labels, valid_mask=valid, pad_id=PAD)
            bins, passes, loss = ranks[rank][mode]
            assert torch.equal(bins, alone.bins), (mode, rank)
            layout = alone.interleaved
            expected = summed_token_loss(model, CEWithChunkedOutputLoss(num_output_chunks=8), ModelBatch(layout.tokens, layout.labels, layout.is_confidence))
            assert torch.allclose(loss, expected.loss.detach(), rtol=1e-5), (mode, rank)
    assert ranks[0]["full"][1] > 1 and ranks[1]["answer"][1] == 0  # passes differ across ranks


def test_cheap_signals_make_every_pass_compute_every_unsettled_slot(model, batch, monkeypatch):
    """When a signal costs no more than a token's forward (a real LM), each pass computes every slot
    after a row's settled prefix (all guesses improve at once) instead of a lazy window: the same
    bins, fewer passes."""
    from entropy_guided_generation import fixed_point

    tokens, _, valid, response = batch
    slots = slots_of("answer", tokens, valid, response)
    codec = codec_for(model, tokens, valid)
    kwargs = dict(codec=codec, slots=slots, valid_mask=valid, pad_id=PAD, sequential_fallback=False)
    assert fixed_point._signals_are_cheap(model)
    whole = compute_bins(model, tokens, **kwargs)
    monkeypatch.setattr(fixed_point, "_signals_are_cheap", lambda model: False)
    monkeypatch.setattr(fixed_point, "_CHUNK_LOGITS", 3 * VOCAB)
    lazy = compute_bins(model, tokens, **kwargs)
    assert whole.converged and torch.equal(whole.bins, lazy.bins)
    assert whole.passes <= lazy.passes
    counts = slots.sum(1)
    # Pass 1 computes each row's every slot after its first (final after pass 0).
    assert whole.pass_slots[1] == int((counts - 1).clamp(min=0)[counts > 1].sum())
