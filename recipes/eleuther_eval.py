"""lm-eval with the interleaving mode from the config's ``interleaving.mode`` (none | full | answer | marker):
``PYTHONPATH=. tune run recipes/eleuther_eval.py --config configs/entropy_intl/gsm8k_eval.yaml``."""
import sys

from entropy_guided_generation.eleuther_eval import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main())
