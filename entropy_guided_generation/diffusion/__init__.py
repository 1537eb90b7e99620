"""Masked-diffusion decoding (LLaDA-style) and test-time-augmentation uncertainty remasking.

- ``generate``: LLaDA's semi-autoregressive block decoding (``decoding.py``);
- ``generate_with_tta_uncertainty``: K perturbed views per step, remasking the most uncertain
  committed tokens, with a freeze window against oscillation (``tta.py``);
- constraint functions for it (``constraints.py``);
- the kit's tiny trained mask predictor (``mask_predictor.py``, ``train.py``, ``pretrained.py``);
- LLaDA's Monte-Carlo log-likelihood (``likelihood.py``), the lm-eval model ``diffusion``
  (``lm_eval_model.py``, imported on demand) and benchmark helpers (``experiments.py``).
"""
from entropy_guided_generation.diffusion.constraints import balanced_brackets, bracket_depth_change, no_repeat_ngrams
from entropy_guided_generation.diffusion.decoding import LLADA_MASK_ID, generate
from entropy_guided_generation.diffusion.experiments import heldout_problems, run_benchmark, solve, summarize
from entropy_guided_generation.diffusion.likelihood import monte_carlo_loglikelihood
from entropy_guided_generation.diffusion.pretrained import load_mask_predictor, trained_mask_predictor
from entropy_guided_generation.diffusion.tta import generate_with_tta_uncertainty

__all__ = [
    "LLADA_MASK_ID",
    "balanced_brackets",
    "bracket_depth_change",
    "generate",
    "generate_with_tta_uncertainty",
    "heldout_problems",
    "load_mask_predictor",
    "monte_carlo_loglikelihood",
    "no_repeat_ngrams",
    "run_benchmark",
    "solve",
    "summarize",
    "trained_mask_predictor",
]
