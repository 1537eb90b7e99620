"""``python -m entropy_guided_generation.training --config X.yaml [key=value ...]``: single-device
finetune with the mode from ``interleaving.mode`` (none | full | answer | marker)."""
import sys

from entropy_guided_generation.training import make_recipe_main

recipe_main = make_recipe_main(mode=None, distributed=False)

if __name__ == "__main__":
    sys.exit(recipe_main())
