"""Full finetune with full interleaving (every token after the first, prompt included), on one device.

Run: ``python -m entropy_guided_generation.full_finetune_single_device_full_intl --config X.yaml``.
"""
import sys

from entropy_guided_generation.training import make_recipe_main

recipe_main = make_recipe_main(mode="full", distributed=False)

if __name__ == "__main__":
    sys.exit(recipe_main())
