"""The demo's command path with tiny budgets: every mode trains through the recipe, is evaluated
through the eval recipe and analysed (ablations, trace calibration, agreement), and leaves finite
numbers and the pictures behind; a re-run reuses all of it."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from entropy_guided_generation.demo import MODES
from entropy_guided_generation.training.metrics import read_disk_log

TINY = ["--steps", "2", "--batch-size", "4", "--eval-limit", "4", "--max-gen-toks", "24", "--train-rows", "48"]


def _run_demo(out, env):
    return subprocess.run(
        [sys.executable, "-m", "entropy_guided_generation.demo", "--out", str(out), *TINY],
        env=env, capture_output=True, text=True, timeout=600,
    )


def test_demo_writes_finite_results_and_pictures_for_every_mode(tmp_path, subprocess_env):
    out = tmp_path / "demo"
    proc = _run_demo(out, subprocess_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert [row["mode"] for row in results["rows"]] == list(MODES)
    for row in results["rows"]:
        for key in ("accuracy", "ece", "mean_confidence", "decode_tokens_per_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["mode"], key, row[key])
        # AUROC is undefined (None) when every held-out answer is right or every one is wrong.
        assert row["auroc"] is None or math.isfinite(row["auroc"])
        assert row["num_samples"] == 4
        assert len(results["loss_curves"][row["mode"]]) == 2
        assert all(math.isfinite(v) for v in results["loss_curves"][row["mode"]])
        analysis = results["analysis"][row["mode"]]
        assert math.isfinite(analysis["content_loss"]) and analysis["real"]["n"] == 4
        if row["mode"] != "none":
            assert set(analysis["ablations"]) == {"fixed_confident", "fixed_unconfident", "shuffled"}
            assert 0.0 <= analysis["agreement"]["equal_fraction"] <= 1.0
            assert math.isfinite(analysis["base_content_loss"])
    for mode in MODES:
        for name in (f"confidence_{mode}.png", f"confidence_{mode}.html", f"reliability_{mode}.png"):
            assert (out / name).stat().st_size > 0, name
    for name in ("loss_curves.png", "ablation.png", "digit_bins.png"):
        assert (out / name).stat().st_size > 0, name
    # Exact by default: every logged step of every interleaving finetune ended with its bins converged.
    conf_logs = [read_disk_log(d) for d in sorted({f.parent for f in out.rglob("log_*.txt")})]
    conf_logs = [log for log in conf_logs if any("conf/unconverged_fraction" in m for m in log.values())]
    assert len(conf_logs) == len(MODES) - 1
    for log in conf_logs:
        steps = [m for m in log.values() if "loss" in m]
        assert steps and [m.get("conf/unconverged_fraction") for m in steps] == [0.0] * len(steps)
    table_header = proc.stdout.splitlines()
    assert any("accuracy" in line and "ECE" in line and "AUROC" in line for line in table_header)

    again = _run_demo(out, subprocess_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the finetune") == len(MODES)
    assert again.stdout.count("reusing the evaluation") == len(MODES)
    assert again.stdout.count("reusing the analysis") == len(MODES)


def test_each_position_rule_starts_from_its_own_mixed_format_base(tmp_path):
    """A ``--compare positions=shared`` run starts from the base pretrained with shared positions,
    not from whichever mixed-format base an earlier run of the same demo loaded."""
    from entropy_guided_generation.demo import BaseModel, Demo, DemoSettings

    plain = BaseModel(tmp_path / "plain", tmp_path / "plain", "QWEN2")
    demo = Demo(tmp_path, DemoSettings(), plain, files=None, custom_base=False)
    sequential = demo.base_for(DemoSettings())
    shared = demo.base_for(DemoSettings(positions="shared"))
    assert sequential.checkpoint_dir.name == "mixed_base_sequential"
    assert shared.checkpoint_dir.name == "mixed_base_shared"
    assert demo.base_for(DemoSettings(base="plain", positions="shared")) is plain
