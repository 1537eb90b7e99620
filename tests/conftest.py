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
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

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
    """../shared/data: real GSM8K and BIG-Bench Mistake files (read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"expected the shared data folder at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses (tune run, torchrun, python -m): repo on PYTHONPATH, private TMPDIR."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONUNBUFFERED"] = "1"
    return env
