"""Pictures and tables of the demo's results (the text tables the command line prints).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation import kit, visualize
from entropy_guided_generation.confidence import ConfidenceCodec, find_confidence_json, read_confidence_json
from entropy_guided_generation.demo.configs import gen_budget
from entropy_guided_generation.demo.data import marker_of
from entropy_guided_generation.demo.settings import BaseModel, CODECS, DemoSettings
from entropy_guided_generation.generation import decode
from entropy_guided_generation.modes import Interleaving, mode_named


def draw_confidence_example(mode: str, checkpoint: Path, base: BaseModel, question: str, out: Path, settings: DemoSettings) -> dict:
    """Decode one held-out question greedily in ``mode`` and write it coloured by confidence bin."""
    tokenizer = kit.load_folder_tokenizer(checkpoint if (checkpoint / "tokenizer.json").is_file() else base.tokenizer_dir)
    model = kit.load_torchtune_model(checkpoint).eval()
    found = find_confidence_json(checkpoint)
    metadata = read_confidence_json(found) if found else None
    # A mode-none finetune records its mode without a codec: show entropy_round bins then (only the edges
    # matter: mode none feeds no confidence token, so the ids are placeholders).
    codec = metadata.to_codec() if metadata is not None and metadata.has_codec else ConfidenceCodec.from_config(
        {**CODECS["entropy_round"], "token_ids": list(range(11))}
    )
    interleaving = Interleaving.for_tokenizer(mode, tokenizer, marker_of(mode, settings), getattr(metadata, "positions", "sequential"))
    prompt = torch.tensor([tokenizer.encode(question, add_bos=False, add_eos=False)])
    with torch.inference_mode():
        result = decode(model, prompt, interleaving=interleaving, max_generated_tokens=gen_budget(mode, settings),
                        pad_id=tokenizer.pad_id, temperature=0.0, stop_tokens=list(tokenizer.stop_tokens),
                        codec=None if mode_named(mode).is_plain else codec, marker=interleaving.marker_ids)
    n = int(result.generated_lengths[0])
    ids = result.content[0, :n].tolist()
    bins = result.bins[0, :n].tolist()
    # In mode none no confidence token is fed; show the bin an entropy codec would give, for comparison.
    if mode_named(mode).is_plain and codec.signal == "entropy":
        bins = codec.bins_from_signal(result.entropies[0, :n]).tolist()
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    title = f"mode {mode}: {question.strip()}"
    (out / f"confidence_{mode}.html").write_text(visualize.confidence_html(pieces, bins, codec.num_bins, title))
    visualize.confidence_png(pieces, bins, codec.num_bins, out / f"confidence_{mode}.png", title)
    return {"question": question, "answer": "".join(pieces), "bins": bins}


def fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(columns: Sequence[tuple[str, str, int, str]], rows: Sequence[dict]) -> str:
    """Fixed-width text table: ``(header, key, width, format)`` per column; strings left-aligned."""
    def cell(row: dict, key: str, width: int, spec: str) -> str:
        value = row.get(key)
        if isinstance(value, str):
            return f"{value:<{width}}"
        return f"{fmt(value, spec):>{width}}"

    header = " ".join(f"{h:<{w}}" if s == "s" else f"{h:>{w}}" for h, _, w, s in columns)
    lines = [header, "-" * len(header)]
    lines += [" ".join(cell(r, k, w, s) for _, k, w, s in columns) for r in rows]
    return "\n".join(lines)


def results_table(rows: Sequence[dict]) -> str:
    """The headline: lm-eval's accuracy and the eval recipe's calibration, per mode."""
    return table([
        ("mode", "mode", 7, "s"), ("data", "data", 17, "s"), ("accuracy", "accuracy", 9, ".3f"),
        ("x none", "relative_accuracy", 7, ".2f"), ("ECE", "ece", 6, ".3f"), ("AUROC", "auroc", 6, ".3f"),
        ("mean conf", "mean_confidence", 9, ".3f"), ("decode tok/s", "decode_tokens_per_s", 12, ".1f"),
        ("train CPU s", "train_cpu_seconds", 11, ".0f"), ("n", "num_samples", 4, "d"),
    ], rows)


def analysis_table(rows: Sequence[dict]) -> str:
    """Why: content loss before/after, trace calibration, ablations, agreement."""
    return table([
        ("mode", "mode", 7, "s"), ("loss@0", "base_content_loss", 7, ".3f"), ("loss", "content_loss", 6, ".3f"),
        ("trace ECE", "trace_ece", 9, ".3f"), ("trace AUROC", "trace_auroc", 11, ".3f"),
        ("min AUROC", "trace_min_auroc", 9, ".3f"), ("d fixed-conf", "fixed_confident_change", 12, "+.3f"),
        ("d fixed-unconf", "fixed_unconfident_change", 14, "+.3f"), ("d shuffled", "shuffled_change", 10, "+.3f"), ("agree", "agreement", 6, ".3f"),
    ], rows)


def digits_table(rows: Sequence[dict]) -> str:
    """Bins and entropies at right vs wrong result digits."""
    return table([
        ("mode", "mode", 7, "s"), ("right", "n_right", 6, "d"), ("wrong", "n_wrong", 6, "d"),
        ("H right", "entropy_right", 8, ".3f"), ("H wrong", "entropy_wrong", 8, ".3f"),
        ("bin right", "bin_right", 9, ".2f"), ("bin wrong", "bin_wrong", 9, ".2f"),
        ("prev right", "prev_right", 10, ".2f"), ("prev wrong", "prev_wrong", 10, ".2f"),
        ("AUROC H", "auroc_entropy", 8, ".3f"), ("AUROC bin", "auroc_bin", 9, ".3f"),
    ], rows)


def compare_table(rows: Sequence[dict]) -> str:
    return table([
        ("change", "change", 26, "s"), ("mode", "mode", 7, "s"), ("accuracy", "accuracy", 9, ".3f"),
        ("ECE", "ece", 6, ".3f"), ("trace AUROC", "trace_auroc", 11, ".3f"), ("loss@0", "base_content_loss", 7, ".3f"),
        ("loss", "content_loss", 6, ".3f"), ("d shuffled", "shuffled_change", 10, "+.3f"),
        ("d fixed-unconf", "fixed_unconfident_change", 14, "+.3f"), ("train CPU s", "train_cpu_seconds", 11, ".0f"),
    ], rows)


def fixed_point_table(rows: Sequence[dict]) -> str:
    """Per row (mode and setting): content loss at step 0 and at the end, passes per micro-batch,
    single-pass mismatch at step 0 and at the end, train/decode agreement."""
    labelled = [{**r, "change": r.get("change", "default")} for r in rows if not mode_named(r["mode"]).is_plain]
    return table([
        ("change", "change", 26, "s"), ("mode", "mode", 7, "s"), ("loss@0", "base_content_loss", 7, ".3f"),
        ("loss", "content_loss", 6, ".3f"), ("passes", "passes_per_micro_batch", 7, ".1f"),
        ("1-pass wrong@0", "single_pass_mismatch_step0", 14, ".3f"), ("1-pass wrong", "single_pass_mismatch", 12, ".3f"),
        ("agree", "agreement", 6, ".3f"),
    ], labelled)


def step0_table(rows: Sequence[dict]) -> str:
    """The step-0 study: content loss through each layout, and its excess over plain."""
    return table([
        ("mode", "mode", 7, "s"), ("tokens", "tokens", 15, "s"), ("rows", "init", 5, "s"), ("positions", "positions", 10, "s"),
        ("loss", "content_loss", 7, ".3f"), ("excess", "excess", 7, "+.3f"),
    ], rows)


def sweep_table(points: dict[str, list[dict]]) -> str:
    steps = sorted({p["steps"] for rows in points.values() for p in rows})
    rows = []
    for mode, found in points.items():
        by_steps = {p["steps"]: p for p in found}
        row: dict[str, Any] = {"mode": mode}
        for s in steps:
            if s in by_steps:
                row[f"a{s}"] = f"{by_steps[s]['accuracy']:.3f} / {by_steps[s]['content_loss']:.3f}"
        rows.append(row)
    return table([("mode", "mode", 7, "s")] + [(f"{s} steps", f"a{s}", 15, "s") for s in steps], rows)


__all__ = ["analysis_table", "compare_table", "digits_table", "draw_confidence_example", "fixed_point_table", "fmt", "results_table", "step0_table", "sweep_table", "table"]
