"""Config templating: a mode's finetune and eval configs from the repository's YAML, the settings and the base.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from entropy_guided_generation import kit
from entropy_guided_generation.confidence import kit_confidence_tokens, resolve_token_ids
from entropy_guided_generation.demo.data import marker_of, on_bigbench, read_jsonl
from entropy_guided_generation.demo.settings import BBM_MARKER, BaseModel, CODECS, DataFiles, DemoSettings, MAX_INTERLEAVED_POSITIONS, MAX_PLAIN_TOKENS, REPO_CONFIGS
from entropy_guided_generation.modes import mode_named


def load_config(name: str) -> DictConfig:
    path = REPO_CONFIGS / "tiny" / name
    if not path.is_file():
        raise FileNotFoundError(f"the demo builds on {path}, which is missing: run it from a source checkout")
    return OmegaConf.load(path)


def tokenizer_section(base: BaseModel, max_seq_len: Optional[int]) -> dict:
    return kit.tokenizer_section(base.tokenizer_dir, max_seq_len)


def confidence_tokens(base: BaseModel) -> dict:
    """The kit's ``<|conf_k|>`` tokens: named when the base's tokenizer has them, else added (any HF model)."""
    tokenizer = kit.load_folder_tokenizer(base.tokenizer_dir)
    try:
        resolve_token_ids(kit_confidence_tokens(), tokenizer)
    except ValueError:
        return {"add": "kit"}
    return {"preset": "kit"}


def weight_files(checkpoint: Path) -> list[str]:
    """The safetensors files of a Hugging Face checkpoint folder (names differ: a base has
    ``model.safetensors``, torchtune writes ``model-00001-of-0000N.safetensors``)."""
    files = sorted(p.name for p in Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {checkpoint}")
    return files


def epoch_plan(steps: int, batch_size: int, rows: int) -> dict[str, int]:
    """``epochs`` and ``max_steps_per_epoch`` giving ``steps`` optimizer steps on ``rows`` examples
    (more epochs when one epoch has fewer than ``steps`` batches)."""
    batches = rows // batch_size
    if batches < 1:
        raise ValueError(f"{rows} training rows cannot fill one batch of {batch_size}")
    epochs = math.ceil(steps / batches)
    if steps % epochs:
        raise ValueError(f"{steps} steps do not split into {epochs} equal epochs of at most {batches} batches; "
                         f"pick --steps as a multiple of {epochs} or add training rows")
    return {"epochs": epochs, "max_steps_per_epoch": steps // epochs}


def training_rows(files: DataFiles, mode: str, settings: DemoSettings) -> int:
    if on_bigbench(mode, settings):
        return sum(len(read_jsonl(files.bbm_train_dir / f"{task}.jsonl")) for task in files.bbm_tasks)
    return len(read_jsonl(files.gsm8k_train))


def interleaving_section(mode: str, settings: DemoSettings) -> dict:
    section: dict[str, Any] = {"positions": settings.positions}
    if mode_named(mode).needs_marker:
        section["marker"] = marker_of(mode, settings)
    return section


def train_config(mode: str, base: BaseModel, files: DataFiles, settings: DemoSettings, run_dir: Path) -> DictConfig:
    """The tiny single-device config of ``mode`` pointed at the demo's model, data, codec and budget."""
    bbm = on_bigbench(mode, settings)
    cfg = load_config("marker_bigbench_single_device.yaml" if bbm else f"{mode}_single_device.yaml")
    if bbm:
        dataset = {
            "_component_": "entropy_guided_generation.data.bigbench_mistake_dataset",
            "data_dir": str(files.bbm_train_dir),
            "tasks": list(files.bbm_tasks),
            "marker": BBM_MARKER,
            "answer_field": "answer",
        }
        val = None
    else:
        dataset = {"_component_": "entropy_guided_generation.data.gsm8k_dataset", "data_files": str(files.gsm8k_train),
                   "prompt_template": "{question}\n", "response_template": "{answer}"}
        val = {**dataset, "data_files": str(files.gsm8k_test)}
    overrides = {
        "output_dir": str(run_dir),
        "checkpointer": {"checkpoint_dir": str(base.checkpoint_dir), "checkpoint_files": weight_files(base.checkpoint_dir),
                         "model_type": base.model_type, "output_dir": str(run_dir)},
        # Interleaving about doubles a response's length: positions for the interleaved sequence.
        "model": {"max_seq_len": MAX_INTERLEAVED_POSITIONS},
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        **epoch_plan(settings.steps, settings.batch_size, training_rows(files, mode, settings)),
        "gradient_accumulation_steps": 1,
        "optimizer": {"lr": settings.lr},
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(run_dir / "logs")},
    }
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.checkpointer.checkpoint_files = OmegaConf.create(weight_files(base.checkpoint_dir))
    # Replace (not merge) the tokenizer, the datasets and the codec: the config's keys must not leak into another choice.
    cfg.tokenizer = OmegaConf.create(tokenizer_section(base, MAX_PLAIN_TOKENS))
    cfg.dataset = OmegaConf.create(dataset)
    cfg.dataset_val = OmegaConf.create(val) if val is not None else None
    if not mode_named(mode).is_plain:
        cfg.confidence = OmegaConf.create({**CODECS[settings.codec], "temperature": 1.0, "tokens": confidence_tokens(base)})
        if settings.context != "interleaved":  # only then: default configs (and their fingerprints) unchanged
            cfg.confidence.context = settings.context
        cfg.interleaving = OmegaConf.merge(cfg.interleaving, interleaving_section(mode, settings))
        # Explicit either way: unset, the recipe would reset rows the kit's mixed-format base was pretrained with.
        cfg.interleaving.init_confidence_embeddings = "keep" if settings.init_embeddings == "none" else settings.init_embeddings
    return cfg


def gen_budget(mode: str, settings: DemoSettings) -> int:
    """Content tokens per answer: BIG-Bench-Mistake traces are about twice a word problem's length."""
    return 2 * settings.max_gen_toks if on_bigbench(mode, settings) else settings.max_gen_toks


def eval_config(mode: str, checkpoint: Path, base: BaseModel, files: DataFiles, settings: DemoSettings, eval_dir: Path) -> DictConfig:
    """The tiny eval config of ``mode`` on the finetuned checkpoint and the held-out task (mode,
    marker, positions and codec come from the checkpoint's ``confidence.json``)."""
    cfg = load_config(f"eval_{mode}.yaml")
    if on_bigbench(mode, settings):
        include, tasks = kit.bigbench_mistake_tasks_dir(files.bbm_test), [kit.BIGBENCH_MISTAKE_TASK]
    else:
        include, tasks = kit.tasks_dir(data=files.gsm8k_test, fewshot_data=files.gsm8k_train), ["kit_gsm8k"]
    overrides = {
        "output_dir": str(eval_dir),
        "checkpointer": {"checkpoint_dir": str(checkpoint), "checkpoint_files": weight_files(checkpoint),
                         "model_type": base.model_type, "output_dir": str(eval_dir)},
        "include_path": str(include),
        "tasks": tasks,
        "limit": settings.eval_limit,
        "max_gen_toks": gen_budget(mode, settings),
        "gen_kwargs": {"max_gen_toks": gen_budget(mode, settings)},
        "seed": settings.seed,
    }
    cfg = OmegaConf.merge(cfg, overrides)
    cfg.tasks = OmegaConf.create(tasks)
    cfg.tokenizer = OmegaConf.create(tokenizer_section(base, None))  # replaced: another tokenizer takes other keys
    cfg.checkpointer.checkpoint_files = OmegaConf.create(weight_files(checkpoint))
    if not mode_named(mode).is_plain:
        cfg.interleaving = OmegaConf.merge(cfg.interleaving, interleaving_section(mode, settings))
        cfg.confidence = None  # confidence.json beside the checkpoint holds the (possibly fitted) codec
    return cfg


__all__ = ["confidence_tokens", "epoch_plan", "eval_config", "gen_budget", "interleaving_section", "load_config", "tokenizer_section", "train_config", "training_rows", "weight_files"]
