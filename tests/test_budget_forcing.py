"""Budget forcing on one KV cache: torchtune and Hugging Face paths, budgets, rounds and bad input.

Models with known behaviour are built, not trained: a "bigram" Qwen2 whose attention and MLP
outputs are zero, so the hidden state is the current token's embedding, one-hot in a slot, and
``lm_head`` column k holds the next-token logits after every token of slot k.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import pytest
import torch

from entropy_guided_generation import kit
from entropy_guided_generation.sampling import scalers
from entropy_guided_generation.sampling.budget_forcing import (
    ANSWER,
    CONTINUATION,
    END,
    THINK,
    budget_force_torchtune,
    budget_forcing_config,
    budget_forcing_requested,
)
from entropy_guided_generation.sampling.budget_forcing_hf import budget_force_hf

HIGH_MARGIN = 30.0  # logit lead of the favoured token: entropy ~ 0
LOW_MARGIN = 1.0  # a slight lead: greedy still picks it, entropy ~ ln(vocab)


def ids_of(text: str) -> int:
    """The single kit token id of ``text``."""
    (i,) = kit.load_tokenizer().encode(text, add_bos=False, add_eos=False)
    return i


def peaked(vocab: int, target: int, margin: float) -> torch.Tensor:
    """Logits ``[v]``: 0 everywhere, ``margin`` at ``target``."""
    logits = torch.zeros(vocab)
    logits[target] = margin
    return logits


def entropy_of(logits: torch.Tensor) -> float:
    return float(-(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum())


def write_bigram_checkpoint(folder: Path, default: torch.Tensor, after: Mapping[int, torch.Tensor]) -> Path:
    """An HF Qwen2 checkpoint (kit tokenizer beside it) whose next-token logits depend only on the
    current token: ``after[token]`` for the listed tokens, ``default`` for every other one."""
    from transformers import Qwen2ForCausalLM

    from entropy_guided_generation.kit.models import hf_config
    from entropy_guided_generation.kit.tokenizer import build_tokenizer, copy_tokenizer_files, vocab_size_of

    tok_dir = build_tokenizer()
    tok = kit.load_tokenizer()
    vocab = vocab_size_of(tok_dir)
    config = hf_config("qwen2", vocab, tok.eos_id, tok.pad_id, num_layers=1, hidden_size=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    d = config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        slots = torch.zeros(vocab, dtype=torch.long)
        for slot, token in enumerate(after, start=1):
            slots[token] = slot
        model.model.embed_tokens.weight.copy_(torch.nn.functional.one_hot(slots, d).float())
        head = torch.zeros(vocab, d)
        # RMSNorm maps a one-hot embedding to sqrt(d) * one-hot (up to eps).
        head[:, 0] = default / math.sqrt(d)
        for slot, logits in enumerate(after.values(), start=1):
            head[:, slot] = logits / math.sqrt(d)
        model.lm_head.weight.copy_(head)
    model.generation_config.eos_token_id = [tok.eos_id, tok.pad_id]
    model.generation_config.pad_token_id = tok.pad_id
    model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer_files(tok_dir, folder)
    return folder


def answering_rows(vocab: int) -> dict[int, torch.Tensor]:
    """After ``</think>`` the answer ``4``, then EOS."""
    return {
        ids_of(kit.THINK_END): peaked(vocab, ids_of("4"), HIGH_MARGIN),
        ids_of("4"): peaked(vocab, kit.load_tokenizer().eos_id, HIGH_MARGIN),
    }


def vocab() -> int:
    from entropy_guided_generation.kit.tokenizer import vocab_size_of

    return vocab_size_of()


def ends_at_once_checkpoint(folder: Path) -> Path:
    """Every thinking token is followed by ``</think>`` at once."""
    v = vocab()
    return write_bigram_checkpoint(folder, peaked(v, ids_of(kit.THINK_END), HIGH_MARGIN), answering_rows(v))


def never_ends_checkpoint(folder: Path) -> Path:
    """Thinks ``a a a ...`` for ever; answers ``4`` after ``</think>``."""
    v = vocab()
    return write_bigram_checkpoint(folder, peaked(v, ids_of("a"), HIGH_MARGIN), answering_rows(v))


def entropy_checkpoint(folder: Path) -> tuple[Path, list[float]]:
    """Each round thinks ``b c d e`` with entropies [high, high, low, low], then ``</think>``.

    Returns the folder and the four entropies (nats) of a round."""
    v = vocab()
    b, c, d, e = (ids_of(x) for x in "bcde")
    default = peaked(v, b, LOW_MARGIN)
    rows = {
        b: peaked(v, c, LOW_MARGIN),
        c: peaked(v, d, HIGH_MARGIN),
        d: peaked(v, e, HIGH_MARGIN),
        e: peaked(v, ids_of(kit.THINK_END), HIGH_MARGIN),
        **answering_rows(v),
    }
    folder = write_bigram_checkpoint(folder, default, rows)
    return folder, [entropy_of(default), entropy_of(rows[b]), entropy_of(rows[c]), entropy_of(rows[d])]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def random_pair():
    """The kit's random tiny Qwen2 as a transformers model and as a torchtune decoder (same weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = kit.build_tiny_checkpoint(init_std=0.5)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    return hf, AutoTokenizer.from_pretrained(folder), kit.load_torchtune_model(folder), kit.load_tokenizer()


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False) for t in ("Ann has 3 bags with 4 shells each.\n", "7 + 5 =\n")]


def _greedy_tokens_of_plain(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def _run_torchtune(tt, ttok, prompts, gen_kwargs):
    return budget_force_torchtune(tt, ttok, prompts, gen_kwargs, pad_id=ttok.pad_id, stop_tokens=[ttok.eos_id, ttok.pad_id], max_length=512)


# ---------------------------------------------------------------- one cache, both paths


def _suppressing_gen_kwargs(hf, tokenizer, prompt: list[int]) -> dict:
    """gen_kwargs whose (two-token) end delimiter is what the random model greedily says after
    ``<think>``, so rounds end by the delimiter and are suppressed (drop from the cache) for real."""
    start = tokenizer.convert_tokens_to_ids(kit.THINK_START)
    first, second = _greedy_tokens_of_plain(hf, prompt + [start], 2)
    end = tokenizer.decode([first, second])
    assert tokenizer.encode(end, add_special_tokens=False) == [first, second], "pick a prompt whose greedy pair round-trips"
    return dict(max_gen_toks=40, max_tokens_thinking=24, thinking_n_ignore=2, thinking_end=end, thinking_n_ignore_str="Wait")


def test_torchtune_and_hf_paths_give_the_same_forced_trace(random_pair):
    hf, tok, tt, ttok = random_pair
    prompts = _prompts(tok)
    gen_kwargs = _suppressing_gen_kwargs(hf, tok, prompts[0])
    a = budget_force_hf(hf, tok, prompts, gen_kwargs, max_length=512)
    b = _run_torchtune(tt, ttok, prompts, gen_kwargs)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.log_record()["end_reasons"] for o in a] == [o.log_record()["end_reasons"] for o in b]
    assert a[0].rounds[0].end_reason == "delimiter" and a[0].rounds[0].scale_token == tok.encode("Wait", add_special_tokens=False)
    for x, y in zip(a, b):
        for rx, ry in zip(x.rounds, y.rounds):
            torch.testing.assert_close(torch.tensor(rx.entropies), torch.tensor(ry.entropies), atol=1e-4, rtol=0)


def test_every_sampled_token_is_the_greedy_choice_of_a_full_forward_over_the_final_sequence(random_pair):
    """No re-prefill between rounds, dropped delimiter tokens masked: the cached loop must equal
    teacher forcing on the final sequence (prompt + kept tokens) at every sampled position."""
    hf, tok, _, _ = random_pair
    prompts = _prompts(tok)
    gen_kwargs = _suppressing_gen_kwargs(hf, tok, prompts[0])
    start = tok.convert_tokens_to_ids(kit.THINK_START)
    outputs = budget_force_hf(hf, tok, prompts, gen_kwargs, max_length=512)
    assert outputs[0].continuations >= 1 and outputs[0].rounds[0].end_reason == "delimiter", outputs[0].log_record()
    for prompt, out in zip(prompts, outputs):
        full = torch.tensor([prompt + [start] + out.tokens])
        with torch.no_grad():
            greedy = hf(full).logits[0].argmax(-1)
        p = len(prompt) + 1
        sampled = [i for i, k in enumerate(out.kinds) if k in (THINK, ANSWER)]
        assert [out.tokens[i] for i in sampled] == [int(greedy[p + i - 1]) for i in sampled]


def test_batched_rows_equal_rows_run_alone(random_pair):
    hf, tok, tt, ttok = random_pair
    prompts = _prompts(tok)
    gen_kwargs = _suppressing_gen_kwargs(hf, tok, prompts[0])
    together = _run_torchtune(tt, ttok, prompts, gen_kwargs)
    alone = [_run_torchtune(tt, ttok, [p], gen_kwargs)[0] for p in prompts]
    assert [o.tokens for o in together] == [o.tokens for o in alone]


# ---------------------------------------------------------------- semantics on built models


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The three bigram checkpoints as transformers models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bf-models")
    ent_dir, round_entropies = entropy_checkpoint(root / "entropy")
    dirs = {"once": ends_at_once_checkpoint(root / "once"), "never": never_ends_checkpoint(root / "never"), "entropy": ent_dir}
    models = {k: AutoModelForCausalLM.from_pretrained(v).eval() for k, v in dirs.items()}
    return dirs, models, AutoTokenizer.from_pretrained(dirs["once"]), round_entropies


def _force(built, name: str, **gen_kwargs):
    _, models, tok, _ = built
    return budget_force_hf(models[name], tok, [tok.encode("Q?\n", add_special_tokens=False)], dict(gen_kwargs), max_length=512)[0]


@pytest.mark.parametrize("n_ignore", [0, 1, 3])
def test_model_that_ends_at_once_gets_exactly_n_continuations_then_answers(built, n_ignore):
    out = _force(built, "once", max_gen_toks=32, thinking_n_ignore=n_ignore, thinking_n_ignore_str="Wait")
    assert out.text == "Wait" * n_ignore + "</think>4"
    assert out.continuations == n_ignore
    assert [r.end_reason for r in out.rounds] == ["delimiter"] * (n_ignore + 1)
    assert out.answer_tokens[0] == ids_of("4")


def test_model_that_never_ends_stops_at_the_exact_budget_and_answers(built):
    out = _force(built, "never", max_gen_toks=64, max_tokens_thinking=9, thinking_answer_prefix="\nAnswer:")
    assert out.thinking_tokens == 9 and out.rounds[0].end_reason == "budget"
    assert out.text.startswith("a" * 9 + "</think>\nAnswer:")
    assert out.kinds.count(END) == 1 + len(kit.load_tokenizer().encode("\nAnswer:", add_bos=False, add_eos=False))
    assert len(out.answer_tokens) >= 1


def test_auto_budget_leaves_room_for_delimiter_and_one_answer_token(built):
    out = _force(built, "never", max_gen_toks=20, max_tokens_thinking="auto")
    assert out.thinking_tokens == 20 - 1 - 1  # end delimiter, one answer token
    assert len(out.tokens) == 20 and out.kinds[-1] == ANSWER


def test_budget_counts_continuation_tokens_and_is_never_exceeded(built):
    # Ends at once: each round adds only the continuation; "Wait Wait" is 3 ids, so 7 fits two of them.
    assert len(kit.load_tokenizer().encode("Wait Wait", add_bos=False, add_eos=False)) == 3
    out = _force(built, "once", max_gen_toks=32, max_tokens_thinking=7, thinking_n_ignore=10, thinking_n_ignore_str="Wait Wait")
    assert out.thinking_tokens == 6
    assert out.continuations == 2 and out.rounds[-1].end_reason == "budget"


def test_entropy_thresholding_decisions_follow_last_k_and_decay(built):
    high, _, low, _ = built[3]
    h = built[3]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    def continuations(**options) -> int:
        out = _force(built, "entropy", max_gen_toks=64, thinking_n_ignore=3, scale_func_name="entropy_thresholding", **options)
        assert all(len(r.tokens) == 4 for r in out.rounds)
        torch.testing.assert_close(torch.tensor(out.rounds[0].entropies), torch.tensor(h), atol=1e-3, rtol=0)
        return out.continuations

    whole = mean(h)
    assert continuations(threshold=whole - 0.1) == 3  # mean of the round above the threshold: continue
    assert continuations(threshold=whole + 0.1) == 0  # below: stop at once
    assert continuations(threshold=whole - 0.1, last_k=2) == 0  # last 2 tokens are the confident ones
    assert continuations(threshold=mean(h[-3:]) - 0.1, last_k=3) == 3
    assert continuations(threshold=mean(h[-3:]) - 0.1, last_k=0.5) == 0  # half the round = last 2
    assert continuations(threshold=mean(h[-3:]) - 0.1, last_k=0.75) == 3  # ceil(0.75 * 4) = 3
    # decay: threshold * decay**i crosses the mean after two continuations.
    decay = 1.1
    t0 = whole / decay**1.5
    assert continuations(threshold=t0, decay_factor=decay) == 2
    out = _force(built, "entropy", max_gen_toks=64, thinking_n_ignore=3, scale_func_name="entropy_thresholding", threshold=whole + 0.1)
    assert out.rounds[0].end_reason == "scaler"
    assert high > 5 and low < 0.01


# ---------------------------------------------------------------- requests and bad input


def test_requested_only_by_budget_forcing_keys():
    assert not budget_forcing_requested({"until": ["\n"], "max_gen_toks": 10, "do_sample": False})
    assert budget_forcing_requested({"scale_func_name": "default"})
    assert budget_forcing_requested({"max_tokens_thinking": "auto"})
    assert budget_forcing_requested({"max_tokens_answer": 16})


@pytest.mark.parametrize(
    "gen_kwargs, message",
    [
        ({"scale_func_name": "nope"}, "unknown scale_func_name 'nope'; expected one of default, entropy_thresholding"),
        ({"max_tokens_thinking": 0}, "max_tokens_thinking"),
        ({"max_tokens_thinking": -3}, "max_tokens_thinking"),
        ({"max_tokens_thinking": "lots"}, "'lots'"),
        ({"thinking_n_ignore": -1}, "thinking_n_ignore"),
        ({"scale_func_name": "entropy_thresholding", "last_k": 0}, "last_k"),
        ({"scale_func_name": "entropy_thresholding", "decay_factor": 0}, "decay_factor"),
        ({"max_tokens_answer": 0}, "max_tokens_answer must be an int >= 1, got 0"),
        ({"max_tokens_answer": "many"}, "max_tokens_answer must be an int >= 1, got 'many'"),
    ],
)
def test_bad_gen_kwargs_are_named(gen_kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        budget_forcing_config(gen_kwargs)


def test_auto_budget_with_a_prompt_longer_than_the_context_is_an_error(built):
    _, models, tok, _ = built
    long_prompt = tok.encode("a" * 40, add_special_tokens=False)
    with pytest.raises(ValueError, match="max_tokens_thinking=auto: a prompt of .* tokens leaves no room"):
        budget_force_hf(models["never"], tok, [long_prompt], {"max_tokens_thinking": "auto", "max_gen_toks": 8}, max_length=len(long_prompt))


@pytest.mark.parametrize("key", ["thinking_end", "thinking_n_ignore_str", "thinking_start"])
def test_delimiter_strings_that_tokenize_to_nothing_are_errors(built, key):
    _, models, tok, _ = built
    with pytest.raises(ValueError, match=f"{key}='' tokenizes to no tokens"):
        budget_force_hf(models["never"], tok, [[64]], {"max_tokens_thinking": 4, key: ""}, max_length=512)


def test_max_gen_toks_too_small_for_the_delimiters_is_an_error(built):
    _, models, tok, _ = built
    with pytest.raises(ValueError, match="max_gen_toks=2 cannot hold"):
        budget_force_hf(models["never"], tok, [[64]], {"max_tokens_thinking": 4, "max_gen_toks": 2, "thinking_answer_prefix": "Answer:"}, max_length=512)


def test_custom_scaler_chooses_its_own_continuation(built):
    @scalers.register("test_ponder", replace=True)
    def ponder():
        @scalers.scale_token_only
        def choose(iteration, seq, entropies, scale_token):
            return [ids_of("b")] * (iteration + 1)

        return choose

    out = _force(built, "once", max_gen_toks=32, thinking_n_ignore=2, scale_func_name="test_ponder")
    assert out.text == "b" + "bb" + "</think>4"
    assert [r.scale_token for r in out.rounds] == [[ids_of("b")], [ids_of("b")] * 2, None]
    assert out.kinds[:3] == [CONTINUATION] * 3


def test_an_empty_round_between_continuations_keeps_round_boundaries(built):
    """Round 1 ends at once (its continuation ``e`` is followed by ``</think>``): the continuations
    ``e`` and ``Wait`` are adjacent, yet round 2's tokens are round 2's."""
    e = ids_of("e")

    @scalers.register("test_e_then_wait", replace=True)
    def e_then_wait():
        @scalers.scale_token_only
        def choose(iteration, seq, entropies, scale_token):
            return [e] if iteration == 0 else list(scale_token)

        return choose

    out = _force(built, "entropy", max_gen_toks=64, thinking_n_ignore=2, scale_func_name="test_e_then_wait")
    bcde = [ids_of(x) for x in "bcde"]
    assert [r.tokens for r in out.rounds] == [bcde, [], bcde]
    assert [r.scale_token for r in out.rounds] == [[e], [ids_of("Wait")], None]
    assert out.rounds[2].entropies == pytest.approx(built[3], abs=1e-3)


# ---------------------------------------------------------------- the answer's own budget (max_tokens_answer)


@pytest.mark.parametrize(
    "thinking_end, thinking_tokens",
    [("x", 5), ("a", 0)],  # "x" never comes: thinking spends its budget; "a" ends thinking at once
)
def test_answer_budget_of_its_own_is_spent_in_full_however_long_thinking_was(built, thinking_end, thinking_tokens):
    # The never-ending model answers "a a a ..." for ever after any delimiter but "</think>".
    common = dict(max_gen_toks=20, max_tokens_thinking=5, thinking_end=thinking_end)
    own = _force(built, "never", max_tokens_answer=7, **common)
    assert own.thinking_tokens == thinking_tokens and len(own.answer_tokens) == 7
    assert own.kinds == [THINK] * thinking_tokens + [END] + [ANSWER] * 7
    shared = _force(built, "never", **common)  # unset: the answer gets what thinking leaves of max_gen_toks
    assert shared.thinking_tokens == thinking_tokens and len(shared.answer_tokens) == 20 - thinking_tokens - 1


def test_auto_budget_with_an_answer_budget_gives_thinking_all_of_max_gen_toks(built):
    out = _force(built, "never", max_gen_toks=20, max_tokens_thinking="auto", thinking_end="x", max_tokens_answer=7)
    assert out.thinking_tokens == 20 - 1 and out.rounds[0].end_reason == "budget"  # the delimiter is the only reserve
    assert len(out.answer_tokens) == 7 and len(out.tokens) == 20 + 7


def test_auto_budget_with_an_answer_budget_keeps_the_answer_inside_the_context(built):
    _, models, tok, _ = built
    prompt = tok.encode("Q?\n", add_special_tokens=False)
    context = len(prompt) + 1 + 30  # prompt, <think>, 30 tokens to generate
    gen_kwargs = dict(max_gen_toks=64, max_tokens_thinking="auto", thinking_end="x", max_tokens_answer=10)
    (out,) = budget_force_hf(models["never"], tok, [prompt], gen_kwargs, max_length=context)
    assert out.thinking_tokens == 30 - 10 - 1 and len(out.answer_tokens) == 10
    with pytest.raises(ValueError, match="leaves no room for thinking and max_tokens_answer=40"):
        budget_force_hf(models["never"], tok, [prompt], {**gen_kwargs, "max_tokens_answer": 40}, max_length=context)


def test_int_budgets_with_an_answer_budget_beyond_the_context_are_an_error(built):
    _, models, tok, _ = built
    with pytest.raises(ValueError, match="max_gen_toks=16 plus max_tokens_answer=600 and the thinking start .* leave no room for a prompt"):
        budget_force_hf(models["never"], tok, [[64]], {"max_tokens_thinking": 4, "max_gen_toks": 16, "max_tokens_answer": 600}, max_length=512)
