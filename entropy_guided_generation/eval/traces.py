"""Per-sample confidence traces: what the model saw and how sure it was, token by token.

A trace is recorded for every lm-eval request the adapter serves: the continuation's content
tokens, the bin and signal of the confidence token after each (bin -1 where none), and the
entropy and log-probability of each content token under the confidence distribution (confidence
ids masked, logits / tau_H; the plain softmax in mode none).

Sequence confidence of a trace = exp(mean content-token log-probability), the geometric mean of
the per-token probabilities (in [0, 1]); for a generated answer it covers the tokens of the text
returned to lm-eval (up to the stop sequence).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch


def sequence_confidence(token_logprobs: torch.Tensor) -> float:
    """exp(mean log p) of ``token_logprobs`` ``[T]`` (nats, T >= 1, finite or -inf)."""
    if token_logprobs.numel() == 0:
        raise ValueError("sequence confidence needs at least one content token, got none")
    if bool(torch.isnan(token_logprobs).any()):
        raise ValueError(f"token log-probabilities contain NaN: {token_logprobs.tolist()}")
    return float(token_logprobs.double().mean().exp())


def _floats(values: torch.Tensor) -> list[Optional[float]]:
    """JSON-friendly floats (NaN -> None)."""
    return [None if math.isnan(v) else v for v in values.double().tolist()]


@dataclass
class ConfidenceTrace:
    """The confidence record of one lm-eval request.

    Attributes:
        task: lm-eval task name (None outside the evaluator).
        doc_id: the document's index in the task (None outside the evaluator).
        request_index: the request's index within its document (e.g. the answer choice).
        request_type: ``generate_until`` | ``loglikelihood`` | ``loglikelihood_rolling``.
        mode: the interleaving mode.
        tokens: content token ids of the continuation (generated or scored), confidence tokens removed.
        bins: bin of the confidence token after each content token (-1 where none).
        signal: the confidence signal behind each bin (None where none).
        entropy: entropy (nats) of the distribution that produced each content token.
        logprob: log p of each content token under that distribution.
        sequence_confidence: exp(mean logprob) over the tokens above.
    """

    task: Optional[str]
    doc_id: Optional[int]
    request_index: int
    request_type: str
    mode: str
    tokens: list[int]
    bins: list[int]
    signal: list[Optional[float]]
    entropy: list[Optional[float]]
    logprob: list[Optional[float]]
    sequence_confidence: float

    @classmethod
    def from_tensors(
        cls,
        *,
        task: Optional[str],
        doc_id: Optional[int],
        request_index: int,
        request_type: str,
        mode: str,
        tokens: torch.Tensor,
        bins: torch.Tensor,
        signal: torch.Tensor,
        entropy: torch.Tensor,
        logprob: torch.Tensor,
    ) -> "ConfidenceTrace":
        """A trace from per-token ``[T]`` tensors of one request."""
        lengths = {t.numel() for t in (tokens, bins, signal, entropy, logprob)}
        if len(lengths) != 1:
            raise ValueError(f"trace tensors must have one length each, got lengths {sorted(lengths)}")
        return cls(
            task=task,
            doc_id=doc_id,
            request_index=request_index,
            request_type=request_type,
            mode=mode,
            tokens=[int(t) for t in tokens.tolist()],
            bins=[int(b) for b in bins.tolist()],
            signal=_floats(signal),
            entropy=_floats(entropy),
            logprob=_floats(logprob),
            sequence_confidence=sequence_confidence(logprob),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def in_document_order(traces: Iterable[ConfidenceTrace]) -> list[ConfidenceTrace]:
    """``traces`` ordered by task, document and request index, as lm-eval lists samples; traces of
    one request (repeats) keep their order. The same list whatever the ranks or batches that served it."""
    return sorted(traces, key=lambda t: (t.task or "", -1 if t.doc_id is None else t.doc_id, t.request_index))


def write_traces_jsonl(path: Union[str, Path], traces: Iterable[ConfidenceTrace]) -> Path:
    """Write one trace per line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for trace in traces:
            handle.write(json.dumps(trace.to_dict(), ensure_ascii=False) + "\n")
    return path


__all__ = ["ConfidenceTrace", "in_document_order", "sequence_confidence", "write_traces_jsonl"]
