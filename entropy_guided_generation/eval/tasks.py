"""Which lm-eval tasks a config names, and the task manager that finds them.

``tasks`` entries are lm-eval task names (from ``include_path`` or lm-eval's own catalogue) or
inline task configs (dicts, as lm-eval accepts them). An inline config may start from a task YAML
with ``include:`` -- lm-eval's own YAML keyword, which lm-eval applies to YAML files only -- given
as an absolute path or relative to lm-eval's installed ``tasks/`` folder. So lm-eval's own gsm8k
task reads local JSONL with::

    tasks:
      - task: gsm8k_local
        include: gsm8k/gsm8k.yaml        # lm-eval's gsm8k: prompt, answer filters, exact_match
        dataset_path: json
        dataset_name: null
        dataset_kwargs: {data_files: {train: /data/gsm8k/train.jsonl, test: /data/gsm8k/test.jsonl}}

Indexing lm-eval's whole catalogue takes tens of seconds, so it is only done when a task name is
not found in ``include_path``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

TaskSpec = Union[str, dict]


def lm_eval_tasks_dir() -> Path:
    """The ``tasks/`` folder of the installed lm-eval."""
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def resolve_include(value: str) -> Path:
    """The YAML file an inline ``include:`` names (absolute, or relative to lm-eval's ``tasks/``).

    Raises:
        FileNotFoundError: naming the value and the path it was looked up at.
    """
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = lm_eval_tasks_dir() / path
    if not path.is_file():
        raise FileNotFoundError(
            f"task include {value!r} not found at {path}; give an absolute YAML path or one relative to "
            f"lm-eval's tasks folder {lm_eval_tasks_dir()} (e.g. gsm8k/gsm8k.yaml)"
        )
    return path


def expand_task_spec(spec: Any) -> TaskSpec:
    """A task name unchanged; an inline config with its ``include:`` merged in (its own keys win)."""
    if isinstance(spec, str):
        return spec
    if not isinstance(spec, Mapping) or "task" not in spec:
        raise ValueError(f"a tasks entry must be a task name or an inline task config with a 'task' key, got {spec!r}")
    inline = dict(spec)
    include = inline.pop("include", None)
    if include is None:
        return inline
    from lm_eval.tasks._yaml_loader import load_yaml

    base = load_yaml(resolve_include(str(include)), resolve_func=True)
    return {**base, **inline}


def task_manager_for(specs: Sequence[TaskSpec], include_path: Optional[Union[str, Sequence[str]]]):
    """A ``TaskManager`` that knows every named task: ``include_path`` alone when it suffices,
    else with lm-eval's own catalogue too.

    Raises:
        ValueError: naming tasks found nowhere.
    """
    from lm_eval.tasks import TaskManager

    include = list(include_path) if isinstance(include_path, (list, tuple)) else include_path
    names = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_path=include, include_defaults=False)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    if all(name in known for name in names):
        return manager
    manager = TaskManager(include_path=include, include_defaults=True)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"unknown lm-eval tasks {missing}: not in include_path {include_path!r} nor in lm-eval's tasks")
    return manager


__all__ = ["expand_task_spec", "lm_eval_tasks_dir", "resolve_include", "task_manager_for"]
