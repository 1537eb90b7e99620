"""Full mode's prefill of a long few-shot prompt: exact fixed-point bins vs sequential stepping.

A k-shot GSM8K prompt (16 of the kit's problems: about 800 tokens) is interleaved in full mode up to the
first content token two ways, side by side in one run:

- ``fixed point``: ``compute_bins`` on the left-padded prompt (as the decoders call it), then one
  KV-cached forward of the interleaved prompt giving the first content token's logits;
- ``sequential``: the exact baseline, a KV-cached decode through the prompt, one 2-token step
  ``[p_t, c_t]`` per prompt token.

Models: a Llama-3.2-shaped torchtune decoder with the real 128,256-token vocabulary and tiny dims,
random weights sharpened so that entropies spread over the bins (quantile edges fitted on its own
plain signals), the same with torchtune's default small init (near-uniform distributions), and
the kit's trained base (471-token vocabulary, ``entropy_round`` edges). Target (issue 20): fixed
point <= 1.5 x sequential. The table gives passes, how many slots were settled by the passes and
how many by the stepping fallback, and whether both ways found the same bins.

``--model kit`` (default) measures those three; ``--model smollm2`` the kit's SmolLM2-135M-Instruct
(dequantized from Q4_1; 49,152-token vocabulary, ``entropy_round`` edges on its unused specials 3..13,
rows at the mean embedding) on real GSM8K prompts in lm-eval's format (``--gsm8k-shots`` train
examples, then test question i in row i); ``--model kit smollm2`` both.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prefill.py [--shots 16] [--repeats 3] [--batch 1 4]
        [--model kit smollm2] [--gsm8k-shots 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

import real_model
from entropy_guided_generation import kit, signals
from entropy_guided_generation.confidence import ConfidenceCodec, fit_quantile_edges
from entropy_guided_generation.generation.padding import left_pad
from entropy_guided_generation.fixed_point import compute_bins
from entropy_guided_generation.interleaved import confidence_slots
from entropy_guided_generation.modeling import logits_of
from entropy_guided_generation.sessions import kv_session

LLAMA3_VOCAB = 128_256
LLAMA3_CONF_IDS = list(range(128_245, 128_256))  # <|reserved_special_token_234..244|>


def few_shot_prompts(tokenizer, shots: int, batch: int) -> List[List[int]]:
    """``batch`` prompts: ``shots`` worked kit problems then a new question, kit-tokenized."""
    examples = kit.gsm8k_examples(shots + batch, seed=3, split="train")
    context = "".join(kit.prompt_of(ex["question"]) + ex["answer"] + "\n\n" for ex in examples[:shots])
    return [tokenizer.encode(context + kit.prompt_of(ex["question"]), add_bos=False, add_eos=False) for ex in examples[shots:]]


def random_llama3(scale: float):
    """Llama 3.2 architecture, 128,256-token vocabulary, 2 layers of width 64; ``scale`` > 0
    redraws the weights ``scale`` times sharper than a unit-variance init (spread entropies), 0
    keeps torchtune's default init."""
    from torchtune.models.llama3_2 import llama3_2

    torch.manual_seed(0)
    model = llama3_2(
        vocab_size=LLAMA3_VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        intermediate_dim=128, max_seq_len=4096,
    )
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, scale / p.shape[-1] ** 0.5)
            model.tok_embeddings.weight.normal_(0.0, scale)
    return model.eval()


def quantile_codec(model, prompt: torch.Tensor, pad_id: int, conf_ids: List[int]) -> ConfidenceCodec:
    valid = prompt != pad_id
    h = signals.entropy(logits_of(model, prompt, padding_mask=valid), exclude_ids=conf_ids)[valid]
    return ConfidenceCodec(signal="entropy", edges=fit_quantile_edges(h, 11), token_ids=torch.tensor(conf_ids))


def fixed_point_prefill(model, prompt: torch.Tensor, codec: ConfidenceCodec, pad_id: int):
    """Bins by ``compute_bins`` (left-padded, full mode), then the KV-cached prefill of the
    interleaved prompt; returns ``(first content logits [b, v], bins [b, n], result)``."""
    valid = prompt != pad_id
    slots = confidence_slots(prompt, mode="full", valid_mask=valid)
    result = compute_bins(model, prompt, codec=codec, slots=slots, valid_mask=valid, pad_id=pad_id, left_pad=True)
    seq, seq_valid = result.interleaved.tokens, result.interleaved.valid_mask
    with kv_session(model, prompt.shape[0], seq.shape[1]) as session:
        last = torch.full((prompt.shape[0],), seq.shape[1] - 1)
        logits = session.feed(seq, seq_valid, last)
    return logits, result.bins, result


def sequential_prefill(model, prompt: torch.Tensor, codec: ConfidenceCodec, pad_id: int):
    """KV-cached interleaved prefill, one 2-token step ``[p_t, c_t]`` per prompt token after the
    first real one (a left-padded row feeds nothing real until its prompt starts); returns
    ``(first content logits [b, v], bins [b, n])``."""
    b, n = prompt.shape
    valid = prompt != pad_id
    slots = confidence_slots(prompt, mode="full", valid_mask=valid)
    bins = torch.full_like(prompt, -1)
    conf_ids = codec.token_ids
    with kv_session(model, b, 2 * n) as session:
        logits = session.feed(prompt[:, :1], valid[:, :1], torch.zeros(b, dtype=torch.long))
        for t in range(1, n):
            step_bins = codec.bins_from_signal(codec.signal_from_logits(logits))
            bins[:, t] = torch.where(slots[:, t], step_bins, bins[:, t])
            pair = torch.stack([prompt[:, t], conf_ids[step_bins]], dim=1)
            pair_valid = torch.stack([valid[:, t], slots[:, t]], dim=1)
            logits = session.feed(pair, pair_valid, slots[:, t].long())
    return logits, bins


def alternate(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median CPU seconds of this (single-threaded) process for each function, run alternately
    ``repeats`` times after one warm-up round (CPU time: a busy machine slows wall time unevenly)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            if rep:
                times[name].append(time.process_time() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


# A case: (model label, model, codec, left-padded prompt [b, n], pad id).
Case = Tuple[str, torch.nn.Module, ConfidenceCodec, torch.Tensor, int]


def kit_cases(shots: int, batch: int) -> List[Case]:
    """The random 128k-vocabulary Llama-3.2 models and the kit's trained base on a ``shots``-shot kit prompt."""
    tokenizer = kit.load_tokenizer()
    pad_id = tokenizer.pad_id
    prompt = left_pad(few_shot_prompts(tokenizer, shots, batch), pad_id)
    cases = []
    for name, scale in (("random 128k, sharpened", 3.0), ("random 128k, default init", 0.0)):
        model = random_llama3(scale)
        cases.append((name, model, quantile_codec(model, prompt, pad_id, LLAMA3_CONF_IDS), prompt, pad_id))
    trained = kit.load_torchtune_model(kit.trained_base(), max_seq_len=4096).eval()
    kit_codec = ConfidenceCodec.from_config({"signal": "entropy", "edges": {"scheme": "entropy_round"}}, tokenizer=tokenizer)
    cases.append(("trained kit base (471)", trained, kit_codec, prompt, pad_id))
    return cases


def smollm2_cases(shots: int, batch: int) -> List[Case]:
    """SmolLM2-135M-Instruct on ``shots``-shot lm-eval GSM8K prompts (test question i in row i)."""
    tokenizer = real_model.smollm2_tokenizer()
    codec = real_model.smollm2_codec(tokenizer)
    rows = [tokenizer.encode(text, add_bos=False, add_eos=False) for text in real_model.few_shot_prompts(shots, batch)]
    return [("smollm2 (49,152)", real_model.load_smollm2(codec), codec, left_pad(rows, tokenizer.pad_id), tokenizer.pad_id)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=16, help="worked kit problems before the question (--model kit)")
    parser.add_argument("--gsm8k-shots", type=int, default=5, help="real GSM8K train examples before the question (--model smollm2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--model", nargs="+", default=["kit"], choices=real_model.MODELS, help="models measured, one after another")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            cases = []
            if "kit" in args.model:
                cases += kit_cases(args.shots, batch)
            if real_model.SMOLLM2 in args.model:
                cases += smollm2_cases(args.gsm8k_shots, batch)
            for name, model, codec, prompt, pad_id in cases:
                _, fixed_bins, result = fixed_point_prefill(model, prompt, codec, pad_id)
                _, seq_bins = sequential_prefill(model, prompt, codec, pad_id)
                times = alternate(
                    {
                        "fixed": lambda: fixed_point_prefill(model, prompt, codec, pad_id),
                        "sequential": lambda: sequential_prefill(model, prompt, codec, pad_id),
                    },
                    args.repeats,
                )
                rows.append((batch, int((prompt != pad_id).sum(1).max()), name, result, torch.equal(fixed_bins, seq_bins), times))
    shots = " and ".join(
        f"a {n}-shot {what} prompt" for model, n, what in (("kit", args.shots, "kit GSM8K"), (real_model.SMOLLM2, args.gsm8k_shots, "real GSM8K (lm-eval format)"))
        if model in args.model
    )
    print(f"\nfull-mode prefill of {shots} to the first content token; torch threads 1, fp32 CPU, CPU seconds, median of {args.repeats}")
    if real_model.SMOLLM2 in args.model:
        print(f"{real_model.SMOLLM2_ABOUT}; entropy_round bins on its unused specials 3..13, rows at the mean embedding")
    print(f"{'batch':>5} {'tokens':>6}  {'model':<26} {'passes':>6} {'slots/pass':<22} {'stepped':>7} {'same bins':>9} {'fixed s':>8} {'seq s':>7} {'fixed/seq':>9}")
    for batch, n, name, result, same, times in rows:
        per_pass = "/".join(str(s) for s in result.pass_slots[:4]) + ("/..." if len(result.pass_slots) > 4 else "")
        print(
            f"{batch:>5} {n:>6}  {name:<26} {result.passes:>6} {per_pass:<22} {result.stepped_slots:>7} {str(same):>9} "
            f"{times['fixed']:8.3f} {times['sequential']:7.3f} {times['fixed'] / times['sequential']:9.3f}"
        )


if __name__ == "__main__":
    main()
