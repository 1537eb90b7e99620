"""lm-eval tasks over local JSONL in the GSM8K format (the kit's synthetic rows or real GSM8K).

``tasks_dir()`` writes a folder for lm-eval's ``--include_path`` (or ``TaskManager(include_path=...)``)
with three tasks, each reading ``dataset_path: json`` from absolute ``data_files``:

- ``kit_gsm8k`` (generate_until): includes lm-eval's own ``gsm8k.yaml`` (its "strict-match" /
  "flexible-extract" answer filters and exact_match), with the kit prompt ``question + "\\n"``, 0-shot;
- ``kit_arith_choice`` (multiple_choice): the reference solution against three with a wrong final
  result (``choice_docs``), scored by log-likelihood (acc, acc_norm);
- ``kit_perplexity`` (loglikelihood_rolling): word/byte perplexity and bits per byte of
  ``question + "\\n" + answer``.

The templates live in ``kit/tasks/*.yaml``; only the data paths (and the include) are added here.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional, Union

from entropy_guided_generation.kit import data as kit_data
from entropy_guided_generation.kit.cache import cached_folder

TEMPLATES_DIR = Path(__file__).resolve().parent / "tasks"
TASK_NAMES = ("kit_gsm8k", "kit_arith_choice", "kit_perplexity")
BIGBENCH_MISTAKE_TASK = "kit_bigbench_mistake"
BIGBENCH_MISTAKE_FORMAT = "BIG-Bench-Mistake-format"
NUM_CHOICES = 4
DEFAULT_TEST_ROWS = 200
DEFAULT_FEWSHOT_ROWS = 200
_DISTRACTOR_OFFSETS = (1, -1, 2, -2, 10, -10, 3)
PathLike = Union[str, Path]


def lm_eval_gsm8k_yaml() -> Path:
    """Absolute path of lm-eval's installed ``tasks/gsm8k/gsm8k.yaml`` (what ``kit_gsm8k`` includes)."""
    import lm_eval

    path = Path(lm_eval.__file__).resolve().parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval's gsm8k task is missing: expected {path}")
    return path


# ---------------------------------------------------------------- multiple-choice docs


def _replace_last_number(text: str, old: int, new: int) -> str:
    matches = list(re.finditer(rf"(?<![\d.]){re.escape(str(old))}(?![\d])", text))
    if not matches:
        return text
    last = matches[-1]
    return text[: last.start()] + str(new) + text[last.end() :]


def answer_with_result(answer: str, new_result: int) -> str:
    """A GSM8K answer whose final result is ``new_result``: the ``#### n`` line and the last
    occurrence of ``n`` in the steps before it (the step that computed it) are replaced."""
    old = kit_data.final_answer(answer)
    steps, _, _ = answer.rpartition("####")
    return _replace_last_number(steps, old, new_result) + f"#### {new_result}"


def _stable_index(text: str, modulus: int) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % modulus


def answer_choices(question: str, answer: str) -> tuple[list[str], int]:
    """Four solutions and the index of the right one (the reference ``answer``), deterministic in the
    question. Wrong ones end in result + 1, - 1, + 2 (skipping negatives when the result is not)."""
    result = kit_data.final_answer(answer)
    wrong = [result + d for d in _DISTRACTOR_OFFSETS if result < 0 or result + d >= 0][: NUM_CHOICES - 1]
    choices = [answer_with_result(answer, w) for w in wrong]
    label = _stable_index(question, NUM_CHOICES)
    choices.insert(label, answer)
    return choices, label


def _with_choices(doc: dict[str, Any]) -> dict[str, Any]:
    choices, label = answer_choices(doc["question"], doc["answer"])
    return {"choices": choices, "label": label}


def choice_docs(dataset):
    """lm-eval ``process_docs``: adds ``choices`` (4 solutions) and ``label`` to every GSM8K-format row."""
    return dataset.map(_with_choices)


# ---------------------------------------------------------------- the task folder


def default_task_data() -> tuple[Path, Path]:
    """Cached kit JSONL files ``(test, fewshot)``: 200 held-out (test-split) rows and 200 train-split rows."""

    def write(folder: Path) -> None:
        kit_data.write_gsm8k_jsonl(folder / "test.jsonl", DEFAULT_TEST_ROWS, seed=1, split="test")
        kit_data.write_gsm8k_jsonl(folder / "train.jsonl", DEFAULT_FEWSHOT_ROWS, seed=0, split="train")

    spec = {"test": DEFAULT_TEST_ROWS, "train": DEFAULT_FEWSHOT_ROWS}
    folder = cached_folder("taskdata", spec, write, (Path(kit_data.__file__),))
    return folder / "test.jsonl", folder / "train.jsonl"


def _existing_jsonl(path: PathLike, what: str, file_format: str = "GSM8K-format") -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; expected a {file_format} JSONL file")
    return path


def _runnable_yaml(template: Path, test: Path, fewshot: Path) -> str:
    text = template.read_text()
    if template.stem == "kit_gsm8k":
        text = f"include: {json.dumps(str(lm_eval_gsm8k_yaml()))}\n" + text
    return text + f"dataset_kwargs:\n  data_files:\n    train: {json.dumps(str(fewshot))}\n    test: {json.dumps(str(test))}\n"


def bigbench_mistake_tasks_dir(data: PathLike, fewshot_data: Optional[PathLike] = None) -> Path:
    """Write (once, cached) a folder with ``kit_bigbench_mistake.yaml`` reading ``data`` and return it.

    Args:
        data: BIG-Bench-Mistake-format JSONL (rows ``input``, ``steps``, ``answer``, ``target``,
            ``mistake_index``) evaluated as the test split, e.g. a held-out slice of
            ``../shared/data/bigbench_mistake/multistep_arithmetic.jsonl`` or kit rows written by
            ``write_bigbench_mistake_jsonl``.
        fewshot_data: JSONL the few-shot examples come from; default ``data``.
    """
    test = _existing_jsonl(data, "data", BIGBENCH_MISTAKE_FORMAT)
    fewshot = _existing_jsonl(fewshot_data, "fewshot_data", BIGBENCH_MISTAKE_FORMAT) if fewshot_data is not None else test
    template = TEMPLATES_DIR / f"{BIGBENCH_MISTAKE_TASK}.yaml"

    def write(folder: Path) -> None:
        (folder / template.name).write_text(_runnable_yaml(template, test, fewshot))

    spec = {"test": str(test), "fewshot": str(fewshot)}
    return cached_folder("tasks-bbm", spec, write, (Path(__file__), template))


def tasks_dir(data: Optional[PathLike] = None, fewshot_data: Optional[PathLike] = None) -> Path:
    """Write (once, cached) the kit's lm-eval task folder and return it (for ``--include_path``).

    Args:
        data: GSM8K-format JSONL evaluated as the test split, e.g.
            ``../shared/data/gsm8k/test.jsonl``; default: 200 held-out kit problems.
        fewshot_data: JSONL the few-shot examples come from (``--num_fewshot``); default: 200
            kit train-split problems when ``data`` is None, else ``data`` itself.

    Returns:
        A folder with ``kit_gsm8k.yaml``, ``kit_arith_choice.yaml``, ``kit_perplexity.yaml``.
    """
    if data is None:
        test, fewshot = default_task_data()
    else:
        test = _existing_jsonl(data, "data")
        fewshot = test
    if fewshot_data is not None:
        fewshot = _existing_jsonl(fewshot_data, "fewshot_data")
    templates = tuple(TEMPLATES_DIR / f"{name}.yaml" for name in TASK_NAMES)

    def write(folder: Path) -> None:
        for template in templates:
            (folder / template.name).write_text(_runnable_yaml(template, test, fewshot))

    spec = {"test": str(test), "fewshot": str(fewshot), "gsm8k_yaml": str(lm_eval_gsm8k_yaml())}
    return cached_folder("tasks", spec, write, (Path(__file__), *templates))
