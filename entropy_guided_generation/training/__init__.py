"""The finetune recipe core shared by every entry point: one recipe class
(:class:`CaCFinetuneRecipe`), the config read once (``options``, ``config_keys``), the models it
starts from (``model_setup``), its data (``data_loading``), the single-device/FSDP2 difference
(``parallelism``), the interleaved loss step (``loss_step``), step checkpoints (``checkpointing``) and
resuming from them (``resume``), stopping on SIGTERM/SIGINT (``preemption``), ``kit:`` config paths
(``kit_paths``) and the ``conf/*`` metrics (``metrics``).

``python -m entropy_guided_generation.training --config X.yaml`` trains on one device with the mode
given by ``interleaving.mode``. From Python: ``run_recipe(cfg, mode=None)`` trains and returns the
output folder; ``read_disk_log(cfg.metric_logger.log_dir)`` gives the logged losses per step.
"""
from entropy_guided_generation.training.metrics import read_disk_log
from entropy_guided_generation.training.recipe import CaCFinetuneRecipe, make_recipe_main, run_recipe

__all__ = ["CaCFinetuneRecipe", "make_recipe_main", "read_disk_log", "run_recipe"]
