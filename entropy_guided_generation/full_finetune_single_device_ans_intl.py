"""Full finetune with answer-only interleaving (prompt untouched), on one device.

Run: ``python -m entropy_guided_generation.full_finetune_single_device_ans_intl --config X.yaml``.
"""
import sys

from entropy_guided_generation.training import make_recipe_main

recipe_main = make_recipe_main(mode="answer", distributed=False)

if __name__ == "__main__":
    sys.exit(recipe_main())
