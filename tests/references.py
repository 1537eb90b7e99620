"""Independent few-line references for the numbers users read, written without the library's code:
ECE, AUROC, sequence confidence, and exact interleaved teacher forcing one token at a time (what a
decoder feeds: each confidence token is binned from the logits that produced the token before it)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch


def ece(confidence: Sequence[float], correct: Sequence[float], num_bins: int = 10) -> float:
    """ECE by the textbook definition: bins [k/B, (k+1)/B), 1.0 in the last bin."""
    total = 0.0
    for k in range(num_bins):
        members = [
            i for i, c in enumerate(confidence)
            if (k / num_bins <= c < (k + 1) / num_bins) or (k == num_bins - 1 and c == 1.0)
        ]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            total += len(members) / len(confidence) * abs(acc - conf)
    return total


def auroc(confidence: Sequence[float], correct: Sequence[float]) -> float:
    """P(confidence of a correct sample > that of a wrong one), ties counting 1/2, over all pairs."""
    pos = [c for c, y in zip(confidence, correct) if y == 1]
    neg = [c for c, y in zip(confidence, correct) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def geometric_mean_probability(logprobs: Sequence[float]) -> float:
    """exp of the mean log-probability."""
    return math.exp(sum(logprobs) / len(logprobs))


@torch.no_grad()
def teacher_force_stepwise(
    model,
    context: Sequence[int],
    continuation: Sequence[int],
    *,
    conf_ids: Sequence[int],
    edges: Sequence[float] = (),
    prompt_bins: bool = False,
    stop_ids: Sequence[int] = (),
    marker: Optional[Sequence[int]] = None,
    positions: str = "sequential",
    signal: str = "entropy",
    temperature: float = 1.0,
    bin_of: Optional[Callable[[float], int]] = None,
    context_of_signal: str = "interleaved",
) -> dict:
    """Score ``continuation`` after ``context`` as a decoder would produce it, one forward per token.

    Each token x_t after the first is predicted by the last logits of the whole interleaved prefix
    so far; with the confidence ids masked and the logits divided by ``temperature``, the signal is
    the entropy H_t of that distribution (nats) or (``signal="max_prob"``) its largest probability,
    and its bin is the number of ``edges`` <= the signal (or ``bin_of(signal)``). After x_t comes conf_ids[bin], for continuation tokens
    (``prompt_bins``: context tokens after the first too), never after a stop token, and (``marker``)
    not after the continuation's first occurrence of the marker has been written. ``positions``:
    ``sequential`` numbers every token; ``shared`` gives a confidence token its content token's position.
    ``context_of_signal="plain"``: the signal is read off the last logits of the *plain* prefix (the
    content tokens so far, no confidence tokens) instead; log-probs and entropies stay the interleaved
    prefix's (the distribution x_t is drawn from).

    Returns: ``logprob``, ``entropy``, ``bins`` of the continuation's tokens (bins -1 where none)
    and the interleaved ``sequence``.
    """
    edges_t = torch.tensor(list(edges), dtype=torch.float64)
    seq: list[int] = []
    pos: list[int] = []
    out = {"logprob": [], "entropy": [], "bins": []}
    written: list[int] = []
    tokens = list(context) + list(continuation)
    for i, token in enumerate(tokens):
        in_continuation = i >= len(context)
        bin_ = -1
        if i > 0:
            logits = model(torch.tensor([seq]), input_pos=torch.tensor([pos]))[0, -1].double()
            logits[list(conf_ids)] = -math.inf
            logp = torch.log_softmax(logits / temperature, dim=-1)
            p = logp.exp()
            entropy = float(-(p[p > 0] * logp[p > 0]).sum())
            if context_of_signal == "plain":
                plain = model(torch.tensor([tokens[:i]]))[0, -1].double()
                plain[list(conf_ids)] = -math.inf
                plain_logp = torch.log_softmax(plain / temperature, dim=-1)
                q = plain_logp.exp()
                value = float(-(q[q > 0] * plain_logp[q > 0]).sum()) if signal == "entropy" else float(q.max())
            else:
                value = entropy if signal == "entropy" else float(p.max())
            bin_ = bin_of(value) if bin_of is not None else int((edges_t <= value).sum())
            if in_continuation:
                out["logprob"].append(float(logp[token]))
                out["entropy"].append(entropy)
        seq.append(token)
        pos.append(len(seq) - 1 if positions == "sequential" else i)  # content token i of the plain text
        if in_continuation:
            written.append(token)
        marker_done = marker is not None and _contains(written[:-1], marker)
        gets_bin = i > 0 and (in_continuation or prompt_bins) and token not in stop_ids and not marker_done
        if gets_bin:
            seq.append(conf_ids[bin_])
            pos.append(len(seq) - 1 if positions == "sequential" else i)
        if in_continuation:
            out["bins"].append(bin_ if gets_bin else -1)
    out["sequence"] = seq
    return out


def _contains(tokens: Sequence[int], pattern: Sequence[int]) -> bool:
    n = len(pattern)
    return any(list(tokens[k : k + n]) == list(pattern) for k in range(len(tokens) - n + 1))
