"""The confidence codec: signal -> bin -> confidence token, its edge schemes and presets, and
the ``confidence.json`` metadata written beside every finetuned checkpoint.

Signal of content position t (DESIGN.md): p_t = softmax(z_t / tau_H) over the vocabulary with
every confidence token id masked out, where z_t are the logits that predict x_t. The signal is
the entropy of p_t (nats) or its max probability. With K confidence tokens and ascending edges
e_1 < ... < e_{K-1}, bin(s) = number of edges <= scale * s, and c_t = token_ids[bin(s_t)].
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from entropy_guided_generation import signals
from entropy_guided_generation.confidence_tokens import (
    LLAMA3_RESERVED_IDS,
    LLAMA3_RESERVED_NAMINGS,
    PRESET_TOKENS,
    digit_confidence_tokens,
    encode_single_token,
    encode_text,
    kit_confidence_tokens,
    llama3_reserved_confidence_tokens,
    llama3_reserved_names,
    resolve_token_ids,
    smollm2_unused_confidence_tokens,
)

SIGNALS = ("entropy", "max_prob")
EDGE_SCHEMES = ("explicit", "uniform", "quantile", "entropy_round", "maxprob_round")
TOKEN_PRESETS = ("kit", "llama3_reserved", "digits", "smollm2_unused")
FORMAT_VERSION = 1
METADATA_FILENAME = "confidence.json"

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _half_even_round_edges(num_bins: int) -> torch.Tensor:
    """Edges (float64) such that bucketize(x, edges, right=True) == min(round_half_even(x), K-1) for x >= 0.

    torch.round rounds halves to even: k - 0.5 belongs to bin k when k is even and to bin k-1 when
    k is odd, so odd edges sit one float64 ulp above k - 0.5.
    """
    edges = []
    for k in range(1, num_bins):
        half = torch.tensor(k - 0.5, dtype=torch.float64)
        edges.append(half if k % 2 == 0 else torch.nextafter(half, torch.tensor(math.inf, dtype=torch.float64)))
    return torch.stack(edges)


def uniform_edges(num_bins: int, max_value: float) -> torch.Tensor:
    """K equal-width bins over [0, max_value]: the K-1 interior edges (float64)."""
    if num_bins < 2:
        raise ValueError(f"uniform edges need at least 2 bins, got {num_bins}")
    if not max_value > 0:
        raise ValueError(f"uniform edges need max > 0, got {max_value}")
    return torch.linspace(0.0, float(max_value), num_bins + 1, dtype=torch.float64)[1:-1]


def fit_quantile_edges(values: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Edges at the k/K quantiles (k = 1..K-1) of observed signal ``values`` (any shape, NaN ignored).

    Raises:
        ValueError: if there are too few values or the quantiles are not strictly ascending
            (e.g. many identical signals): use fewer bins or another scheme.
    """
    flat = values.detach().reshape(-1).to(torch.float64)
    flat = flat[~torch.isnan(flat)]
    if flat.numel() < num_bins:
        raise ValueError(f"quantile edges for {num_bins} bins need at least {num_bins} signal values, got {flat.numel()}")
    qs = torch.arange(1, num_bins, dtype=torch.float64) / num_bins
    edges = torch.quantile(flat.cpu(), qs)
    if not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(
            f"quantile edges are not strictly ascending ({edges.tolist()}): the fitted signals have too many ties "
            f"for {num_bins} bins; use fewer bins or scheme 'uniform'/'explicit'"
        )
    return edges


def _check_edges(edges: torch.Tensor, num_bins: int) -> None:
    if edges.dim() != 1:
        raise ValueError(f"edges must be 1-D, got shape {tuple(edges.shape)}")
    if edges.numel() != num_bins - 1:
        raise ValueError(
            f"{num_bins} confidence tokens need {num_bins - 1} edges (K = len(edges) + 1), got {edges.numel()} edges"
        )
    if not bool(torch.isfinite(edges).all()):
        raise ValueError(f"edges must be finite, got {edges.tolist()}")
    if edges.numel() > 1 and not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"edges must be strictly ascending, got {edges.tolist()}")


SIGNAL_CONTEXTS = ("interleaved", "plain")
"""``confidence.context``: the prefix whose next-token distribution gives c_t. ``interleaved``: the
sequence the model reads, confidence tokens included (the bins of a training row by fixed point,
DESIGN.md "Exactness"); ``plain``: the same prefix without confidence tokens (every bin of a row from
one plain forward; decoders keep a plain twin of each row)."""


def check_signal_context(context: Any) -> str:
    """Return ``context`` if it is one of :data:`SIGNAL_CONTEXTS`, else raise naming it."""
    if context not in SIGNAL_CONTEXTS:
        raise ValueError(f"unknown confidence.context {context!r}; expected one of {', '.join(SIGNAL_CONTEXTS)}")
    return context


@dataclass(frozen=True)
class ConfidenceCodec:
    """Maps logits to confidence bins and bins to confidence token ids.

    Attributes:
        signal: ``"entropy"`` (nats) or ``"max_prob"``.
        edges: ``[K-1]`` ascending float64 edges, in units of ``scale * signal``.
        token_ids: ``[K]`` distinct token ids; ``token_ids[k]`` encodes bin k.
        token_strings: the K token strings, when known (for metadata and error messages).
        temperature: tau_H dividing the logits before the softmax (independent of sampling).
        scale: bins are computed on ``scale * signal`` in ``compute_dtype`` (10 for ``maxprob_round``,
            so that binning equals the public code's ``round(10 p)`` bit for bit).
        compute_dtype: float32 (default) or float64.
        edge_scheme: the name of the edges' scheme (see :data:`EDGE_SCHEMES`).
        context: the prefix whose next-token distribution gives the signal (see
            :data:`SIGNAL_CONTEXTS`): ``interleaved`` (default) or ``plain``.
    """

    signal: str
    edges: torch.Tensor
    token_ids: torch.Tensor
    token_strings: Optional[tuple[str, ...]] = None
    temperature: float = 1.0
    scale: float = 1.0
    compute_dtype: torch.dtype = torch.float32
    edge_scheme: str = "explicit"
    context: str = "interleaved"

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown confidence signal {self.signal!r}; expected one of {', '.join(SIGNALS)}")
        check_signal_context(self.context)
        if not self.temperature > 0:
            raise ValueError(f"confidence.temperature must be > 0, got {self.temperature}")
        if self.compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"confidence compute dtype must be float32 or float64, got {self.compute_dtype}")
        object.__setattr__(self, "edges", torch.as_tensor(self.edges, dtype=torch.float64).reshape(-1))
        object.__setattr__(self, "token_ids", torch.as_tensor(self.token_ids, dtype=torch.long).reshape(-1))
        num_bins = self.token_ids.numel()
        if num_bins < 2:
            raise ValueError(f"need at least 2 confidence tokens, got {num_bins}")
        if torch.unique(self.token_ids).numel() != num_bins:
            raise ValueError(f"confidence token ids must be distinct, got {self.token_ids.tolist()}")
        if bool((self.token_ids < 0).any()):
            raise ValueError(f"confidence token ids must be >= 0, got {self.token_ids.tolist()}")
        if self.token_strings is not None and len(self.token_strings) != num_bins:
            raise ValueError(f"{len(self.token_strings)} token strings for {num_bins} token ids")
        _check_edges(self.edges, num_bins)

    @property
    def num_bins(self) -> int:
        """K, the number of confidence tokens (= bins)."""
        return int(self.token_ids.numel())

    def signal_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The confidence signal of each distribution in ``logits`` ``[..., v]`` -> ``[...]``.

        Confidence ids are masked out and logits divided by tau_H; computed in ``compute_dtype``.

        Raises:
            FloatingPointError: on NaN/inf logits (naming row and position).
        """
        return self.signal_from_log_probs(self.log_probs(logits))

    def log_probs(self, logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
        """``[..., v]`` log-probabilities of the distribution the signal reads: softmax(logits / tau_H)
        with confidence ids at -inf, in ``compute_dtype``. :meth:`signal_from_logits` is
        :meth:`signal_from_log_probs` of this, so a decode step that reuses these log-probs gets
        the training signal bit for bit.

        Raises:
            FloatingPointError: on NaN/inf logits (naming ``what``, row and position)."""
        return signals.log_probs(
            logits, temperature=self.temperature, exclude_ids=self.token_ids.to(logits.device), dtype=self.compute_dtype,
            what=what,
        )

    def signal_from_log_probs(self, lp: torch.Tensor) -> torch.Tensor:
        """The signal ``[...]`` from :meth:`log_probs` output ``[..., v]`` (a decode step reuses them
        for the content token's entropy and log-prob)."""
        return signals.entropy_from_log_probs(lp) if self.signal == "entropy" else lp.amax(-1).exp()

    def bins_from_signal(self, signal: torch.Tensor) -> torch.Tensor:
        """Bin index in [0, K) of each signal value: the number of edges <= scale * signal.

        Raises:
            FloatingPointError: if a signal is NaN or inf (never silently binned).
        """
        if not bool(torch.isfinite(signal).all()):
            bad = (~torch.isfinite(signal)).nonzero()[0].tolist()
            raise FloatingPointError(f"confidence signal is not finite at index {bad}: {signal[tuple(bad)].item()}")
        scaled = signal.to(self.compute_dtype)
        if self.scale != 1.0:
            scaled = scaled * self.scale
        edges = self.edges.to(device=signal.device)
        return torch.bucketize(scaled.to(torch.float64), edges, right=True)

    def bins_from_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bins, signal)`` for each distribution in ``logits`` ``[..., v]``."""
        s = self.signal_from_logits(logits)
        return self.bins_from_signal(s), s

    def token_ids_for_bins(self, bins: torch.Tensor) -> torch.Tensor:
        """Confidence token id of each bin index (bins must lie in [0, K))."""
        if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= self.num_bins):
            raise ValueError(f"bins must lie in [0, {self.num_bins}), got range [{int(bins.min())}, {int(bins.max())}]")
        return self.token_ids.to(bins.device)[bins]

    def bins_for_token_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`token_ids_for_bins`: bin of each confidence token, -1 for other tokens."""
        ids = self.token_ids.to(tokens.device)
        match = tokens.unsqueeze(-1) == ids
        return torch.where(match.any(-1), match.long().argmax(-1), torch.full_like(tokens, -1))

    def is_confidence_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean mask, same shape as ``tokens``: True where the id is a confidence token."""
        return torch.isin(tokens, self.token_ids.to(tokens.device))

    def first_confidence_token(self, tokens: torch.Tensor, where: torch.Tensor) -> Optional[tuple[int, int, int]]:
        """``(row, position, id)`` of the first confidence token of ``tokens`` ``[b, s]`` at a
        position where ``where`` ``[b, s]`` is True (content is expected there), or None."""
        found = self.is_confidence_token(tokens) & where
        if not bool(found.any()):
            return None
        row, pos = found.nonzero()[0].tolist()
        return row, pos, int(tokens[row, pos])

    def mask_confidence_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Copy of ``logits`` ``[..., v]`` with every confidence id at -inf (never sampled as content)."""
        return logits.index_fill(-1, self.token_ids.to(logits.device), float("-inf"))

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a confidence id lies outside a model's embedding of ``vocab_size`` rows."""
        too_big = self.token_ids[self.token_ids >= vocab_size]
        if too_big.numel():
            raise ValueError(
                f"confidence token ids {too_big.tolist()} lie outside the model's vocabulary of {vocab_size} ids"
            )

    def with_edges(self, edges: torch.Tensor, edge_scheme: Optional[str] = None) -> "ConfidenceCodec":
        """A copy with new (e.g. fitted quantile) edges."""
        return ConfidenceCodec(
            signal=self.signal,
            edges=edges,
            token_ids=self.token_ids,
            token_strings=self.token_strings,
            temperature=self.temperature,
            scale=self.scale,
            compute_dtype=self.compute_dtype,
            edge_scheme=edge_scheme or self.edge_scheme,
            context=self.context,
        )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        tokenizer: Any = None,
        vocab_size: Optional[int] = None,
    ) -> "ConfidenceCodec":
        """Build a codec from the YAML ``confidence`` section.

        Keys: ``signal`` (entropy | max_prob, default entropy), ``temperature`` (tau_H, default 1.0),
        ``dtype`` (float32 | float64), ``edges: {scheme, ...}`` (see :data:`EDGE_SCHEMES`; ``explicit``
        takes ``values``; ``uniform`` takes ``max`` (defaults: ln(vocab_size) for entropy, 1 for max_prob);
        ``quantile`` takes fitted ``values`` (the recipe fits them on training signals and saves them)),
        ``context`` (interleaved | plain, see :data:`SIGNAL_CONTEXTS`), and the tokens: ``tokens`` (list of strings, or ``{preset: kit | llama3_reserved | digits}``)
        or ``token_ids`` (list of ints). Strings are resolved through ``tokenizer``.

        Raises:
            ValueError: naming the bad key/value and the accepted ones.
        """
        cfg = _plain(cfg)
        unknown = set(cfg) - {"signal", "temperature", "dtype", "edges", "tokens", "token_ids", "context"}
        if unknown:
            raise ValueError(
                f"unknown confidence config keys {sorted(unknown)}; expected signal, temperature, dtype, edges, tokens, "
                "token_ids, context"
            )
        signal = cfg.get("signal", "entropy")
        if signal not in SIGNALS:
            raise ValueError(f"unknown confidence.signal {signal!r}; expected one of {', '.join(SIGNALS)}")
        dtype_name = cfg.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(f"unknown confidence.dtype {dtype_name!r}; expected one of {', '.join(_DTYPES)}")
        token_ids, token_strings = _tokens_from_config(cfg, tokenizer, vocab_size)
        edges_cfg = cfg.get("edges", {"scheme": "entropy_round" if signal == "entropy" else "maxprob_round"})
        edges, scale, scheme = _edges_from_config(_plain(edges_cfg), signal, len(token_ids), vocab_size)
        return cls(
            signal=signal,
            edges=edges,
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            token_strings=token_strings,
            temperature=float(cfg.get("temperature", 1.0)),
            scale=scale,
            compute_dtype=_DTYPES[dtype_name],
            edge_scheme=scheme,
            context=check_signal_context(cfg.get("context", "interleaved")),
        )


def _plain(cfg: Any) -> Any:
    """OmegaConf DictConfig/ListConfig -> plain Python containers (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return cfg


def _edges_from_config(
    cfg: Mapping[str, Any], signal: str, num_bins: int, vocab_size: Optional[int]
) -> tuple[torch.Tensor, float, str]:
    if not isinstance(cfg, Mapping) or "scheme" not in cfg:
        raise ValueError(f"confidence.edges must be a mapping with a 'scheme' key, got {cfg!r}")
    scheme = cfg["scheme"]
    if scheme not in EDGE_SCHEMES:
        raise ValueError(f"unknown confidence.edges.scheme {scheme!r}; expected one of {', '.join(EDGE_SCHEMES)}")
    if scheme in ("entropy_round", "maxprob_round"):
        wanted = "entropy" if scheme == "entropy_round" else "max_prob"
        if signal != wanted:
            raise ValueError(f"edge preset {scheme!r} is for signal {wanted!r}, but confidence.signal is {signal!r}")
        if num_bins != 11:
            raise ValueError(f"edge preset {scheme!r} has 11 bins, but {num_bins} confidence tokens were given")
        return _half_even_round_edges(11), (1.0 if scheme == "entropy_round" else 10.0), scheme
    if scheme == "uniform":
        default_max = 1.0 if signal == "max_prob" else (math.log(vocab_size) if vocab_size else None)
        max_value = cfg.get("max", default_max)
        if max_value is None:
            raise ValueError("confidence.edges.scheme 'uniform' for entropy needs 'max' (or a known vocab_size)")
        return uniform_edges(num_bins, float(max_value)), 1.0, scheme
    values = cfg.get("values")
    if values is None:
        hint = " (the recipe fits them on training signals before training)" if scheme == "quantile" else ""
        raise ValueError(f"confidence.edges.scheme {scheme!r} needs 'values', a list of {num_bins - 1} edges{hint}")
    return torch.tensor([float(v) for v in values], dtype=torch.float64), 1.0, scheme


def _tokens_from_config(
    cfg: Mapping[str, Any], tokenizer: Any, vocab_size: Optional[int]
) -> tuple[list[int], Optional[tuple[str, ...]]]:
    if "token_ids" in cfg and "tokens" in cfg:
        raise ValueError("give confidence.tokens (strings) or confidence.token_ids, not both")
    if "token_ids" in cfg:
        ids = [int(i) for i in cfg["token_ids"]]
        if vocab_size is not None:
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"confidence.token_ids {bad} lie outside the vocabulary [0, {vocab_size})")
        return ids, None
    tokens = _plain(cfg.get("tokens", {"preset": "kit"}))
    if isinstance(tokens, Mapping):
        _mapping_key(tokens)  # a bad mapping is named before the missing tokenizer
    if tokenizer is None:
        raise ValueError("confidence tokens given as strings need a tokenizer to resolve them to ids")
    strings = token_strings_from_config(tokens, tokenizer)
    ids = resolve_token_ids(strings, tokenizer, vocab_size)
    return ids, tuple(strings)


def token_strings_from_config(tokens: Any, tokenizer: Any = None) -> list[str]:
    """The confidence token strings ``confidence.tokens`` names: a list of strings, ``{preset: NAME}``
    (tokens the vocabulary has) or ``{add: [strings] | NAME}`` (tokens to add to the vocabulary when it
    lacks them: see :func:`tokens_to_add`). ``tokenizer``: what a preset's names depend on
    (``llama3_reserved``).

    Raises:
        ValueError: on unknown keys, an unknown preset, or both ``preset`` and ``add``.
    """
    tokens = _plain(tokens)
    if not isinstance(tokens, Mapping):
        return [str(s) for s in tokens]
    key = _mapping_key(tokens)
    name = tokens[key]
    return list(name) if not isinstance(name, str) else PRESET_TOKENS[name](tokenizer)


def _mapping_key(tokens: Mapping[str, Any]) -> str:
    """``preset`` or ``add``: the one key of a ``confidence.tokens`` mapping, its value checked.

    Raises:
        ValueError: on other keys, both keys, an unknown preset or a bad ``add`` list.
    """
    unknown = sorted(set(tokens) - {"preset", "add"})
    if unknown or len(tokens) != 1:
        raise ValueError(
            f"confidence.tokens {tokens!r}: a mapping takes exactly one of 'preset' (one of {', '.join(TOKEN_PRESETS)}) "
            "or 'add' (a list of new token strings, or a preset name); or give a list of token strings. A command-line "
            "mapping merges into the config's: drop the other key, e.g. confidence.tokens.add=kit ~confidence.tokens.preset"
        )
    key = next(iter(tokens))
    name = tokens[key]
    if key == "add" and not isinstance(name, str):
        if not name or not all(isinstance(s, str) and s for s in name):
            raise ValueError(f"confidence.tokens.add must be a preset name or a list of non-empty strings, got {name!r}")
    elif name not in PRESET_TOKENS:
        raise ValueError(f"unknown confidence.tokens.{key} {name!r}; expected one of {', '.join(TOKEN_PRESETS)}")
    return key


def tokens_to_add(confidence_cfg: Optional[Mapping[str, Any]], tokenizer: Any = None) -> list[str]:
    """The strings ``confidence.tokens: {add: ...}`` asks to add as special tokens (empty otherwise)."""
    tokens = _plain((confidence_cfg or {}).get("tokens", None))
    if isinstance(tokens, Mapping) and "add" in tokens:
        return token_strings_from_config(tokens, tokenizer)
    return []


# -------------------------------------------------------------------- metadata
# The fields that describe the codec: all null in a checkpoint trained without one (mode none
# with no ``confidence`` section).
CODEC_FIELDS = ("signal", "temperature", "scale", "edges", "edge_scheme", "token_ids", "token_strings", "dtype", "context")


@dataclass
class ConfidenceMetadata:
    """What ``confidence.json`` holds: everything a decoder needs to reproduce training's layout.

    A finetune without a codec (mode none, no ``confidence`` section) records its mode with the
    codec fields null: :attr:`has_codec` is False and :meth:`to_codec` raises.
    """

    mode: str
    signal: Optional[str]
    temperature: Optional[float]
    scale: Optional[float]
    edges: Optional[list[float]]
    edge_scheme: Optional[str]
    token_ids: Optional[list[int]]
    token_strings: Optional[list[str]]
    marker: Optional[str]
    # Written since interleaving.positions exists; files without it were all trained sequential.
    positions: str = "sequential"
    dtype: Optional[str] = "float32"
    # Written since confidence.context exists; files without it were all trained interleaved.
    context: Optional[str] = "interleaved"
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def has_codec(self) -> bool:
        """False when the checkpoint was trained without a confidence codec (codec fields null)."""
        return self.token_ids is not None

    def to_codec(self) -> ConfidenceCodec:
        """The codec the checkpoint was trained with.

        Raises:
            ValueError: when the metadata records no codec (a mode-none finetune without a
                ``confidence`` section).
        """
        if not self.has_codec:
            raise ValueError(
                f"this confidence.json (mode {self.mode!r}) records no confidence codec: the checkpoint was "
                "finetuned without a `confidence` section; give one in the config to decode with confidence tokens"
            )
        return ConfidenceCodec(
            signal=self.signal,
            edges=torch.tensor(self.edges, dtype=torch.float64),
            token_ids=torch.tensor(self.token_ids, dtype=torch.long),
            token_strings=tuple(self.token_strings) if self.token_strings else None,
            temperature=self.temperature,
            scale=self.scale,
            compute_dtype=_DTYPES[self.dtype],
            edge_scheme=self.edge_scheme,
            context=self.context,
        )


def metadata_for(
    codec: Optional[ConfidenceCodec], mode: str, marker: Optional[str] = None, *, positions: str = "sequential", **extra: Any
) -> ConfidenceMetadata:
    """The metadata describing ``codec`` used in ``mode`` (with ``marker`` for mode marker) under the
    position rule ``positions``; ``codec=None`` (mode none without a codec) leaves the codec fields null."""
    if codec is None:
        empty = dict.fromkeys(CODEC_FIELDS)
        return ConfidenceMetadata(mode=mode, marker=marker, positions=positions, extra=dict(extra), **empty)
    dtype = next(k for k, v in _DTYPES.items() if v == codec.compute_dtype)
    return ConfidenceMetadata(
        mode=mode,
        signal=codec.signal,
        temperature=float(codec.temperature),
        scale=float(codec.scale),
        # repr round-trips float64 exactly through JSON, so the nextafter-adjusted preset edges survive.
        edges=[float(e) for e in codec.edges.tolist()],
        edge_scheme=codec.edge_scheme,
        token_ids=[int(i) for i in codec.token_ids.tolist()],
        token_strings=list(codec.token_strings) if codec.token_strings else None,
        marker=marker,
        positions=positions,
        dtype=dtype,
        context=codec.context,
        extra=dict(extra),
    )


def write_confidence_json(
    directory: Union[str, Path],
    codec: Optional[ConfidenceCodec],
    mode: str,
    marker: Optional[str] = None,
    *,
    positions: str = "sequential",
    **extra: Any,
) -> Path:
    """Write ``confidence.json`` into ``directory`` (atomically) and return its path (``codec=None``:
    the mode alone, codec fields null)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / METADATA_FILENAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metadata_for(codec, mode, marker, positions=positions, **extra).__dict__, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_confidence_json(path: Union[str, Path]) -> ConfidenceMetadata:
    """Read ``confidence.json`` (``path`` is the file or the checkpoint folder holding it).

    Raises:
        FileNotFoundError: when there is no such file. ValueError: naming the file when it is not
            valid JSON (e.g. truncated), has another format version, or has unknown or missing fields.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no {METADATA_FILENAME} at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it may be truncated: rewrite it or restore it from the run") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object of confidence metadata")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this library reads version {FORMAT_VERSION}")
    known = {f.name for f in fields(ConfidenceMetadata)}
    required = {f.name for f in fields(ConfidenceMetadata) if f.default is MISSING and f.default_factory is MISSING}
    problems = [f"unknown fields {sorted(set(data) - known)}"] if set(data) - known else []
    problems += [f"missing fields {sorted(required - set(data))}"] if required - set(data) else []
    if problems:
        raise ValueError(f"{path} is not confidence metadata of format_version {FORMAT_VERSION}: {'; '.join(problems)}")
    return ConfidenceMetadata(**data)


def find_confidence_json(directory: Union[str, Path]) -> Optional[Path]:
    """``confidence.json`` in ``directory`` or its parent (checkpointers write epoch_N/ subfolders), if any."""
    directory = Path(directory)
    for candidate in (directory / METADATA_FILENAME, directory.parent / METADATA_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def check_config_matches(
    metadata: ConfidenceMetadata,
    *,
    mode: Optional[str] = None,
    codec: Optional[ConfidenceCodec] = None,
    marker: Optional[str] = None,
    positions: Optional[str] = None,
    source: str = "confidence.json",
) -> None:
    """Raise if a user's config contradicts the checkpoint's metadata.

    Only the fields the user actually set are compared (pass None to skip one).

    Raises:
        ValueError: ``config interleaving.mode is 'full' but confidence.json says 'answer'``.
    """
    pairs: list[tuple[str, Any, Any]] = []
    if mode is not None:
        pairs.append(("interleaving.mode", mode, metadata.mode))
    if marker is not None:
        pairs.append(("interleaving.marker", marker, metadata.marker))
    if positions is not None:
        pairs.append(("interleaving.positions", positions, metadata.positions))
    if codec is not None:
        if not metadata.has_codec:
            raise ValueError(
                f"config gives a confidence codec but {source} records none (mode {metadata.mode!r} finetuned "
                "without a `confidence` section); remove the config's confidence section or use another checkpoint"
            )
        ref = metadata.to_codec()
        pairs += [
            ("confidence.signal", codec.signal, ref.signal),
            ("confidence.temperature", codec.temperature, ref.temperature),
            ("confidence.token_ids", codec.token_ids.tolist(), ref.token_ids.tolist()),
            ("confidence.edges", codec.edges.tolist(), ref.edges.tolist()),
            ("confidence.scale", codec.scale, ref.scale),
            ("confidence.context", codec.context, ref.context),
        ]
    for name, ours, theirs in pairs:
        if ours != theirs:
            raise ValueError(f"config {name} is {ours!r} but {source} says {theirs!r}; make them agree")


__all__ = [
    "CODEC_FIELDS",
    "EDGE_SCHEMES",
    "LLAMA3_RESERVED_IDS",
    "LLAMA3_RESERVED_NAMINGS",
    "METADATA_FILENAME",
    "SIGNALS",
    "SIGNAL_CONTEXTS",
    "TOKEN_PRESETS",
    "ConfidenceCodec",
    "ConfidenceMetadata",
    "check_config_matches",
    "check_signal_context",
    "digit_confidence_tokens",
    "encode_single_token",
    "encode_text",
    "find_confidence_json",
    "fit_quantile_edges",
    "kit_confidence_tokens",
    "llama3_reserved_confidence_tokens",
    "llama3_reserved_names",
    "metadata_for",
    "read_confidence_json",
    "resolve_token_ids",
    "smollm2_unused_confidence_tokens",
    "token_strings_from_config",
    "tokens_to_add",
    "uniform_edges",
    "write_confidence_json",
]
