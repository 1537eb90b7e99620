"""tune-run entry with the mode taken from the config's ``interleaving.mode`` (none | full | answer | marker):
``tune run --nproc_per_node N recipes/finetune_distributed.py --config X.yaml`` (FSDP2)."""
import sys

from entropy_guided_generation.training import make_recipe_main

recipe_main = make_recipe_main(mode=None, distributed=True)

if __name__ == "__main__":
    sys.exit(recipe_main())
