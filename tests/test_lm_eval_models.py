"""Our lm-eval models are registered in one place (``entropy_guided_generation.lm_eval``), ``hf``
is taken over there only, and ``--model egg_torchtune`` builds the eval recipe's model from its YAML
through lm-eval's evaluator."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from entropy_guided_generation import kit
from entropy_guided_generation.eval.lm import TorchtuneLM
from entropy_guided_generation.lm_eval import MODELS, register_models
from entropy_guided_generation.eval.hf_guided import HFGuidedLM

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "entropy_guided_generation"


def test_register_models_maps_each_name_to_its_class_beside_lm_evals_own():
    register_models()
    register_models()  # again: a no-op, not a collision
    assert set(MODELS) == {"egg_torchtune", "hf-guided", "hf", "diffusion"}
    for name, model_class in MODELS.items():
        assert get_model(name) is model_class
    assert get_model("hf") is HFGuidedLM and issubclass(HFGuidedLM, HFLM)
    assert get_model("huggingface") is HFLM and get_model("hf-auto") is HFLM  # lm-eval's class under its other names


@pytest.mark.slow
def test_importing_lm_eval_or_our_package_leaves_lm_evals_hf_alone(subprocess_env):
    """Only ``register_models()`` (our entry point) takes over ``hf``; imports never do."""
    script = (
        "import lm_eval, lm_eval.models.huggingface\n"
        "import entropy_guided_generation, entropy_guided_generation.sampling, entropy_guided_generation.lm_eval as ours\n"
        "from lm_eval.api.registry import get_model\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "assert get_model('hf') is HFLM, get_model('hf')\n"
        "ours.register_models()\n"
        "assert get_model('hf') is ours.MODELS['hf'], get_model('hf')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_only_the_registration_module_registers_models():
    callers = sorted(
        str(path.relative_to(PACKAGE_DIR))
        for path in PACKAGE_DIR.rglob("*.py")
        if any(
            isinstance(node, ast.Name) and node.id == "register_model"
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert callers == ["lm_eval.py"]


def test_egg_torchtune_model_builds_the_eval_recipes_lm_from_its_yaml_through_lm_evals_evaluator(kit_cache):
    register_models()
    config = REPO_ROOT / "configs" / "tiny" / "eval_answer.yaml"
    lm = get_model("egg_torchtune").create_from_arg_string(f"config={config},batch_size=2", {"device": None})
    assert isinstance(lm, TorchtuneLM) and lm.decoder_name == "answer" and lm.batch_size == 2
    results = simple_evaluate(
        model="egg_torchtune", model_args=f"config={config},batch_size=2", tasks=["kit_arith_choice"], limit=2,
        bootstrap_iters=0, task_manager=TaskManager(include_path=str(kit.tasks_dir()), include_defaults=False),
    )
    assert 0.0 <= results["results"]["kit_arith_choice"]["acc,none"] <= 1.0


def test_egg_torchtune_model_without_a_config_names_the_missing_argument():
    register_models()
    with pytest.raises(ValueError, match="needs model_args config=<eval recipe YAML>, got \\['batch_size'\\]"):
        get_model("egg_torchtune").create_from_arg_string("batch_size=2")
