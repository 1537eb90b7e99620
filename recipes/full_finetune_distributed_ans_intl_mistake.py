"""tune-run entry: ``tune run --nproc_per_node N recipes/full_finetune_distributed_ans_intl_mistake.py --config X.yaml``
(interleaving.mode marker); the recipe is :mod:`entropy_guided_generation.full_finetune_distributed_ans_intl_mistake`."""
import sys

from entropy_guided_generation.full_finetune_distributed_ans_intl_mistake import recipe_main

if __name__ == "__main__":
    sys.exit(recipe_main())
