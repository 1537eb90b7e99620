"""Test-session hygiene shared by every test: offline flags, private caches, one torch thread.

Environment variables are set at import time so that subprocesses (tune run, torchrun, lm-eval's CLI)
started by tests inherit them too.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real data no one here wrote (GSM8K, BIG-Bench Mistake): $EGG_SHARED_DATA, else ../shared/data
# beside the checkout, else the workplace's copy (a clean clone may live anywhere).
SHARED_DATA_CANDIDATES = [
    Path(p) for p in (os.environ.get("EGG_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data", "/work/shared/data") if p
]

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="egg-tests-"))
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
for _name, _sub in (
    ("HF_HOME", "hf_home"),
    ("HF_DATASETS_CACHE", "hf_datasets"),
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ("MPLCONFIGDIR", "mpl"),
):
    os.environ.setdefault(_name, str(_SESSION_TMP / _sub))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The kit's builds are deterministic and cached; tests share the repo-level cache so that each
# artifact is built once per machine (builders are safe under concurrent xdist workers).
os.environ.setdefault("EGG_KIT_CACHE", str(REPO_ROOT / ".kit_cache"))

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def kit_cache() -> Path:
    """The kit's cache folder (built artifacts: tokenizer, tiny checkpoints, datasets)."""
    path = Path(os.environ["EGG_KIT_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real GSM8K and BIG-Bench Mistake files (read-only, never copied into the repo).

    Tests that read it skip, naming the folders tried, on a machine that has none of them (the
    data are not ours to ship); set EGG_SHARED_DATA to point at a copy."""
    for folder in SHARED_DATA_CANDIDATES:
        if (folder / "gsm8k" / "test.jsonl").is_file() and (folder / "bigbench_mistake").is_dir():
            return folder.resolve()
    pytest.skip(f"no shared data folder (tried {', '.join(map(str, SHARED_DATA_CANDIDATES))}); set EGG_SHARED_DATA")


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses (tune run, torchrun, python -m): repo on PYTHONPATH, private TMPDIR."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


SHARED_FOLDER_NAME = "shared_by_workers"


@pytest.fixture(scope="session")
def shared_session_folder(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this test session sees (the controller's base temp folder holds the
    workers' own), for session fixtures that build something large once and share it (lock it while building).
    Deleted when the session ends."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / SHARED_FOLDER_NAME
    folder.mkdir(exist_ok=True)
    return folder


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Delete :func:`shared_session_folder` once every worker is done (in the controller, or the only process).

    It holds gigabytes (tests/test_real_model.py's SmolLM2 finetunes), and pytest keeps the base temp folders
    of its last runs: on a machine that runs the suite often they would fill the disk."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the others may still read the folder
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or factory._basetemp is None:  # this session made no base temp folder
        return
    shutil.rmtree(factory.getbasetemp() / SHARED_FOLDER_NAME, ignore_errors=True)
