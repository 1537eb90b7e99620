"""Why Confidence-as-Context costs (or does not cost) accuracy at the demo's scale: measurements on a
finetuned checkpoint's held-out decodes.

- :mod:`.heldout`: the eval task's problems decoded and scored outside lm-eval (so they can be
  decoded again with the confidence tokens overridden), and the held-out content loss;
- :mod:`.trace`: calibration read from the interleaved bins, and which tokens hold result digits;
- :mod:`.agreement`: the bins training would compute for the decoded sequences vs the decoded ones,
  and the share of training bins one plain-context pass gets wrong (upstream's approximation);
- :mod:`.step0`: how foreign the interleaved layout is to a base before finetuning;
- :mod:`.report`: all of it for one checkpoint (:func:`analyze_checkpoint`), JSON-ready.

:func:`analyze_run` loads a finetune's checkpoint (and its base, for the content loss a mode starts
from) and runs :func:`~.report.analyze_checkpoint`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import find_confidence_json, read_confidence_json
from entropy_guided_generation.demo_analysis.agreement import single_pass_mismatch
from entropy_guided_generation.demo_analysis.heldout import GSM8K, bigbench_mistake_task, heldout_content_loss
from entropy_guided_generation.demo_analysis.report import ABLATIONS, HeldOut, analyze_checkpoint
from entropy_guided_generation.modes import Interleaving, mode_named
from entropy_guided_generation.modeling import vocab_size_of
from entropy_guided_generation.training.embeddings import init_confidence_embeddings
from entropy_guided_generation.vocabulary import grow_model


def analyze_run(
    checkpoint: Path,
    base_checkpoint: Path,
    tokenizer_dir: Path,
    mode: str,
    rows: Sequence[dict],
    *,
    marker: Optional[str],
    bigbench: bool,
    max_gen_toks: int,
    max_passes: Optional[int],
    full: bool = True,
    reference_codec: Any = None,
    init_embeddings: Optional[str] = None,
    batch_size: int = 32,
) -> dict:
    """Analyse the finetuned ``checkpoint`` of ``mode`` on held-out ``rows`` (see :func:`analyze_checkpoint`);
    with ``full``, also the held-out content loss of ``base_checkpoint`` in the same layout
    (``base_content_loss``: where the finetune started) and, in interleaved modes, the share of the
    rows' training bins that one plain-context pass gets wrong on the finetune (``single_pass_mismatch``)
    and on the base (``base_single_pass_mismatch``).

    Mode, marker, position rule and codec come from the checkpoint's ``confidence.json`` (mode none:
    no codec). ``init_embeddings``: the finetune's ``interleaving.init_confidence_embeddings``, applied
    to the base before its content loss is measured (the finetune started from those weights).
    """
    tokenizer = kit.load_folder_tokenizer(tokenizer_dir)
    codec, positions = None, "sequential"
    if not mode_named(mode).is_plain:
        found = find_confidence_json(checkpoint)
        if found is None:
            raise FileNotFoundError(f"mode {mode!r} checkpoint {checkpoint} has no confidence.json")
        metadata = read_confidence_json(found)
        codec, positions = metadata.to_codec(), getattr(metadata, "positions", "sequential")
    interleaving = Interleaving.for_tokenizer(mode, tokenizer, marker, positions)
    task = bigbench_mistake_task(marker) if bigbench else GSM8K
    targets = [None if bigbench else str(kit.final_answer(row["answer"])) for row in rows]
    heldout = HeldOut(rows, task, max_gen_toks, targets, batch_size)
    with torch.inference_mode():
        model = kit.load_torchtune_model(checkpoint).eval()
        result = analyze_checkpoint(model, tokenizer, interleaving, codec, heldout, max_passes=max_passes, full=full,
                                    reference_codec=reference_codec)
        if full:
            base = base_as_finetuned(base_checkpoint, vocab_size_of(model), codec, init_embeddings)
            result["base_content_loss"] = heldout_content_loss(
                base, tokenizer, rows, task, interleaving=interleaving, codec=codec, max_passes=max_passes, batch_size=batch_size
            )
            if codec is not None:
                for name, scored in (("single_pass_mismatch", model), ("base_single_pass_mismatch", base)):
                    result[name] = single_pass_mismatch(
                        scored, tokenizer, rows, task, interleaving=interleaving, codec=codec, batch_size=batch_size
                    ).to_dict()
    result["positions"] = positions
    result["codec"] = None if codec is None else {"signal": codec.signal, "scheme": codec.edge_scheme, "edges": codec.edges.tolist()}
    return result


def base_as_finetuned(base_checkpoint: Path, vocab_size: int, codec: Any, init_embeddings: Optional[str]) -> torch.nn.Module:
    """The base as the finetune started from it, in eval mode: grown to ``vocab_size`` rows (a finetune
    that added confidence tokens starts from the base grown by mean rows) and, with ``init_embeddings``
    and a codec, its confidence rows initialized that way."""
    base = grow_model(kit.load_torchtune_model(base_checkpoint), vocab_size).eval()
    if init_embeddings is not None and codec is not None:
        state = base.state_dict()
        init_confidence_embeddings(state, codec.token_ids, init_embeddings)
        base.load_state_dict(state)
    return base


__all__ = ["ABLATIONS", "base_as_finetuned", "HeldOut", "analyze_checkpoint", "analyze_run"]
