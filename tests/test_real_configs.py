"""Every shipped real-model config (``configs/entropy_intl/*.yaml``, ``configs/bigbench_mistake/*.yaml``)
runs end to end on the kit's Llama-3-shaped stand-in: the real tokenizer format (a tiktoken file of
128,000 ranks), the real vocabulary (128,256) and file layout (one tied ``model.safetensors`` for 1B,
four untied shards for 8B), tiny weights. Only the model's size, the paths, the device and the budgets are overridden (and dtype fp32, for speed on CPU); every other key is the config's
own, so a config that rots fails here.

Each training config trains one step and saves ``epoch_0`` with ``confidence.json``; each eval config
then evaluates such a finetune (1B evals a 1B finetune, 8B evals an 8B one, FSDP2-saved included)
through lm-eval with two documents. Training runs in this process through ``run_recipe`` (the
``python -m`` entry points' function) and the eval configs through ``EleutherEvalRecipeDirect``; one
8B distributed config runs as users run it, ``tune run --nproc_per_node 2``; the other runs its keys
single-process (FSDP2 is covered by that run and tests/test_recipes.py).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from omegaconf import OmegaConf

from entropy_guided_generation.confidence import read_confidence_json
from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.kit import standin_size_overrides
from entropy_guided_generation.training import run_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
LAYOUT = {"1B": "llama3_2_1b", "8B": "llama3_1_8b"}
# bf16 runs on CPU too, but its 128,256-wide matmuls take several times fp32's time here.
CPU = ["device=cpu", "dtype=fp32"]
TRAIN_BUDGET = [
    "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "gradient_accumulation_steps=1", "max_val_batches=1",
    "tokenizer.max_seq_len=256", *CPU,
]
EVAL_BUDGET = ["limit=2", "num_fewshot=1", "max_gen_toks=8", "batch_size=2", "max_seq_length=1024", "bootstrap_iters=0", *CPU]
DATA = {  # the kit's synthetic data in each family's real format
    "entropy_intl": ["dataset.data_files=kit:gsm8k/train.jsonl", "dataset_val.data_files=kit:gsm8k/train.jsonl"],
    "bigbench_mistake": [
        "dataset.data_dir=kit:bigbench_mistake", "dataset_val.data_dir=kit:bigbench_mistake",
        "dataset.tasks=[multistep_arithmetic]", "dataset_val.tasks=[multistep_arithmetic]",
    ],
}
EVAL_DATA = {"entropy_intl": "data_dir=kit:gsm8k", "bigbench_mistake": "data_dir=kit:bigbench_mistake"}
MODE = {"entropy_intl": "answer", "bigbench_mistake": "marker"}


def standin(size: str) -> List[str]:
    """Overrides that put the stand-in of a ``size`` download (``1B`` | ``8B``) where the config reads it."""
    artifact = f"kit:{LAYOUT[size]}_standin"
    return [f"checkpointer.checkpoint_dir={artifact}", f"tokenizer.path={artifact}/original/tokenizer.model", *standin_size_overrides(LAYOUT[size])]


def train_overrides(config: str, out: Path) -> List[str]:
    family, name = config.split("/")
    return [*standin(name[:2]), *DATA[family], *TRAIN_BUDGET, f"output_dir={out}", f"metric_logger.log_dir={out}/logs"]


def load(config: str, overrides: List[str]):
    return OmegaConf.merge(OmegaConf.load(REPO / "configs" / config), OmegaConf.from_dotlist(overrides))


def train_in_process(config: str, out: Path, *extra: str) -> Path:
    family = config.split("/")[0]
    run_recipe(load(config, [*train_overrides(config, out), *extra]), mode=MODE[family])
    return out / "epoch_0"


def evaluate(config: str, finetune: Path, out: Path) -> dict:
    """The eval config on ``finetune`` (an ``epoch_0`` folder): its summary, after checking the basics."""
    family, name = config.split("/")
    size = "8B" if name.startswith("8B") else "1B"
    overrides = [*standin(size), f"checkpointer.checkpoint_dir={finetune}", EVAL_DATA[family], *EVAL_BUDGET, f"output_dir={out}"]
    cfg = load(config, overrides)
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    summary = recipe.evaluate()
    assert summary["mode"] == MODE[family] == read_confidence_json(finetune).mode
    assert summary["num_samples"] == 2 and summary["metric"] == "exact_match"
    assert summary["decode_tokens"] > 0 and (out / "eval_summary.json").is_file()
    return summary


def check_finetune(folder: Path, config: str, shards: int) -> None:
    assert len(list(folder.glob("*.safetensors"))) == shards
    meta = read_confidence_json(folder)
    assert meta.mode == MODE[config.split("/")[0]]
    assert meta.token_ids == list(range(128245, 128256))
    if "preset" in str(OmegaConf.load(REPO / "configs" / config).confidence.get("tokens", "")):
        # tokens: {preset: llama3_reserved} under torchtune's tokenizer: its names of those ids
        assert meta.token_strings == [f"<|reserved_special_token_{k}|>" for k in range(234, 245)]


def test_every_real_config_is_covered_here():
    shipped = sorted(str(p.relative_to(REPO / "configs")) for d in ("entropy_intl", "bigbench_mistake") for p in (REPO / "configs" / d).glob("*.yaml"))
    covered = sorted({c for chain in CHAINS for c in chain} | set(TRAIN_ONLY))
    assert shipped == covered


CHAINS = [  # (train config, eval config of the same size)
    ("entropy_intl/1B_single_device.yaml", "entropy_intl/gsm8k_eval.yaml"),
    ("bigbench_mistake/1B_single_device.yaml", "bigbench_mistake/1B_eval.yaml"),
    ("bigbench_mistake/8B_single_device.yaml", "bigbench_mistake/8B_eval.yaml"),
    ("entropy_intl/8B_distributed.yaml", "entropy_intl/8B_gsm8k_eval.yaml"),
]
TRAIN_ONLY = ["entropy_intl/8B_single_device.yaml", "bigbench_mistake/8B_distributed.yaml"]
NO_BNB = ["optimizer._component_=torch.optim.AdamW"]


@pytest.mark.parametrize("train,evaluation", CHAINS[:2])
def test_1b_config_trains_and_its_eval_config_evaluates_the_finetune(tmp_path, train, evaluation):
    finetune = train_in_process(train, tmp_path / "train")
    check_finetune(finetune, train, shards=1)
    evaluate(evaluation, finetune, tmp_path / "eval")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8b_single_device_config_without_bitsandbytes_names_the_extra(tmp_path):
    config = "entropy_intl/8B_single_device.yaml"
    with pytest.raises(ModuleNotFoundError, match=r"bitsandbytes\.optim\.PagedAdamW8bit.*entropy_guided_generation\[bnb\]"):
        run_recipe(load(config, train_overrides(config, tmp_path)), mode="answer")
    assert not (tmp_path / "epoch_0").exists()


def test_8b_single_device_configs_train_and_the_8b_eval_config_evaluates_four_shards(tmp_path):
    for config in ("entropy_intl/8B_single_device.yaml", "bigbench_mistake/8B_single_device.yaml"):
        finetune = train_in_process(config, tmp_path / config.split("/")[0], *NO_BNB)
        check_finetune(finetune, config, shards=4)
    evaluate("bigbench_mistake/8B_eval.yaml", finetune, tmp_path / "eval")


def test_8b_distributed_configs_train_and_the_fsdp2_finetune_evaluates(tmp_path, subprocess_env):
    """entropy_intl's under ``tune run --nproc_per_node 2`` (FSDP2, gloo), then evaluated with the 8B
    GSM8K eval config; bigbench_mistake's keys single-process (its FSDP2 keys are the same)."""
    config, out = "entropy_intl/8B_distributed.yaml", tmp_path / "dist"
    command = [TUNE, "run", "--nproc_per_node", "2", "recipes/full_finetune_distributed_ans_intl.py", "--config", f"configs/{config}"]
    done = subprocess.run(command + train_overrides(config, out), cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    check_finetune(out / "epoch_0", config, shards=4)
    evaluate("entropy_intl/8B_gsm8k_eval.yaml", out / "epoch_0", tmp_path / "eval")
    other = "bigbench_mistake/8B_distributed.yaml"
    check_finetune(train_in_process(other, tmp_path / "bigbench"), other, shards=4)
