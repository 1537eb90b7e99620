"""Our lm-eval models, registered in one place, and ``python -m entropy_guided_generation.lm_eval
<lm-eval flags>``: lm-eval's own CLI with them registered beside lm-eval's::

    python -m entropy_guided_generation.lm_eval --model hf-guided --model_args pretrained=<dir> \\
        --tasks kit_gsm8k --include_path <dir> --log_samples --output_path out \\
        --gen_kwargs max_gen_toks=256,max_tokens_thinking=auto,thinking_n_ignore=2,thinking_n_ignore_str=Wait

:data:`MODELS` maps each ``--model`` name to its class; :func:`register_models` registers them
(call it before ``lm_eval.simple_evaluate(model="<name>", ...)``; the CLI here does). The class
modules do not register themselves.

Named ``lm_eval`` inside our package; absolute imports keep ``import lm_eval`` meaning lm-eval.
"""
from __future__ import annotations

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from entropy_guided_generation.diffusion.lm_eval_model import MODEL_NAME as DIFFUSION
from entropy_guided_generation.diffusion.lm_eval_model import DiffusionLM
from entropy_guided_generation.eval.from_config import TorchtuneLMFromConfig
from entropy_guided_generation.eval.lm import MODEL_NAME as EGG_TORCHTUNE
from entropy_guided_generation.sampling.hf_guided import MODEL_NAME as HF_GUIDED
from entropy_guided_generation.sampling.hf_guided import HFGuidedLM

MODELS: dict[str, type[LM]] = {
    # a torchtune checkpoint in its interleaving mode: --model_args config=<eval recipe YAML>[,key=value...]
    EGG_TORCHTUNE: TorchtuneLMFromConfig,
    # lm-eval's hf model with budget forcing (hf's model_args)
    HF_GUIDED: HFGuidedLM,
    # a masked-diffusion mask predictor: --model_args decoding=baseline|tta,...
    DIFFUSION: DiffusionLM,
}
"""``--model`` name -> our lm-eval model class."""


def register_models() -> None:
    """Register every model of :data:`MODELS` with lm-eval (again is a no-op)."""
    for name, model_class in MODELS.items():
        register_model(name)(model_class)


def main() -> None:
    """Register our models, then run lm-eval's CLI on ``sys.argv``."""
    register_models()
    cli_evaluate()


if __name__ == "__main__":
    main()
