"""The decode-session protocol: every implementation (torchtune KV cache, Hugging Face cache, prefix
re-run) gives the logits of one full forward over the real tokens it was fed, whatever padding
columns and dropped columns it saw on the way."""
from __future__ import annotations

import pytest
import torch

from entropy_guided_generation import kit
from entropy_guided_generation.generation import HFSession, KVSession, PrefixSession, left_pad, left_padded_mask, open_session

PAD = 0


@pytest.fixture(scope="module")
def pair():
    """The kit's random tiny Qwen2 as a transformers model and as a torchtune decoder (same weights)."""
    from transformers import AutoModelForCausalLM

    folder = kit.build_tiny_checkpoint(init_std=0.5)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), kit.load_torchtune_model(folder)


class TokensToLogits(torch.nn.Module):
    """A module that is neither a torchtune decoder nor a Hugging Face model (it calls one)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.inner(tokens, **kwargs)


def reference_logits(hf, rows: list[list[int]]) -> torch.Tensor:
    """``[b, v]`` next-token logits after each row's tokens, one unpadded forward per row."""
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([row])).logits[0, -1].float() for row in rows])


# Each script event: ("step", tokens [b], valid [b]) or ("drop", rows [b], n).
PROMPTS = [[5, 17, 33, 8], [41, 9]]
SCRIPT = [
    ("step", [11, 12], [True, True]),
    ("step", [13, 14], [True, False]),  # row 1 feeds a padding column
    ("step", [15, 16], [True, True]),
    ("drop", [False, True], 2),  # row 1 forgets its last two columns: a padding column and token 16
    ("step", [18, 19], [True, True]),
    ("drop", [True, False], 1),  # row 0 forgets 18
    ("step", [20, 21], [True, True]),
]


def replay(session, prompt: torch.Tensor) -> tuple[list[torch.Tensor], list[list[list[int]]], list[list[bool]]]:
    """Run :data:`SCRIPT` on ``session``: the logits ``[b, v]`` after each feed, the real tokens each
    row holds then, and which rows fed a real token (a padding column's logits mean nothing)."""
    real = [list(p) for p in PROMPTS]
    fed: list[list[tuple[int, bool]]] = [[] for _ in PROMPTS]
    logits, states, fed_real = [session.prefill(prompt, prompt != PAD)], [[list(r) for r in real]], [[True] * len(PROMPTS)]
    for kind, a, b in SCRIPT:
        if kind == "drop":
            session.drop_last(torch.tensor(a), b)
            for row, drop in enumerate(a):
                if drop:
                    fed[row][-b:] = [(t, False) for t, _ in fed[row][-b:]]
            continue
        for row, (token, valid) in enumerate(zip(a, b)):
            fed[row].append((token, valid))
        logits.append(session.step(torch.tensor(a), torch.tensor(b)))
        states.append([real[row] + [t for t, ok in fed[row] if ok] for row in range(len(PROMPTS))])
        fed_real.append(list(b))
    return logits, states, fed_real


@pytest.mark.parametrize("flavour", ["torchtune KV cache", "Hugging Face cache", "prefix re-run"])
def test_session_logits_equal_a_full_forward_over_the_real_tokens_fed(pair, flavour):
    hf, tt = pair
    prompt = left_pad(PROMPTS, PAD)
    model, kind = {
        "torchtune KV cache": (tt, KVSession), "Hugging Face cache": (hf, HFSession), "prefix re-run": (TokensToLogits(tt), PrefixSession),
    }[flavour]
    with torch.no_grad(), open_session(model, len(PROMPTS), prompt.shape[1] + len(SCRIPT)) as session:
        assert isinstance(session, kind)
        logits, states, fed_real = replay(session, prompt)
    for got, rows, used in zip(logits, states, fed_real):
        used = torch.tensor(used)
        torch.testing.assert_close(got[used], reference_logits(hf, rows)[used], rtol=0, atol=1e-4)


def test_open_session_reuses_static_caches_and_rejects_a_batch_they_do_not_fit(pair):
    _, tt = pair
    tt.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=32)
    try:
        with open_session(tt, 2, 16) as session:
            assert session.cache_len == 32
        with pytest.raises(ValueError, match="set up for batch 2 x 32 positions, but this call needs batch 3 x 16"):
            with open_session(tt, 3, 16):
                pass
    finally:
        from torchtune.modules.common_utils import delete_kv_caches

        delete_kv_caches(tt)


def test_left_pad_right_aligns_rows_and_rejects_a_row_wider_than_asked():
    assert left_pad([[1, 2], [3], []], 9).tolist() == [[1, 2], [9, 3], [9, 9]]
    assert left_padded_mask(torch.tensor([2, 1, 0]), 2).tolist() == [[True, True], [False, True], [False, False]]
    assert left_pad([[1]], 0, width=3).tolist() == [[0, 0, 1]]
    with pytest.raises(ValueError, match="a row of 3 tokens does not fit width 2"):
        left_pad([[1, 2, 3]], 0, width=2)


def test_a_prompt_fed_in_chunks_gives_the_logits_of_a_full_forward(pair, monkeypatch):
    """A prefill wider than ``PREFILL_CHUNK`` runs chunk by chunk (each chunk's queries over the
    columns up to its end): every column's logits still equal one full forward's."""
    from entropy_guided_generation import sessions

    hf, tt = pair
    rows = [[5, 17, 33, 8, 21, 9, 40, 2, 7], [41, 9, 3, 30]]
    prompt = left_pad(rows, PAD)
    monkeypatch.setattr(sessions, "PREFILL_CHUNK", 4)  # 9 columns: chunks of 4, 4 and 1
    last = torch.full((2,), prompt.shape[1] - 1)
    with torch.no_grad(), open_session(tt, 2, prompt.shape[1] + 1) as session:
        got = session.feed(prompt, prompt != PAD, last)
        after = session.step(torch.tensor([11, 12]), torch.tensor([True, True]))
    torch.testing.assert_close(got, reference_logits(hf, rows), rtol=0, atol=1e-4)
    torch.testing.assert_close(after, reference_logits(hf, [r + [t] for r, t in zip(rows, [11, 12])]), rtol=0, atol=1e-4)


def test_session_attention_reads_the_filled_columns_with_grouped_heads_and_hands_the_forward_back(pair):
    """Inside a session each attention call sees the keys of the columns filled so far (not the
    static cache's length), its key/value heads unexpanded; after it (nested sessions included)
    the modules run torchtune's own forward again."""
    from entropy_guided_generation.sessions import SESSION_ATTENTION_OBSERVER, caches_set_aside, kv_session

    _, tt = pair
    attn = tt.layers[-1].attn
    seen: list[tuple[int, int, int]] = []
    setattr(attn, SESSION_ATTENTION_OBSERVER, lambda q, k, mask: seen.append((q.shape[1], k.shape[1], k.shape[2])))
    try:
        with torch.no_grad(), kv_session(tt, 2, 40) as session:
            prompt = left_pad(PROMPTS, PAD)
            session.prefill(prompt, prompt != PAD)
            with caches_set_aside(tt), kv_session(tt, 1, 8) as inner:  # the fixed point's stepping, on caches of its own
                inner.prefill(torch.tensor([[3, 4]]), torch.tensor([[True, True]]))
            session.step(torch.tensor([11, 12]), torch.tensor([True, True]))
    finally:
        delattr(attn, SESSION_ATTENTION_OBSERVER)
    with torch.no_grad(), kv_session(tt, 2, 8):
        with pytest.raises(RuntimeError, match="ran outside its open KV session's feeds"):
            # a stray forward on the session's caches (torchtune's own check wants a mask first)
            tt(torch.tensor([[3, 4], [5, 6]]), mask=torch.ones(2, 2, 8, dtype=torch.bool).tril(), input_pos=torch.tensor([[0, 1]] * 2))
        with caches_set_aside(tt):
            assert tt(torch.tensor([[3, 4], [5, 6]])).shape[:2] == (2, 2)
    heads, kv_heads = attn.num_heads, attn.num_kv_heads
    assert kv_heads < heads
    assert seen == [(heads, kv_heads, 4), (heads, kv_heads, 2), (heads, kv_heads, 5)]
    assert all("forward" not in m.__dict__ for m in tt.modules())
