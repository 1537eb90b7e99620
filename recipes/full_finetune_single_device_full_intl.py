"""tune-run entry: ``PYTHONPATH=. tune run recipes/full_finetune_single_device_full_intl.py --config X.yaml``
(interleaving.mode full); the recipe is :mod:`entropy_guided_generation.full_finetune_single_device_full_intl`."""
import sys

from entropy_guided_generation.full_finetune_single_device_full_intl import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main())
