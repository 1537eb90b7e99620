"""tune-run entry: ``PYTHONPATH=. tune run recipes/full_finetune_single_device_ans_intl_mistake.py --config X.yaml``
(interleaving.mode marker); the recipe is :mod:`entropy_guided_generation.full_finetune_single_device_ans_intl_mistake`."""
import sys

from entropy_guided_generation.full_finetune_single_device_ans_intl_mistake import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main())
