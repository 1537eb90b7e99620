"""``python -m entropy_guided_generation.lm_eval <lm-eval flags>``: lm-eval's own CLI with our models
registered, so ``--model hf-guided`` (and the other modules' models) work beside lm-eval's::

    python -m entropy_guided_generation.lm_eval --model hf-guided --model_args pretrained=<dir> \\
        --tasks kit_gsm8k --include_path <dir> --log_samples --output_path out \\
        --gen_kwargs max_gen_toks=256,max_tokens_thinking=auto,thinking_n_ignore=2,thinking_n_ignore_str=Wait

Named ``lm_eval`` inside our package; absolute imports keep ``import lm_eval`` meaning lm-eval.
"""
from __future__ import annotations

import importlib

MODEL_MODULES = [
    "entropy_guided_generation.sampling.hf_guided",
    "entropy_guided_generation.eval.lm",  # egg_torchtune: --model_args config=<eval recipe YAML>
    "entropy_guided_generation.diffusion.lm_eval_model",  # diffusion: --model_args decoding=baseline|tta,...
]
"""Modules whose import registers one of our lm-eval models (``@register_model``)."""


def register_models() -> None:
    """Import every module of :data:`MODEL_MODULES` (each registers its models with lm-eval)."""
    for name in MODEL_MODULES:
        importlib.import_module(name)


def main() -> None:
    """Register our models, then run lm-eval's CLI on ``sys.argv``."""
    from lm_eval.__main__ import cli_evaluate

    register_models()
    cli_evaluate()


if __name__ == "__main__":
    main()
