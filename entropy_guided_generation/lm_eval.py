"""Our lm-eval models, registered in one place, and ``python -m entropy_guided_generation.lm_eval
<lm-eval flags>``: lm-eval's own CLI with them registered beside lm-eval's::

    python -m entropy_guided_generation.lm_eval --model hf --model_args pretrained=<dir> \\
        --tasks kit_gsm8k --include_path <dir> --log_samples --output_path out \\
        --gen_kwargs max_gen_toks=256,max_tokens_thinking=auto,thinking_n_ignore=2,thinking_n_ignore_str=Wait

:data:`MODELS` maps each ``--model`` name to its class; :func:`register_models` registers them
(call it before ``lm_eval.simple_evaluate(model="<name>", ...)``; the CLI here does). The class
modules do not register themselves.

``hf`` is lm-eval's own name: :func:`register_models` (and so only our entry point, never a plain
``import lm_eval`` or an import of this package) points it at :class:`HFGuidedLM`, lm-eval's
``HFLM`` that does budget forcing when a request's gen_kwargs ask for it and hands every other
request to ``HFLM.generate_until`` unchanged. lm-eval's class stays registered as ``huggingface``
and ``hf-auto``; ``hf-guided`` names ours explicitly.

Data parallel: ``torchrun --nproc_per_node N -m entropy_guided_generation.lm_eval --model egg_torchtune
...`` (or ``diffusion``), and ``accelerate launch --num_processes N -m entropy_guided_generation.lm_eval
--model hf-guided ...`` as for lm-eval's ``hf``: every rank serves its share of the documents and rank 0
writes lm-eval's results and samples.

Named ``lm_eval`` inside our package; absolute imports keep ``import lm_eval`` meaning lm-eval.
"""
from __future__ import annotations

from lm_eval.__main__ import HarnessCLI
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.utils import setup_logging

from entropy_guided_generation.diffusion.lm_eval_model import MODEL_NAME as DIFFUSION
from entropy_guided_generation.diffusion.lm_eval_model import DiffusionLM
from entropy_guided_generation.eval.distributed import leave_process_group, padding_aware_use_cache
from entropy_guided_generation.eval.from_config import TorchtuneLMFromConfig, lm_eval_cli_settings
from entropy_guided_generation.eval.lm import MODEL_NAME as EGG_TORCHTUNE
from entropy_guided_generation.eval.hf_guided import MODEL_NAME as HF_GUIDED
from entropy_guided_generation.eval.hf_guided import HFGuidedLM

MODELS: dict[str, type[LM]] = {
    # a torchtune checkpoint in its interleaving mode: --model_args config=<eval recipe YAML>[,key=value...]
    EGG_TORCHTUNE: TorchtuneLMFromConfig,
    # lm-eval's hf model with budget forcing (hf's model_args)
    HF_GUIDED: HFGuidedLM,
    # lm-eval's own name, taken over by the same class (seed 003's `--model hf`)
    "hf": HFGuidedLM,
    # a masked-diffusion mask predictor: --model_args decoding=baseline|tta,...
    DIFFUSION: DiffusionLM,
}
"""``--model`` name -> our lm-eval model class."""


def register_models() -> None:
    """Register every model of :data:`MODELS` with lm-eval (again is a no-op).

    A name lm-eval already holds (``hf``) is taken over only by a subclass of the class it holds.

    Raises:
        ValueError: a name held by another class that ours does not extend (lm-eval's collision error).
    """
    for name, model_class in MODELS.items():
        held = model_registry.get(name, None)
        if isinstance(held, type) and held is not model_class and issubclass(model_class, held):
            # lm-eval's Registry refuses a second class under one name and has no public way to replace one.
            model_registry._objs[name] = model_class
        else:
            register_model(name)(model_class)


def main() -> None:
    """Register our models, then run lm-eval's CLI on ``sys.argv`` (its ``cli_evaluate``, with the
    parsed command line kept so ``egg_torchtune`` can tell a ``--device`` / ``--batch_size`` the user
    gave from lm-eval's defaults, and ``--use_cache`` aware of data-parallel padding:
    :func:`~entropy_guided_generation.eval.distributed.padding_aware_use_cache`), leaving any process
    group after."""
    register_models()
    setup_logging()
    cli = HarnessCLI()
    args = cli.parse_args()
    with lm_eval_cli_settings(args), padding_aware_use_cache():
        cli.execute(args)
    leave_process_group()


if __name__ == "__main__":
    main()
