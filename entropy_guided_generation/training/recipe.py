"""The one full-finetune recipe behind every entry point (modes none / full / answer / marker,
single device or FSDP2 under torchrun).

A reader can follow a run top to bottom: ``setup`` builds the model, tokenizer, optimizer, loss,
codec and data; ``train`` walks gradient-accumulation windows of the current epoch, each one
optimizer step of :class:`~entropy_guided_generation.training.loss_step.LossStep`; checkpoints are
written per epoch (Hugging Face weights + ``confidence.json``) and every ``save_every_n_steps``
(resumable step checkpoints); SIGTERM or SIGINT stops the run after the step in flight, saved
(:mod:`~entropy_guided_generation.training.preemption`), and a run holds its ``output_dir``'s lock
(:mod:`~entropy_guided_generation.run_lock`). What differs between one device and many lives in
:mod:`~entropy_guided_generation.training.parallelism`; what differs between modes lives in the
layout's data (which positions are slots), never in this loop.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from entropy_guided_generation.confidence import ConfidenceCodec, ConfidenceMetadata, metadata_for
from entropy_guided_generation.modeling import vocab_size_of
from entropy_guided_generation.run_lock import OutputDirInUseError, RunLock, lock_output_dir
from entropy_guided_generation.training import checkpointing, run_dir
from entropy_guided_generation.training.codec_setup import codec_from_config, fit_quantile_codec, fit_samples, needs_quantile_fit
from entropy_guided_generation.training.config_keys import OPTIONAL_EXTRAS, check_finetune_keys, check_optional_component
from entropy_guided_generation.training.data_checks import MARKER_CHECK_EXAMPLES, check_marker_fraction, count_marker_rows
from entropy_guided_generation.training.data_loading import (
    DEFAULT_COLLATE,
    batch_to_device,
    build_dataloader,
    first_examples,
    validation_dataset_config,
)
from entropy_guided_generation.training.kit_paths import resolve_kit_references
from entropy_guided_generation.training.loss_step import ConfidenceLayout, LossStep
from entropy_guided_generation.training.metrics import ConfidenceStats
from entropy_guided_generation.training.model_setup import (
    add_run_confidence_tokens,
    build_model,
    init_starting_embeddings,
    reference_state,
)
from entropy_guided_generation.training.options import InterleavingOptions, interleaving_options, loop_options
from entropy_guided_generation.training.parallelism import Parallelism, parallelism_from_config
from entropy_guided_generation.training.preemption import RunPreempted, StopSignals, resume_hint
from entropy_guided_generation.training.resume import check_same_position_settings, load_resume_checkpoint

log = utils.get_logger("INFO")


class CaCFinetuneRecipe(FTRecipeInterface):
    """Full finetuning with Confidence-as-Context interleaving.

    Keeps what torchtune's full-finetune recipes give (gradient accumulation with token-normalized
    loss, chunked cross-entropy, activation checkpointing/offloading, ``compile``,
    ``optimizer_in_bwd`` on one device, ``clip_grad_norm``, lr schedulers, metric loggers,
    validation on ``dataset_val``, a Hugging Face checkpoint per epoch, a progress bar) and adds
    exact mid-epoch resume from step checkpoints.

    Args:
        cfg: the merged YAML + command-line config (``kit:`` references already resolved).
        parallel: ``SingleDevice`` or ``FSDP2``.
        interleaving: the mode and its options.
    """

    def __init__(self, cfg: DictConfig, *, parallel: Parallelism, interleaving: InterleavingOptions):
        self._parallel = parallel
        self._interleaving = interleaving
        self._loop = loop_options(cfg)
        self._device = parallel.device
        self._dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("dtype fp16 is not supported for full finetuning; use bf16 or fp32")
        if parallel.distributed and self._loop.optimizer_in_bwd:
            raise ValueError("optimizer_in_bwd is supported by the single-device recipes only; set it to False")
        if self._loop.enable_activation_offloading and self._device.type != "cuda":
            raise ValueError(f"enable_activation_offloading needs device cuda, got {self._device.type}")
        self._output_dir = Path(cfg.output_dir)
        self._output_dir_options = run_dir.output_dir_options(cfg)
        self._config_hash = run_dir.config_hash(cfg)  # names this run in its step checkpoints
        self._run_config = run_dir.hashed_config(cfg)
        self._collate_name = cfg.get("collate_fn", DEFAULT_COLLATE)
        self._step_root = self._output_dir / checkpointing.STEP_CHECKPOINTS_DIRNAME
        self.seed = training.set_seed(seed=cfg.get("seed", None), debug_mode=cfg.get("cudnn_deterministic_mode", None))
        self.total_epochs = self._loop.epochs
        self.epochs_run = 0
        self.global_step = 0
        self._steps_in_epoch = 0
        self._last_saved_step: Optional[int] = None
        self._metric_logger = None
        self._lock: Optional[RunLock] = None
        self._signals = StopSignals()  # installed while train() runs

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        """Take ``output_dir``'s run lock, then build everything; on ``resume_from_checkpoint``
        restore the newest readable step checkpoint of this run, else claim ``output_dir`` for a fresh run."""
        check_optional_component(cfg.optimizer, "optimizer")  # before minutes of checkpoint loading
        self._lock_output_dir()
        if not self._loop.resume_from_checkpoint:
            self._claim_output_dir()
        if self._parallel.is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        self._checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
        resume = self._load_resume_checkpoint() if self._loop.resume_from_checkpoint else None
        base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._vocab_rows = add_run_confidence_tokens(cfg, self._tokenizer, base_state)
        if resume is None:
            init_starting_embeddings(cfg, self._interleaving, self._tokenizer, base_state)
        self._model = self._build_model(cfg.model, resume.model_state if resume else base_state, trainable=True)
        del base_state
        self._optimizer = self._setup_optimizer(cfg.optimizer, resume.optimizer_state if resume else None)

        self._loss_fn = config.instantiate(cfg.loss)
        if self._loop.compile:
            training.compile_loss(self._loss_fn, verbose=self._parallel.is_rank_zero)
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        reference = self._interleaving.reference_checkpoint
        self._reference = (
            self._build_model(cfg.model, reference_state(cfg, reference, self._output_dir), trainable=False)
            if reference is not None
            else None
        )
        self._dataloader = self._setup_dataloader(cfg.dataset, shuffle=self._loop.shuffle)
        val_dataset = validation_dataset_config(cfg)
        self._val_dataloader = self._setup_dataloader(val_dataset, shuffle=False) if val_dataset is not None else None
        self._codec = self._setup_codec(cfg, resume)
        self._stats = ConfidenceStats(self._codec.num_bins, self._device) if self._interleaving.interleaved else None
        layout = self._build_layout() if self._interleaving.interleaved else None
        if layout is not None and layout.interleaving.marker_ids is not None:
            self._check_marker_fraction(layout)
        ctx = training.get_act_offloading_ctx_manager(self._model, self._loop.enable_activation_offloading)
        self._loss_step = LossStep(layout, self._loss_fn, reference=self._reference, activations_ctx=ctx, stats=self._stats)
        self._val_loss_step = LossStep(layout, self._loss_fn, reference=self._reference)

        self._steps_per_epoch = self._count_steps_per_epoch()
        if resume is not None:
            self._restore_progress(resume)
        self._lr_scheduler = self._setup_lr_scheduler(cfg.get("lr_scheduler", None))

    def _build_model(self, cfg_model: DictConfig, state_dict: Dict[str, Any], *, trainable: bool) -> nn.Module:
        return build_model(
            cfg_model, state_dict, vocab_rows=self._vocab_rows, dtype=self._dtype, parallel=self._parallel, loop=self._loop,
            trainable=trainable,
        )

    def _setup_optimizer(self, cfg_optimizer: DictConfig, state: Optional[Dict[str, Any]]) -> Optional[torch.optim.Optimizer]:
        if self._loop.optimizer_in_bwd:
            optimizers = {p: config.instantiate(cfg_optimizer, [p]) for p in self._model.parameters()}
            training.register_optim_in_bwd_hooks(model=self._model, optim_dict=optimizers)
            self._optim_ckpt_wrapper = training.create_optim_in_bwd_wrapper(model=self._model, optim_dict=optimizers)
            if state is not None:
                self._optim_ckpt_wrapper.load_state_dict(state)
            return None
        optimizer = config.instantiate(cfg_optimizer, self._model.parameters())
        if state is not None:
            self._parallel.load_optimizer_state(self._model, optimizer, state)
        return optimizer

    def _setup_dataloader(self, cfg_dataset: Any, *, shuffle: bool) -> DataLoader:
        return build_dataloader(
            cfg_dataset, self._tokenizer, parallel=self._parallel, batch_size=self._loop.batch_size, shuffle=shuffle,
            seed=self.seed, collate_name=self._collate_name, ignore_index=self._loss_fn.ignore_index,
        )

    def _setup_codec(self, cfg: DictConfig, resume: Optional[checkpointing.StepCheckpoint]) -> Optional[ConfidenceCodec]:
        """The codec: from a resumed run's saved metadata, else the ``confidence`` section (quantile
        edges fitted now when not given). Mode none needs no codec but keeps one if configured."""
        if resume is not None and resume.progress.confidence is not None:
            return ConfidenceMetadata(**resume.progress.confidence).to_codec()
        section = cfg.get("confidence", None)
        if section is None:
            if self._interleaving.interleaved:
                raise ValueError(f"interleaving.mode {self._interleaving.name!r} needs a confidence section")
            return None
        codec = codec_from_config(section, self._tokenizer, vocab_size_of(self._model))
        if needs_quantile_fit(section):
            codec = self._fit_quantile_edges(codec, fit_samples(section))
        return codec

    def _first_examples(self, num_examples: int) -> DataLoader:
        return first_examples(self._dataloader, num_examples, self._loop.batch_size)

    def _fit_quantile_edges(self, codec: ConfidenceCodec, num_samples: int) -> ConfidenceCodec:
        """Fit quantile edges on the first ``num_samples`` training examples (same on every rank)."""
        loader = self._first_examples(num_samples)
        layout = self._build_layout(codec)
        batches = (self._to_device(batch) for batch in loader)
        bin_model = self._reference if self._reference is not None else self._model
        fitted = fit_quantile_codec(codec, bin_model, batches, layout.slots, self._tokenizer.pad_id)
        utils.log_rank_zero(log, f"Quantile confidence edges fitted on {len(loader.dataset)} examples: {fitted.edges.tolist()}")
        return fitted

    def _check_marker_fraction(self, layout: ConfidenceLayout) -> None:
        """Fail now when too few of the first training examples hold the marker in their response
        (``interleaving.min_marker_fraction``)."""
        found, total = count_marker_rows(self._first_examples(MARKER_CHECK_EXAMPLES), layout.marker_found)
        check_marker_fraction(
            found,
            total,
            marker=self._interleaving.marker,
            marker_ids=layout.interleaving.marker_ids,
            min_fraction=self._interleaving.min_marker_fraction,
        )
        utils.log_rank_zero(log, f"interleaving.marker {self._interleaving.marker!r} found in {found} of the first {total} training examples.")

    def _build_layout(self, codec: Optional[ConfidenceCodec] = None) -> ConfidenceLayout:
        codec = codec or self._codec
        return ConfidenceLayout(
            self._interleaving.for_tokenizer(self._tokenizer),
            codec,
            pad_id=self._tokenizer.pad_id,
            max_passes=self._interleaving.max_passes,
            ignore_index=self._loss_fn.ignore_index,
        )

    def _count_steps_per_epoch(self) -> int:
        steps = len(self._dataloader) // self._loop.gradient_accumulation_steps
        if steps == 0:
            raise ValueError(
                f"{len(self._dataloader)} batches per epoch are fewer than gradient_accumulation_steps "
                f"{self._loop.gradient_accumulation_steps}: no optimizer step would run"
            )
        if self._loop.max_steps_per_epoch is not None:
            steps = min(steps, self._loop.max_steps_per_epoch)
        return steps

    def _setup_lr_scheduler(self, cfg_lr_scheduler: Optional[DictConfig]) -> Any:
        """The scheduler, positioned at ``global_step`` (torchtune's ``last_epoch`` convention)."""
        if cfg_lr_scheduler is None:
            return None
        optimizer = (
            next(iter(self._optim_ckpt_wrapper.optim_map.values())) if self._loop.optimizer_in_bwd else self._optimizer
        )
        scheduler = config.instantiate(
            cfg_lr_scheduler,
            optimizer,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )
        if self._loop.optimizer_in_bwd:
            self._optim_ckpt_wrapper.set_lr_scheduler(scheduler)
        return scheduler

    # ------------------------------------------------------------------ resume
    def _progress(self) -> checkpointing.TrainingProgress:
        return checkpointing.TrainingProgress(
            global_step=self.global_step,
            epochs_run=self.epochs_run,
            steps_in_epoch=self._steps_in_epoch,
            seed=self.seed,
            mode=self._interleaving.name,
            world_size=self._parallel.world_size,
            batch_size=self._loop.batch_size,
            gradient_accumulation_steps=self._loop.gradient_accumulation_steps,
            max_steps_per_epoch=self._loop.max_steps_per_epoch,
            confidence=metadata_for(
                self._codec, self._interleaving.name, self._interleaving.marker, positions=self._interleaving.positions
            ).__dict__
            if self._codec is not None
            else None,
            config_hash=self._config_hash,
            run_config=self._run_config,
        )

    def _claim_output_dir(self) -> None:
        """A fresh run: refuse an ``output_dir`` holding another run's checkpoints (or, with
        ``overwrite_output_dir``, delete them)."""
        deleted = run_dir.claim_output_dir(
            self._output_dir, self._output_dir_options, is_rank_zero=self._parallel.is_rank_zero, barrier=self._parallel.barrier
        )
        if deleted:
            utils.log_rank_zero(log, f"overwrite_output_dir: deleted the previous run's {', '.join(p.name for p in deleted)} in {self._output_dir}.")
        utils.log_rank_zero(log, f"Run {self._config_hash} starts in {self._output_dir}.")

    def _lock_output_dir(self) -> None:
        """Hold ``output_dir``'s run lock (rank 0) for this run; every rank raises when another
        live run holds it.

        Raises:
            OutputDirInUseError: naming the holding process.
        """
        refused: Optional[OutputDirInUseError] = None
        if self._parallel.is_rank_zero:
            try:
                self._lock = lock_output_dir(self._output_dir, "finetune")
            except OutputDirInUseError as err:
                refused = err
        if not self._all_ranks(refused is None):
            raise refused or OutputDirInUseError(f"output_dir {self._output_dir} is in use by another run (rank 0 says which)")

    def _all_ranks(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (a collective under FSDP2)."""
        flag = torch.tensor([1.0 if ok else 0.0], device=self._device)
        return int(self._parallel.all_reduce_sum(flag).item()) == self._parallel.world_size

    def _load_resume_checkpoint(self) -> checkpointing.StepCheckpoint:
        return load_resume_checkpoint(
            self._step_root, self._parallel, self._all_ranks, config_hash=self._config_hash, run_config=self._run_config,
            output_dir_options=self._output_dir_options,
        )

    def _restore_progress(self, resume: checkpointing.StepCheckpoint) -> None:
        """Take the saved position; refuse settings that would change what the data position means."""
        saved = resume.progress
        check_same_position_settings(resume.path, saved, self._progress())
        if saved.seed != self.seed:
            log.warning(f"seed {self.seed} differs from the checkpoint's {saved.seed}; using the checkpoint's")
        self.seed = saved.seed
        self._dataloader.sampler.seed = saved.seed
        self.global_step, self.epochs_run, self._steps_in_epoch = saved.global_step, saved.epochs_run, saved.steps_in_epoch
        self._last_saved_step = saved.global_step
        checkpointing.set_rng_state(resume.rank_state)

    # ------------------------------------------------------------------ training
    def _accumulation_windows(self, epoch: int) -> Iterator[List[Dict[str, torch.Tensor]]]:
        """This epoch's remaining gradient-accumulation windows (lists of micro-batches), resuming
        after the ``steps_in_epoch`` windows already trained."""
        accumulation = self._loop.gradient_accumulation_steps
        sampler = self._dataloader.sampler
        sampler.set_epoch(epoch)
        sampler.load_state_dict({"yielded": self._steps_in_epoch * accumulation * self._loop.batch_size})
        window: List[Dict[str, torch.Tensor]] = []
        remaining = self._steps_per_epoch - self._steps_in_epoch
        if remaining <= 0:
            return
        for batch in self._dataloader:
            window.append(batch)
            if len(window) == accumulation:
                yield window
                window, remaining = [], remaining - 1
                if remaining == 0:
                    return

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return batch_to_device(batch, self._device)

    def _train_step(self, window: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Forward/backward every micro-batch of a window, then one optimizer step.

        Gradients are summed over the window's target tokens and divided by their global count
        (all ranks, all micro-batches): every target token weighs the same, as in torchtune.

        Returns:
            ``loss`` (mean nats per target token over the window and ranks), ``num_tokens``,
            ``grad_norm`` when clipping.
        """
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        tokens = torch.zeros((), dtype=torch.long, device=self._device)
        for batch in window:
            try:
                step = self._loss_step(self._model, self._to_device(batch))
            except FloatingPointError as err:
                raise FloatingPointError(f"step {self.global_step + 1} (rank {self._parallel.rank}): {err}") from err
            loss_sum += step.loss.detach().double()
            tokens += step.num_tokens
            if self._loop.optimizer_in_bwd:
                global_tokens = self._parallel.all_reduce_sum(step.num_tokens.clone())
                (step.loss * (self._parallel.world_size / global_tokens.clamp(min=1))).backward()
            else:
                step.loss.backward()
        totals = self._parallel.all_reduce_sum(torch.stack([loss_sum, tokens.double()]))
        global_loss, global_tokens = totals[0].item(), int(totals[1].item())
        if global_tokens == 0:
            raise ValueError(f"step {self.global_step + 1}: no target token in the whole batch (all labels ignored)")
        if not math.isfinite(global_loss):
            self._stop_on_non_finite("training loss", global_loss, bool(torch.isfinite(loss_sum)), step=self.global_step + 1)
        metrics = {"loss": global_loss / global_tokens, "num_tokens": float(global_tokens)}
        if not self._loop.optimizer_in_bwd:
            training.scale_grads(self._model, torch.tensor(self._parallel.world_size / global_tokens))
            if self._loop.clip_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=self._loop.clip_grad_norm)
                metrics["grad_norm"] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
                if not math.isfinite(metrics["grad_norm"]):
                    self._stop_on_non_finite("gradient norm", metrics["grad_norm"], None, step=self.global_step + 1)
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return metrics

    def _stop_on_non_finite(self, what: str, value: float, finite_here: Optional[bool], *, step: int) -> None:
        """Raise before ``step`` is checkpointed (a training loss or gradient norm: also, unless
        ``optimizer_in_bwd``, before its optimizer step; a validation loss: after it). Every rank
        gets here together (``value`` is summed over ranks); ``finite_here`` (this rank's own share,
        when known) names the ranks where it went bad.

        Raises:
            FloatingPointError: naming the step, the value and the ranks.
        """
        where = ""
        if finite_here is not None:
            flags = torch.zeros(self._parallel.world_size, dtype=torch.float64, device=self._device)
            flags[self._parallel.rank] = 0.0 if finite_here else 1.0
            ranks = [rank for rank, bad in enumerate(self._parallel.all_reduce_sum(flags).tolist()) if bad]
            where = f" (non-finite on rank {', '.join(map(str, ranks))} of {self._parallel.world_size})"
        saved = f"step {self._last_saved_step}" if self._last_saved_step is not None else "none yet"
        raise FloatingPointError(
            f"step {step} (epoch {self.epochs_run + 1}): the {what} is {value}{where}; stopped, no "
            f"checkpoint holds this step (last step checkpoint: {saved}). Lower the learning rate, "
            "clip gradients (clip_grad_norm) or check the data and starting weights"
        )

    def train(self) -> None:
        """Train until ``epochs`` are done (or ``stop_after_steps``), checkpointing on the way.

        Raises:
            RunPreempted: after SIGTERM or SIGINT, once the step in flight is taken and saved.
        """
        with self._signals:
            self._train_epochs()

    def _train_epochs(self) -> None:
        if self._device.type == "cuda":
            training.cleanup_before_training()
        if self._optimizer is not None:
            self._optimizer.zero_grad()
        if self._loop.compile:
            utils.log_rank_zero(log, "torch.compile is enabled: the first step compiles and is slow.")
        while self.epochs_run < self.total_epochs:
            epoch = self.epochs_run
            bar = tqdm(total=self._steps_per_epoch, initial=self._steps_in_epoch, disable=not self._parallel.is_rank_zero)
            started = time.perf_counter()
            for window in self._accumulation_windows(epoch):
                metrics = self._train_step(window)
                self.global_step += 1
                self._steps_in_epoch += 1
                bar.update(1)
                bar.set_description(f"{epoch + 1}|{self.global_step}|Loss: {metrics['loss']:.4f}")
                elapsed, started = time.perf_counter() - started, time.perf_counter()
                if self.global_step % self._loop.log_every_n_steps == 0:
                    self._log_step(metrics, elapsed)
                if self._validation_due():
                    self._log_validation()
                if self._steps_in_epoch == self._steps_per_epoch:
                    break
                if self._loop.save_every_n_steps and self.global_step % self._loop.save_every_n_steps == 0:
                    self._save_step_checkpoint()
                if self._stop_requested():
                    bar.close()
                    return
            bar.close()
            if self._val_dataloader is not None and not self._loop.run_val_every_n_steps:
                self._log_validation()  # before the epoch's checkpoints: a non-finite loss must not be saved
            self.epochs_run += 1
            self._steps_in_epoch = 0
            self.save_checkpoint(epoch)
            if self._stop_requested(finished=self.epochs_run == self.total_epochs):
                return

    def _validation_due(self) -> bool:
        """Validation after this step: ``run_val_every_n_steps`` divides it (and validation is on)."""
        every = self._loop.run_val_every_n_steps
        return self._val_dataloader is not None and every is not None and self.global_step % every == 0

    def _stop_signal(self) -> int:
        """The stop signal caught on any rank since training began (0: none); a cheap collective
        under FSDP2, so every rank stops after the same step."""
        flag = torch.tensor([self._signals.received or 0], dtype=torch.int32, device=self._device)
        return int(self._parallel.all_reduce_max(flag).item())

    def _stop_on_signal(self, signum: int) -> None:
        """Save this step (unless saved), say where the run stopped and how to resume, and raise.

        Raises:
            RunPreempted: always.
        """
        self._signals.begin_saving()
        if self._last_saved_step != self.global_step:
            self._save_step_checkpoint()
        message = resume_hint(self.global_step, signum, self._step_root / checkpointing.step_dir_name(self.global_step))
        if self._parallel.is_rank_zero:
            log.warning(message)
        raise RunPreempted(message, signum=signum, step=self.global_step)

    def _stop_requested(self, finished: bool = False) -> bool:
        """True once ``stop_after_steps`` is reached (after making sure this step is saved).

        Args:
            finished: the last epoch just ended (a signal then stops nothing: the run is complete).

        Raises:
            RunPreempted: when a rank caught SIGTERM or SIGINT and epochs remain.
        """
        signum = self._stop_signal()
        if signum and not finished:
            self._stop_on_signal(signum)
        if self._loop.stop_after_steps is None or self.global_step < self._loop.stop_after_steps:
            return False
        if self._last_saved_step != self.global_step:
            self._save_step_checkpoint()
        utils.log_rank_zero(log, f"Stopping after step {self.global_step} (stop_after_steps); resume with resume_from_checkpoint=True.")
        return True

    # ------------------------------------------------------------------ logging
    def _log_step(self, metrics: Dict[str, float], seconds: float) -> None:
        """Log the step's metrics on rank 0 (the confidence statistics are summed over ranks first)."""
        log_dict = {
            "loss": metrics["loss"],
            "lr": get_lr(self._optimizer if not self._loop.optimizer_in_bwd else self._optim_ckpt_wrapper),
            "tokens_per_second_per_gpu": metrics["num_tokens"] / (seconds * self._parallel.world_size),
        }
        if "grad_norm" in metrics:
            log_dict["grad_norm"] = metrics["grad_norm"]
        if self._stats is not None:
            self._parallel.all_reduce_sum(self._stats.totals)
            log_dict.update(self._stats.log_dict())
            self._stats.reset()
        if self._loop.log_peak_memory_stats and self._device.type != "cpu":
            log_dict.update(training.get_memory_stats(device=self._device))
        if self._parallel.is_rank_zero:
            self._metric_logger.log_dict(log_dict, step=self.global_step)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss (nats per target token) on ``dataset_val``, over all ranks, with the same
        interleaving and binning as training.

        Raises:
            FloatingPointError: when it is NaN or infinite (as a training loss), naming the step and ranks.
        """
        self._model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        tokens = torch.zeros((), dtype=torch.float64, device=self._device)
        for index, batch in enumerate(self._val_dataloader):
            if self._loop.max_val_batches is not None and index >= self._loop.max_val_batches:
                break
            step = self._val_loss_step(self._model, self._to_device(batch))
            loss_sum += step.loss.double()
            tokens += step.num_tokens.double()
        self._model.train()
        totals = self._parallel.all_reduce_sum(torch.stack([loss_sum, tokens]))
        if totals[1].item() == 0:
            raise ValueError("dataset_val has no target token")
        val_loss = totals[0].item() / totals[1].item()
        if not math.isfinite(val_loss):
            self._stop_on_non_finite("validation loss", val_loss, bool(torch.isfinite(loss_sum)), step=self.global_step)
        return val_loss

    def _log_validation(self) -> None:
        val_loss = self.validate()
        if self._parallel.is_rank_zero:
            self._metric_logger.log_dict({"val_loss": val_loss}, step=self.global_step)

    # ------------------------------------------------------------------ checkpoints
    def _optimizer_state(self) -> Dict[str, Any]:
        if self._loop.optimizer_in_bwd:
            return self._optim_ckpt_wrapper.state_dict()
        return self._parallel.full_optimizer_state_dict(self._model, self._optimizer)

    def _save_step_checkpoint(self, model_state: Optional[Dict[str, Any]] = None) -> None:
        """A resumable checkpoint of this step (every rank calls; collective when sharded)."""
        if model_state is None:
            model_state = self._parallel.full_model_state_dict(self._model)
        checkpointing.save_step_checkpoint(
            self._step_root,
            self._progress(),
            parallel=self._parallel,
            model_state=model_state,
            optimizer_state=self._optimizer_state(),
            keep_last=self._loop.keep_last_n_checkpoints,
        )
        self._last_saved_step = self.global_step
        utils.log_rank_zero(log, f"Step checkpoint {self.global_step} saved under {self._step_root}.")

    def save_checkpoint(self, epoch: int) -> None:
        """End of ``epoch``: the Hugging Face checkpoint ``epoch_<epoch>/`` with ``confidence.json``,
        and a step checkpoint to resume from."""
        model_state = self._parallel.full_model_state_dict(self._model)
        if self._parallel.is_rank_zero:
            folder = checkpointing.save_hf_checkpoint(
                self._checkpointer,
                dict(model_state),
                epoch=epoch,
                output_dir=self._output_dir,
                codec=self._codec,
                mode=self._interleaving.name,
                marker=self._interleaving.marker,
                positions=self._interleaving.positions,
                tokenizer=self._tokenizer,
            )
            log.info(f"Epoch {epoch} checkpoint written to {folder}.")
        self._parallel.barrier()
        self._save_step_checkpoint(model_state)

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        if self._lock is not None:
            self._lock.release()
        self._parallel.close()


def run_recipe(cfg: DictConfig, mode: Optional[str] = None, *, distributed: bool = False) -> Path:
    """Train as the entry points do, from Python: resolve ``kit:`` paths and the mode, then set up,
    train and clean up.

    The loss history goes to the config's metric logger; with torchtune's ``DiskLogger`` (the
    tiny configs' choice) read it back with
    :func:`~entropy_guided_generation.training.metrics.read_disk_log` on
    ``cfg.metric_logger.log_dir``: ``{step: {"loss": ..., "lr": ..., "conf/...": ..., "val_loss": ...}}``.

    Args:
        cfg: merged config, e.g. ``OmegaConf.load("configs/tiny/answer_single_device.yaml")`` with
            overrides merged in (``OmegaConf.merge(cfg, {"output_dir": ...})``).
        mode: the entry point's mode (None: ``interleaving.mode`` decides; both given and different
            is an error naming both).
        distributed: FSDP2 under torchrun (True) or one device.

    Returns:
        ``cfg.output_dir``: it holds ``epoch_<N>/`` (Hugging Face weights + ``confidence.json``) and
        ``step_checkpoints/``.

    Raises:
        RunPreempted: SIGTERM or SIGINT stopped the run after a step, which was saved (resume it
            with ``resume_from_checkpoint=True``); the entry points exit with its ``exit_status``.
        OutputDirInUseError: another live run holds ``output_dir`` (the error names its process).
    """
    check_finetune_keys(cfg)
    cfg = resolve_kit_references(cfg)
    interleaving = interleaving_options(cfg, mode)
    parallel = parallelism_from_config(cfg, distributed)
    config.log_config(recipe_name=f"CaCFinetuneRecipe[{interleaving.name}, {'FSDP2' if distributed else 'single device'}]", cfg=cfg)
    recipe = CaCFinetuneRecipe(cfg, parallel=parallel, interleaving=interleaving)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    return Path(cfg.output_dir)


def make_recipe_main(mode: Optional[str], distributed: bool) -> Callable[[], Any]:
    """The ``recipe_main`` of an entry point: parses ``--config`` and ``key=value`` overrides
    (torchtune's ``config.parse``) and runs :func:`run_recipe` with this entry point's mode."""

    def recipe_main(cfg: DictConfig) -> int:
        try:
            run_recipe(cfg, mode=mode, distributed=distributed)
        except RunPreempted as stopped:
            return stopped.exit_status  # 143 after SIGTERM, 130 after SIGINT (the log said how to resume)
        return 0

    label = mode or "interleaving.mode from the config"
    recipe_main.__doc__ = (
        f"Confidence-as-Context full finetune ({label}; {'FSDP2, launch with torchrun' if distributed else 'single device'})."
    )
    return config.parse(recipe_main)


__all__ = [
    "OPTIONAL_EXTRAS",
    "CaCFinetuneRecipe",
    "check_optional_component",
    "make_recipe_main",
    "run_recipe",
    "validation_dataset_config",
]
