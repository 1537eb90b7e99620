"""Full finetune with full interleaving (every token after the first, prompt included), distributed with FSDP2.

Run: ``tune run --nproc_per_node N recipes/full_finetune_distributed_full_intl.py --config X.yaml`` (FSDP2).
"""
import sys

from entropy_guided_generation.training import make_recipe_main

recipe_main = make_recipe_main(mode="full", distributed=True)

if __name__ == "__main__":
    sys.exit(recipe_main())
