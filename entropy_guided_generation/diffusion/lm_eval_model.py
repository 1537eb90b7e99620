"""lm-eval model ``diffusion``: a masked-diffusion mask predictor (the kit's, or any folder written by
``diffusion.train``) behind lm-eval's three methods.

    python -m entropy_guided_generation.lm_eval --model diffusion \\
        --model_args decoding=tta,tta_k=5,steps=40,gen_length=40,block_length=8 \\
        --tasks kit_gsm8k --include_path <kit.tasks_dir()>

- ``generate_until``: ``decoding=baseline`` (LLaDA's ``generate``) or ``decoding=tta``
  (``generate_with_tta_uncertainty``), batched over left-padded prompts; the text is cut at the first
  end-of-sequence token and at the request's ``until`` strings.
- ``loglikelihood``: LLaDA's Monte-Carlo estimate with ``mc_num`` masked copies
  (:func:`~entropy_guided_generation.diffusion.likelihood.monte_carlo_loglikelihood`); ``is_greedy``
  is checked by LLaDA's one-token-per-step suffix prediction only with ``check_greedy=True``
  (otherwise False, as LLaDA recommends).
- ``loglikelihood_rolling`` has no masked-diffusion estimate here and raises.

Every model argument is an lm-eval ``--model_args`` key; ``tta_temperature_range`` is written
``low:high`` (commas separate arguments).

Data parallel under torchrun or ``accelerate launch`` (``device=cuda`` is each process's local GPU):
every process serves its share of the documents and rank 0 writes the results. Random draws are
seeded by request (a batch's by its first request), so with ``batch_size=1`` no result depends on
which rank serves a request; larger batches depend on their members, in one process as in several.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Optional

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import normalize_gen_kwargs
from torchtune import utils
from tqdm import tqdm

from entropy_guided_generation.diffusion.decoding import REMASKING_STRATEGIES, generate, predictor_logits
from entropy_guided_generation.diffusion.likelihood import monte_carlo_loglikelihood
from entropy_guided_generation.diffusion.mask_predictor import response_text
from entropy_guided_generation.diffusion.pretrained import load_mask_predictor
from entropy_guided_generation.diffusion.tta import TTAOptions, generate_with_tta_uncertainty
from entropy_guided_generation.eval.distributed import DataParallelLM, join_process_group
from entropy_guided_generation.generation.gen_kwargs import check_sampling_values
from entropy_guided_generation.generation import left_pad

log = logging.getLogger(__name__)

MODEL_NAME = "diffusion"
DECODINGS = ("baseline", "tta")
GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample", "temperature")
"""The request gen_kwargs ``generate_until`` honours."""
_TTA_KEYS = tuple(TTAOptions.__dataclass_fields__)


def parse_temperature_range(value: Any) -> tuple[float, float]:
    """``"0.0:0.3"`` (model_args form) or a pair -> ``(0.0, 0.3)``."""
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 2:
            raise ValueError(f"tta_temperature_range must be written low:high, got {value!r}")
        return float(parts[0]), float(parts[1])
    low, high = value
    return float(low), float(high)


def request_seed(seed: int, args: tuple) -> int:
    """A seed for one request: ``seed`` mixed with a stable hash of the request's arguments."""
    digest = hashlib.sha256(repr((seed, args)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class DiffusionLM(DataParallelLM, LM):
    """lm-eval ``LM`` over a mask predictor folder (default: ``trained_mask_predictor()``).

    Args:
        pretrained: predictor folder (``config.json``, ``model.safetensors``, card, tokenizer files).
        decoding: ``baseline`` or ``tta``.
        steps, gen_length, block_length, temperature, cfg_scale, remasking: LLaDA decoding settings;
            ``max_gen_toks`` of a request shortens ``gen_length`` (rounded up to whole blocks, with
            the same steps per block), never lengthens it.
        mc_num, mc_batch_size: Monte-Carlo copies per ``loglikelihood`` request and per forward.
        check_greedy: compute ``is_greedy`` by suffix prediction (one forward per target token).
        batch_size: prompts per decoding call.
        seed: mixed with a request's arguments (:func:`request_seed`), seeds the decoding of the
            batch that request starts (a private generator; the global RNG for TTA) and the request's
            Monte-Carlo draws.
        **tta: any ``generate_with_tta_uncertainty`` option (``tta_k``, ``remask_top_pct``, ...).
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        decoding: str = "baseline",
        steps: int = 40,
        gen_length: int = 40,
        block_length: int = 8,
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        remasking: str = "low_confidence",
        mc_num: int = 128,
        mc_batch_size: int = 32,
        check_greedy: bool = False,
        batch_size: Any = 16,
        seed: int = 1234,
        device: Optional[str] = None,  # lm-eval's --device; cuda without CUDA falls back to cpu
        max_batch_size: Optional[int] = None,
        **tta: Any,
    ):
        super().__init__()
        if decoding not in DECODINGS:
            raise ValueError(f"unknown decoding {decoding!r}; expected one of {', '.join(DECODINGS)}")
        if remasking not in REMASKING_STRATEGIES:
            raise ValueError(f"unknown remasking {remasking!r}; expected one of {', '.join(REMASKING_STRATEGIES)}")
        unknown = sorted(set(tta) - set(_TTA_KEYS))
        if unknown:
            raise ValueError(f"unknown model_args {', '.join(unknown)}; TTA options are {', '.join(_TTA_KEYS)}")
        if "tta_temperature_range" in tta:
            tta["tta_temperature_range"] = parse_temperature_range(tta["tta_temperature_range"])
        TTAOptions(**tta)  # validate now, not at the first request
        self.model, self.tokenizer, self.ids = load_mask_predictor(pretrained)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %r requested but CUDA is not available; running the diffusion model on cpu", device)
            device = "cpu"
        self._device = utils.get_device(device or "cpu")  # cuda: this process's local GPU
        join_process_group(self._device)
        self.join_ranks()
        self.model.to(self._device)
        self.decoding, self.tta = decoding, tta
        self.steps, self.gen_length, self.block_length = int(steps), int(gen_length), int(block_length)
        self.temperature, self.cfg_scale, self.remasking = float(temperature), float(cfg_scale), remasking
        self.mc_num, self.mc_batch_size, self.check_greedy = int(mc_num), int(mc_batch_size), bool(check_greedy)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.seed = int(seed)
        self.max_length = int(self.model.config.max_position_embeddings)
        self.decode_seconds = 0.0
        self.nfe_total = 0

    # ------------------------------------------------------------ tokenization

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; trailing spaces of the context move to the continuation
        (lm-eval's ``TemplateLM._encode_pair``)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return context_ids, whole[len(context_ids) :]

    # ------------------------------------------------------------ generation

    def _layout(self, max_gen_toks: Optional[int]) -> tuple[int, int]:
        """``(gen_length, steps)`` for a request: ``max_gen_toks`` rounded up to whole blocks, at most ``gen_length``."""
        gen_length = self.gen_length
        if max_gen_toks is not None and int(max_gen_toks) < gen_length:
            gen_length = -(-int(max_gen_toks) // self.block_length) * self.block_length
        steps_per_block = self.steps // (self.gen_length // self.block_length)
        return gen_length, steps_per_block * (gen_length // self.block_length)

    def _decode(self, prompt: torch.Tensor, gen_length: int, steps: int, seed: int) -> tuple[torch.Tensor, dict]:
        common = dict(steps=steps, gen_length=gen_length, block_length=self.block_length, mask_id=self.ids.mask_id)
        if self.decoding == "tta":
            return generate_with_tta_uncertainty(self.model, prompt, seed=seed, **common, **self.tta)
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
        return generate(self.model, prompt, temperature=self.temperature, cfg_scale=self.cfg_scale, remasking=self.remasking, generator=generator, **common)

    def request_settings(self, gen_kwargs: dict) -> dict:
        """A request's gen_kwargs normalized (``max_gen_toks`` from any alias), once checked: only
        keys this model honours (:data:`GEN_KWARGS`; its decoding is set by model_args), valid
        values, and sampling only as model_args decode (``decoding=baseline`` at that temperature).

        Raises:
            ValueError: naming the key or value and what is accepted.
        """
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(
                f"unsupported gen_kwargs {unknown} for --model {MODEL_NAME}; expected some of {', '.join(GEN_KWARGS)} "
                "(decoding is set by model_args: decoding, steps, gen_length, block_length, temperature, remasking, tta_*)"
            )
        check_sampling_values(gen_kwargs)
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.gen_length)
        if kwargs.get("do_sample"):
            wanted = float(kwargs.get("temperature") or 1.0)  # do_sample without a temperature: 1.0, as HF
            if self.decoding != "baseline" or wanted != self.temperature:
                raise ValueError(
                    f"gen_kwargs do_sample=True asks for sampling at temperature {wanted}; --model {MODEL_NAME} samples "
                    f"only as its model_args say (decoding={self.decoding!r}, temperature={self.temperature}): set "
                    f"model_args decoding=baseline,temperature={wanted}, or drop do_sample"
                )
        return kwargs

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """One string per request: the generated text up to the first eos and the first ``until`` string.

        Raises:
            ValueError: before any decoding, on gen_kwargs this model cannot honour (:meth:`request_settings`).
        """
        for request in requests:
            self.request_settings(request.args[1])
        return self.serve_once(requests, lambda served: self._generate_until(served, disable_tqdm))

    def _generate_until(self, requests: list, disable_tqdm: bool) -> list[str]:
        settings = [self.request_settings(r.args[1]) for r in requests]
        out: list[str] = []
        batches = range(0, len(requests), self.batch_size)
        for begin in tqdm(batches, desc=f"diffusion[{self.decoding}] generate", disable=disable_tqdm):
            chunk = requests[begin : begin + self.batch_size]
            kwargs = settings[begin : begin + self.batch_size]
            gen_length, steps = self._layout(max(k["max_gen_toks"] for k in kwargs))
            prompts = [self._encode(r.args[0])[-(self.max_length - gen_length) :] for r in chunk]
            prompt = left_pad(prompts, self.ids.pad_id, device=self.device)
            start = time.perf_counter()
            # seeded by the batch's first request, not its position: the same wherever a rank serves it
            tokens, logs = self._decode(prompt, gen_length, steps, request_seed(self.seed, chunk[0].args))
            self.decode_seconds += time.perf_counter() - start
            self.nfe_total += logs["nfe"] * len(chunk)
            for row, request_kwargs, request in zip(tokens[:, prompt.shape[1] :].tolist(), kwargs, chunk):
                text = response_text(self.tokenizer, row, self.ids)
                until = request_kwargs.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop:
                        text = text.split(stop)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", request.args, text)
        return out

    # ------------------------------------------------------------ likelihood

    @torch.no_grad()
    def suffix_is_greedy(self, prefix: torch.Tensor, target: torch.Tensor) -> bool:
        """LLaDA's check: from the prefix and an all-mask suffix, commit the single most confident
        argmax per forward; True if the result equals ``target``."""
        x = torch.cat([prefix, torch.full_like(target, self.ids.mask_id)]).unsqueeze(0).to(self.device)
        for _ in range(target.numel()):
            masked = x == self.ids.mask_id
            logits = predictor_logits(self.model, x)
            confidence, predicted = torch.softmax(logits, dim=-1).max(dim=-1)
            best = confidence.masked_fill(~masked, -1.0).argmax(dim=-1)
            x[0, best] = predicted[0, best]
        return bool((x[0, prefix.numel() :] == target.to(self.device)).all())

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request, log p by LLaDA's Monte-Carlo estimate."""
        return self.serve_once(requests, lambda served: self._loglikelihood(served, disable_tqdm))

    def _loglikelihood(self, requests: list, disable_tqdm: bool) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="diffusion loglikelihood", disable=disable_tqdm):
            generator = torch.Generator().manual_seed(request_seed(self.seed, request.args))
            context_ids, target_ids = self._encode_pair(*request.args)
            if not target_ids:
                raise ValueError(f"empty continuation for context {request.args[0][-40:]!r}; expected at least one token")
            if len(target_ids) > self.max_length:
                raise ValueError(f"continuation of {len(target_ids)} tokens exceeds the predictor's {self.max_length} positions")
            context_ids = context_ids[len(context_ids) - min(len(context_ids), self.max_length - len(target_ids)) :]
            prefix, target = torch.tensor(context_ids, dtype=torch.long), torch.tensor(target_ids, dtype=torch.long)
            logprob = monte_carlo_loglikelihood(
                self.model, prefix.to(self.device), target.to(self.device), self.ids.mask_id,
                mc_num=self.mc_num, batch_size=self.mc_batch_size, cfg_scale=self.cfg_scale, generator=generator,
            )
            greedy = self.suffix_is_greedy(prefix, target) if self.check_greedy else False
            out.append((logprob, greedy))
            self.cache_hook.add_partial("loglikelihood", request.args, (logprob, greedy))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "the diffusion model has no rolling log-likelihood (masked diffusion gives no left-to-right "
            "factorisation); use loglikelihood or generate_until tasks"
        )


__all__ = ["DECODINGS", "GEN_KWARGS", "MODEL_NAME", "DiffusionLM", "parse_temperature_range", "request_seed"]
