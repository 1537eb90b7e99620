"""tune-run entry with the mode taken from the config's ``interleaving.mode`` (none | full | answer | marker):
``PYTHONPATH=. tune run recipes/finetune_single_device.py --config X.yaml``."""
import sys

from entropy_guided_generation.training import make_recipe_main

recipe_main = make_recipe_main(mode=None, distributed=False)

if __name__ == "__main__":
    sys.exit(recipe_main())
