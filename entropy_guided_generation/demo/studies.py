"""The studies: :class:`Demo` finetunes, evaluates and analyses each mode, plus learning-curve points
and one-setting comparisons, and gathers their rows.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import find_confidence_json, read_confidence_json, resolve_token_ids, smollm2_unused_confidence_tokens
from entropy_guided_generation.demo.configs import confidence_tokens, gen_budget, load_config, train_config
from entropy_guided_generation.demo.data import marker_of, on_bigbench, read_jsonl
from entropy_guided_generation.demo.runs import FinishedRun, finetune, fingerprint_of, run_fingerprint
from entropy_guided_generation.demo.settings import ANALYSIS_VERSION, BaseModel, CONFIDENCE_ONLY, DataFiles, DemoSettings, KIT_MODEL_TYPE, MODES, STEP0_ROWS, kit_base_folder
from entropy_guided_generation.demo_analysis import analyze_run
from entropy_guided_generation.demo_analysis.heldout import GSM8K
from entropy_guided_generation.demo_analysis.step0 import RowsVariant, step0_study
from entropy_guided_generation.kit.train_base import mixed_format_base
from entropy_guided_generation.modeling import vocab_size_of
from entropy_guided_generation.modes import ANSWER, mode_named
from entropy_guided_generation.training import read_disk_log
from entropy_guided_generation.vocabulary import grow_model, rows_needed


class Demo:
    """The demo's runs, shared by the default table and the studies (a run with the same settings
    is trained once, whichever study asks for it first)."""

    def __init__(self, out: Path, settings: DemoSettings, base: BaseModel, files: DataFiles, custom_base: bool):
        self.out, self.settings, self.files, self.custom_base = out, settings, files, custom_base
        self.plain_base = base
        # (base, positions) -> checkpoint; the base run_demo resolved serves its own name.
        self._bases: dict[tuple[str, str], BaseModel] = {("smollm2" if settings.base == "smollm2" else "plain", ""): base}
        self._runs: dict[tuple[str, DemoSettings], FinishedRun] = {}

    def base_for(self, settings: DemoSettings) -> BaseModel:
        """The base checkpoint of ``settings`` (``--checkpoint`` when given, else the kit base it names)."""
        if self.custom_base:
            return self.plain_base
        # Each mixed-format base was pretrained with its own position rule.
        key = (settings.base, settings.positions if settings.base == "mixed" else "")
        if key not in self._bases:
            if settings.base == "mixed":
                folder = mixed_format_base(settings.positions, log=lambda line: print(f"[demo] {line}", flush=True))
                self._bases[key] = BaseModel(folder, folder, KIT_MODEL_TYPE)
            else:
                folder, model_type = kit_base_folder(settings.base)
                self._bases[key] = BaseModel(folder, folder, model_type)
        return self._bases[key]

    def run(self, mode: str, settings: DemoSettings) -> FinishedRun:
        """Finetune ``mode`` under ``settings`` (or reuse it)."""
        key = (mode, settings)
        if key not in self._runs:
            run_dir = self.out / "runs" / settings.label() / mode
            base = self.base_for(settings)
            cfg = train_config(mode, base, self.files, settings, run_dir)
            fingerprint = run_fingerprint(cfg, run_dir, settings, self.files, mode)
            checkpoint, seconds, cpu = finetune(mode, cfg, run_dir, fingerprint)
            self._runs[key] = FinishedRun(mode, settings, checkpoint, run_dir, fingerprint, seconds, cpu, loss_history(run_dir / "logs"))
        return self._runs[key]

    def analysis(self, run: FinishedRun, *, full: bool) -> dict:
        """:func:`~entropy_guided_generation.demo_analysis.analyze_run` of ``run`` (or its saved result;
        a saved full analysis also serves a short one)."""
        folder = self.out / "analysis" / run.settings.label()
        reference = self.reference_codec(run.settings) if mode_named(run.mode).is_plain and full else None
        fingerprint = fingerprint_of(run.fingerprint, run.settings.eval_limit, ANALYSIS_VERSION, reference is not None)
        for kind in ("full",) if full else ("full", "short"):
            path = folder / f"{run.mode}.{kind}.json"
            if path.is_file():
                saved = json.loads(path.read_text())
                serves_short = kind == "full" and not full and saved.get("run") == run.fingerprint
                if saved.get("fingerprint") == fingerprint or (serves_short and saved.get("eval_limit") == run.settings.eval_limit):
                    print(f"[demo] {run.mode}: reusing the analysis in {path}")
                    return saved["analysis"]
        print(f"[demo] {run.mode}: analysing {run.checkpoint} ({'full' if full else 'accuracy and loss'})", flush=True)
        started = time.perf_counter()
        result = analyze_run(
            run.checkpoint, self.base_for(run.settings).checkpoint_dir, self.base_for(run.settings).tokenizer_dir, run.mode,
            heldout_rows(self.files, run.mode, run.settings), marker=marker_of(run.mode, run.settings),
            bigbench=on_bigbench(run.mode, run.settings), max_gen_toks=gen_budget(run.mode, run.settings),
            max_passes=training_max_passes(run.mode, run.settings), full=full, reference_codec=reference,
            init_embeddings=None if run.settings.init_embeddings == "none" else run.settings.init_embeddings,
        )
        result["seconds"] = round(time.perf_counter() - started, 1)
        path = folder / f"{run.mode}.{'full' if full else 'short'}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": fingerprint, "run": run.fingerprint, "eval_limit": run.settings.eval_limit, "analysis": result}
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        return result

    def reference_codec(self, settings: DemoSettings) -> Any:
        """Mode answer's codec under ``settings``, mode none's stand-in for would-be bins (None when
        mode answer is not part of this demo)."""
        if (ANSWER.name, settings) not in self._runs:
            return None
        found = find_confidence_json(self._runs[(ANSWER.name, settings)].checkpoint)
        return read_confidence_json(found).to_codec() if found else None

    def step0(self, settings: DemoSettings, modes: Sequence[str]) -> Optional[dict]:
        """The step-0 study (:func:`~entropy_guided_generation.demo_analysis.step0.step0_study`) of the base
        of ``settings`` on the first :data:`STEP0_ROWS` held-out problems, for the interleaved ``modes``
        on GSM8K data, with the codec the first of their finetunes trained with (or its saved result).

        Row choices: the finetunes' own tokens (kit tokens added to a real model: appended rows, the mean
        of the trained rows, so raw equals mean there), and, when the base's tokenizer has SmolLM2's
        unused special tokens, those with their pretrained rows (``raw``) and set to the mean (``mean``).
        None when no interleaved mode runs on GSM8K data.
        """
        modes = [m for m in MODES if m in modes and not mode_named(m).is_plain and not on_bigbench(m, settings)]
        if not modes:
            return None
        run = self.run(modes[0], settings)
        codec = read_confidence_json(find_confidence_json(run.checkpoint)).to_codec()
        base = self.base_for(settings)
        rows = heldout_rows(self.files, modes[0], settings)[:STEP0_ROWS]
        path = self.out / "analysis" / settings.label() / "step0.json"
        fingerprint = fingerprint_of(run.fingerprint, modes, len(rows), ANALYSIS_VERSION)
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
            print(f"[demo] step 0: reusing the study in {path}")
            return json.loads(path.read_text())["study"]
        print(f"[demo] step 0: content loss of the base through each layout ({len(rows)} held-out problems)", flush=True)
        started = time.perf_counter()
        tokenizer = kit.load_folder_tokenizer(base.tokenizer_dir)
        init = "mean" if settings.init_embeddings == "mean" or confidence_tokens(base) == {"add": "kit"} else "raw"
        variants = [RowsVariant("finetune's", codec, init)]
        try:
            unused = resolve_token_ids(smollm2_unused_confidence_tokens(), tokenizer)
        except ValueError:
            unused = None
        if unused is not None:
            own = dataclasses.replace(codec, token_ids=torch.tensor(unused))
            variants += [RowsVariant("smollm2_unused", own, "raw"), RowsVariant("smollm2_unused", own, "mean")]
        with torch.inference_mode():
            model = kit.load_torchtune_model(base.checkpoint_dir)
            model = grow_model(model, rows_needed(codec.token_ids.tolist(), vocab_size_of(model))).eval()
            study = step0_study(model, tokenizer, rows, GSM8K, variants=variants,
                                modes=[(m, marker_of(m, settings)) for m in modes])
        study["seconds"] = round(time.perf_counter() - started, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint, "study": study}, indent=1) + "\n")
        return study


def training_max_passes(mode: str, settings: DemoSettings) -> Optional[int]:
    """The fixed-point pass cap the mode's tiny config trains with (None: until no bin changes)."""
    if mode_named(mode).is_plain:
        return None
    name = "marker_bigbench_single_device.yaml" if on_bigbench(mode, settings) else f"{mode}_single_device.yaml"
    return load_config(name).interleaving.get("max_passes", None)


def heldout_rows(files: DataFiles, mode: str, settings: DemoSettings) -> list[dict]:
    """The rows lm-eval scores (its ``limit`` takes the first ones)."""
    path = files.bbm_test if on_bigbench(mode, settings) else files.gsm8k_test
    return read_jsonl(path)[: settings.eval_limit]


def passes_per_micro_batch(log_dir: Path) -> Optional[float]:
    """Mean no-grad fixed-point forwards per micro-batch over a finetune's logged steps (``conf/passes_mean``;
    None in mode none, which logs none)."""
    logged = read_disk_log(log_dir)
    found = [m["conf/passes_mean"] for m in logged.values() if "conf/passes_mean" in m]
    return sum(found) / len(found) if found else None


def study_fields(run: FinishedRun, found: dict) -> dict:
    """What the real-model study adds to every row: passes per micro-batch of the finetune, and the
    share of training bins one plain-context pass gets wrong on the base (step 0) and the finetune."""
    return {
        "passes_per_micro_batch": passes_per_micro_batch(run.run_dir / "logs"),
        "single_pass_mismatch_step0": (found.get("base_single_pass_mismatch") or {}).get("share"),
        "single_pass_mismatch": (found.get("single_pass_mismatch") or {}).get("share"),
    }


def loss_history(log_dir: Path) -> list[float]:
    """Training loss per optimizer step, from the recipe's DiskLogger files."""
    logged = read_disk_log(log_dir)
    return [logged[step]["loss"] for step in sorted(logged) if "loss" in logged[step]]


def final_loss(loss: Sequence[float]) -> Optional[float]:
    """Mean training loss over the last tenth of the steps (at least one)."""
    if not loss:
        return None
    tail = loss[-max(1, len(loss) // 10) :]
    return sum(tail) / len(tail)


def sweep_points(demo: Demo, modes: Sequence[str], steps_list: Sequence[int]) -> dict[str, list[dict]]:
    """Per mode, one finetune per budget in ``steps_list`` (other settings: the demo's), each
    scored on the held-out set: the learning curve."""
    points: dict[str, list[dict]] = {mode: [] for mode in modes}
    for steps in steps_list:
        settings = dataclasses.replace(demo.settings, steps=steps)
        for mode in modes:
            run = demo.run(mode, settings)
            found = demo.analysis(run, full=False)
            points[mode].append({
                "steps": steps, "accuracy": found["real"]["accuracy"], "ece": found["real"]["ece"],
                "auroc": found["real"]["auroc"], "content_loss": found["content_loss"],
                "final_train_loss": final_loss(run.loss), "train_seconds": run.train_seconds,
                "train_cpu_seconds": run.train_cpu_seconds,
            })
            print(f"[demo] sweep {mode} @ {steps} steps: accuracy {found['real']['accuracy']:.3f}, "
                  f"held-out content loss {found['content_loss']:.3f}", flush=True)
    return points


def compare_rows(demo: Demo, modes: Sequence[str], changes: Sequence[dict]) -> list[dict]:
    """One row per (change, mode): the demo's settings with one field changed, for every mode alike
    (mode none reuses its default run when the change only concerns confidence tokens)."""
    rows = []
    for change in [{}] + list(changes):
        settings = dataclasses.replace(demo.settings, **change)
        label = ", ".join(f"{k}={v}" for k, v in change.items()) or "default"
        for mode in modes:
            unaffected = mode_named(mode).is_plain and change and set(change) <= set(CONFIDENCE_ONLY) and not (
                "positions" in change and settings.base == "mixed"
            )
            run = demo.run(mode, demo.settings if unaffected else settings)
            found = demo.analysis(run, full=True)
            rows.append(summary_row(label, mode, run, found, reused_default=bool(unaffected)))
    return rows


def summary_row(label: str, mode: str, run: FinishedRun, found: dict, reused_default: bool = False) -> dict:
    """The numbers of one analysed run that the comparison table shows."""
    ablations = found.get("ablations") or {}
    trace = found.get("trace") or {}
    return {
        "change": label, "mode": mode, "accuracy": found["real"]["accuracy"], "ece": found["real"]["ece"],
        "auroc": found["real"]["auroc"], "trace_ece": trace.get("ece"), "trace_auroc": trace.get("auroc"),
        "trace_min_auroc": (found.get("trace_min") or {}).get("auroc"),
        "content_loss": found["content_loss"], "base_content_loss": found.get("base_content_loss"),
        "final_train_loss": final_loss(run.loss),
        **{f"{name}_change": ablation["accuracy_change"] for name, ablation in ablations.items()},
        "agreement": (found.get("agreement") or {}).get("equal_fraction"),
        **study_fields(run, found),
        "train_seconds": run.train_seconds, "train_cpu_seconds": run.train_cpu_seconds, "reused_default_run": reused_default,
    }


__all__ = ["Demo", "compare_rows", "final_loss", "heldout_rows", "loss_history", "passes_per_micro_batch", "study_fields", "summary_row", "sweep_points", "training_max_passes"]
