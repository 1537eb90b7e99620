"""The demo's data: GSM8K-format and BIG-Bench Mistake problems written as the recipes' JSONL files,
and which task and marker a mode trains on.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from entropy_guided_generation import kit
from entropy_guided_generation.demo.settings import BBM_MARKER, BBM_TASK_FILE, DataFiles, DemoSettings, GSM8K_MARKER
from entropy_guided_generation.modes import mode_named


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return path


def prepare_data(out: Path, settings: DemoSettings, gsm8k_dir: Optional[Path], bbm_dir: Optional[Path], bbm_tasks: Sequence[str]) -> DataFiles:
    """Write (or point at) the training and held-out files.

    GSM8K: ``gsm8k_dir/train.jsonl`` and ``test.jsonl`` as given, else the kit's train/test splits.
    BIG-Bench Mistake (only when mode marker runs on it): the given task files (or the kit's
    arithmetic traces) split by a seeded shuffle into 80% train / 20% held-out; training keeps only
    traces without a mistake (``mistake_index`` null), so the finetune learns correct reasoning; the
    held-out rows keep all traces and are scored against ``target``.
    """
    data = out / "data"
    if gsm8k_dir is not None:
        gsm8k_train = require_file(gsm8k_dir / "train.jsonl", "GSM8K train file")
        gsm8k_test = require_file(gsm8k_dir / "test.jsonl", "GSM8K test file")
    else:
        gsm8k_train = kit.write_gsm8k_jsonl(data / "gsm8k" / "train.jsonl", settings.train_rows, seed=settings.seed, split="train")
        gsm8k_test = kit.write_gsm8k_jsonl(data / "gsm8k" / "test.jsonl", 200, seed=settings.seed + 1, split="test")
    if settings.marker_task != "bigbench_mistake":
        return DataFiles(gsm8k_train, gsm8k_test)

    if bbm_dir is not None:
        rows = [row for task in bbm_tasks for row in read_jsonl(require_file(bbm_dir / f"{task}.jsonl", "BIG-Bench Mistake task file"))]
    else:
        rows = kit.bigbench_mistake_examples(settings.train_rows + 200, seed=settings.seed)
    order = list(range(len(rows)))
    random.Random(settings.seed).shuffle(order)
    cut = int(0.8 * len(rows))
    train_rows = [rows[i] for i in order[:cut] if rows[i].get("mistake_index") is None]
    test_rows = [rows[i] for i in order[cut:]]
    if not train_rows or not test_rows:
        raise ValueError(f"BIG-Bench Mistake data gives {len(train_rows)} correct training traces and {len(test_rows)} held-out rows; need both > 0")
    # One training file under a task name the BIG-Bench Mistake adapter accepts, whatever tasks
    # the rows came from.
    write_jsonl(data / "bigbench_mistake" / "train" / f"{BBM_TASK_FILE}.jsonl", train_rows)
    bbm_test = write_jsonl(data / "bigbench_mistake" / "test.jsonl", test_rows)
    return DataFiles(gsm8k_train, gsm8k_test, data / "bigbench_mistake" / "train", (BBM_TASK_FILE,), bbm_test)


def on_bigbench(mode: str, settings: DemoSettings) -> bool:
    return mode_named(mode).needs_marker and settings.marker_task == "bigbench_mistake"


def marker_of(mode: str, settings: DemoSettings) -> Optional[str]:
    if not mode_named(mode).needs_marker:
        return None
    return BBM_MARKER if on_bigbench(mode, settings) else GSM8K_MARKER


def file_digest(files: DataFiles, mode: str, settings: DemoSettings) -> str:
    if on_bigbench(mode, settings):
        paths = [files.bbm_train_dir / f"{t}.jsonl" for t in files.bbm_tasks] + [files.bbm_test]
    else:
        paths = [files.gsm8k_train, files.gsm8k_test]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


__all__ = ["file_digest", "marker_of", "on_bigbench", "prepare_data", "read_jsonl", "require_file", "write_jsonl"]
