"""The finetune recipes end to end, launched the way users launch them (``tune run``, ``tune run
--nproc_per_node 2``, ``python -m``, and ``run_recipe`` from Python) on the tiny CPU configs.

Invariants: every mode's loss goes down on repeated data and logs its binning; mode none equals
torchtune's stock recipe step for step; 2-process FSDP2 (gloo) equals one device; a run stopped
mid-epoch and resumed equals an uninterrupted one bit for bit; the saved checkpoint loads in
transformers and in our decoders and carries a ``confidence.json`` that matches the config; an
entry point and a YAML that disagree on the mode are refused.

Each test shares its subprocess runs across several assertions to keep the file fast.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from entropy_guided_generation.confidence import ConfidenceCodec, check_config_matches, encode_text, read_confidence_json
from entropy_guided_generation.training import read_disk_log, run_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
# The same 8 examples in one batch at every step: the loss must go down. (The tiny configs warm the
# lr up from 0 as torchtune's cosine schedule does, so step 1 changes nothing and step 2 repeats its loss.)
REPEATED_BATCH = ["dataset.split=train[:8]", "epochs=3", "max_steps_per_epoch=1", "max_val_batches=1"]
KIT_CODEC = {"edges": {"scheme": "entropy_round"}, "tokens": {"preset": "kit"}}
PROMPT = "Ann has 3 pens. She buys 2 more. How many pens does she have now?\n"


def run(command: List[str], env: Dict[str, str], timeout: int = 300) -> str:
    """Run a recipe from the repository root; fail the test with its output if it fails."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}")
    return done.stdout + done.stderr


def config_args(name: str, out: Path, *overrides: str) -> List[str]:
    return ["--config", f"configs/tiny/{name}.yaml", f"output_dir={out}", f"metric_logger.log_dir={out}/logs", *overrides]


def tiny_config(name: str, out: Path, *overrides: str):
    """The tiny config with the same overrides as :func:`config_args`, for ``run_recipe``."""
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / f"{name}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"output_dir={out}", f"metric_logger.log_dir={out}/logs", *overrides]))


def losses(out: Path) -> List[float]:
    logged = read_disk_log(out / "logs")
    return [logged[step]["loss"] for step in sorted(logged) if "loss" in logged[step]]


def weights(folder: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.fixture(scope="module")
def kit_tokenizer(kit_cache):
    from entropy_guided_generation import kit

    return kit.load_tokenizer()


def check_confidence_json(folder: Path, mode: str, tokenizer, marker=None) -> None:
    """``confidence.json`` says what the tiny config asked for (mode, edges, tokens, marker)."""
    meta = read_confidence_json(folder)
    check_config_matches(meta, mode=mode, codec=ConfidenceCodec.from_config(KIT_CODEC, tokenizer), marker=marker)
    assert (meta.mode, meta.marker, meta.edge_scheme) == (mode, marker, "entropy_round")
    assert meta.token_strings == [f"<|conf_{k}|>" for k in range(11)]


def check_bin_stats(step_metrics: Dict[str, float]) -> None:
    assert 1.0 <= step_metrics["conf/passes_mean"] <= 4.0 and step_metrics["conf/slots"] > 0
    assert sum(step_metrics[f"conf/bin_{k:02d}"] for k in range(11)) == pytest.approx(1.0)


def check_checkpoint_loads_in_transformers_and_decoders(folder: Path, tokenizer) -> None:
    """Same logits from transformers and from torchtune's checkpointer; our decoder of the saved
    mode runs on it with the codec read back from ``confidence.json`` and interleaves as trained."""
    from transformers import AutoModelForCausalLM

    from entropy_guided_generation import kit
    from entropy_guided_generation.generation import get_decoder

    prompt = torch.tensor([tokenizer.encode(PROMPT, add_eos=False)])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = kit.load_torchtune_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(prompt), hf(prompt).logits, rtol=1e-4, atol=1e-4)
    meta = read_confidence_json(folder)
    codec = meta.to_codec()
    extra = {"marker": encode_text(meta.marker, tokenizer)} if meta.mode == "marker" else {}
    result = get_decoder(meta.mode)(
        ours, prompt, max_generated_tokens=6, pad_id=tokenizer.pad_id, temperature=0.0,
        stop_tokens=tokenizer.stop_tokens, codec=codec, **extra,
    )
    generated = result.interleaved[0, prompt.shape[1] :]
    # No marker or stop token among 6 random-model tokens is likely, so every content token is
    # followed by its confidence token; whichever happens, confidence tokens are never content.
    assert not codec.is_confidence_token(result.tokens).any()
    assert codec.is_confidence_token(generated).any()


def test_full_mode_learns_a_repeated_batch_and_logs_its_bins(tmp_path, subprocess_env, kit_tokenizer):
    """Also with torchtune's memory savers on: optimizer in backward, activation checkpointing."""
    out = tmp_path / "full"
    savers = ["optimizer_in_bwd=True", "clip_grad_norm=null", "enable_activation_checkpointing=True"]
    run(
        [TUNE, "run", "recipes/full_finetune_single_device_full_intl.py"]
        + config_args("full_single_device", out, *REPEATED_BATCH, "batch_size=8", *savers),
        subprocess_env,
    )
    logged = read_disk_log(out / "logs")
    curve = losses(out)
    assert len(curve) == 3 and curve[2] < curve[1] - 1e-3 and curve[1] <= curve[0], curve
    for step in (1, 2, 3):
        check_bin_stats(logged[step])
    assert "val_loss" in logged[3]
    check_confidence_json(out / "epoch_2", "full", kit_tokenizer)


def test_marker_two_process_fsdp2_matches_one_device(tmp_path, subprocess_env, kit_tokenizer):
    """2 ranks x 4 examples == 1 device x 8 examples, on a repeated batch, from the kit's mixed-format
    base (a trained model whose bins vary: a run on a near-uniform model would compare constants):
    step 1 loss to 1e-6 relative (same weights, same tokens, summed in another order), later steps and
    validation to 1e-5, the same confidence statistics summed over ranks (bin histogram included, which
    spreads over several bins), final weights to 1e-4 absolute. The loss goes down in both, and the
    FSDP2 checkpoint loads in transformers and the marker decoder."""
    from entropy_guided_generation.kit.train_base import mixed_format_base

    single, dist = tmp_path / "single", tmp_path / "dist"
    base = f"checkpointer.checkpoint_dir={mixed_format_base('sequential')}"
    # The one-device reference runs in this process, through the Python entry the demo uses.
    run_recipe(tiny_config("marker_single_device", single, *REPEATED_BATCH, "batch_size=8", base), mode="marker")
    run(
        [TUNE, "run", "--nproc_per_node", "2", "recipes/full_finetune_distributed_ans_intl_mistake.py"]
        + config_args("marker_distributed", dist, *REPEATED_BATCH, "batch_size=4", base),
        subprocess_env,
    )
    one, two = read_disk_log(single / "logs"), read_disk_log(dist / "logs")
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-6)
    for step in (2, 3):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)
    histogram = [f"conf/bin_{k:02d}" for k in range(11)]
    for step in (1, 2, 3):
        check_bin_stats(two[step])
        assert two[step]["conf/slots"] == one[step]["conf/slots"]
        # (Passes are counted per micro-batch: a rank's 4 rows may settle in fewer than the device's 8.)
        assert two[step]["conf/signal_mean"] == pytest.approx(one[step]["conf/signal_mean"], rel=1e-5)
        assert two[step]["conf/marker_found_fraction"] == one[step]["conf/marker_found_fraction"] == 1.0
        assert [two[step][k] for k in histogram] == pytest.approx([one[step][k] for k in histogram], abs=1e-9)
        assert sum(one[step][k] > 0 for k in histogram) >= 2 and max(one[step][k] for k in histogram) < 0.95, one[step]
    assert two[3]["val_loss"] == pytest.approx(one[3]["val_loss"], rel=1e-5)
    assert losses(dist)[-1] < losses(dist)[0] and losses(single)[-1] < losses(single)[0]
    w1, w2 = weights(single / "epoch_2"), weights(dist / "epoch_2")
    assert w1.keys() == w2.keys()
    for name in w1:
        # AdamW divides by sqrt(v): on a trained model some gradients are ~0, where summing in another
        # order moves an update by a few 1e-5 (lr 1e-3); a wrong shard or a missing all-reduce moves ~lr.
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)
    check_confidence_json(dist / "epoch_2", "marker", kit_tokenizer, marker="####")
    check_checkpoint_loads_in_transformers_and_decoders(dist / "epoch_2", kit_tokenizer)


def test_marker_on_bigbench_mistake_traces_learns_and_finds_the_marker(tmp_path, kit_tokenizer):
    """The BIG-Bench-Mistake-format config (from Python, as the demo runs it): every trace's
    marker is found inside its response, so thoughts are interleaved and the answer is plain."""
    out = tmp_path / "bbm"
    run_recipe(tiny_config("marker_bigbench_single_device", out, *REPEATED_BATCH, "batch_size=8"))
    logged = read_disk_log(out / "logs")
    curve = losses(out)
    assert len(curve) == 3 and curve[2] < curve[0] - 1e-3, curve
    for step in (1, 2, 3):
        check_bin_stats(logged[step])
        assert logged[step]["conf/marker_found_fraction"] == 1.0
    check_confidence_json(out / "epoch_2", "marker", kit_tokenizer, marker="So the answer is:")


def test_answer_run_stopped_mid_epoch_and_resumed_equals_uninterrupted_run(tmp_path, subprocess_env, kit_tokenizer):
    """Same 8 examples each epoch, 2 steps of 2 x 2 (gradient accumulation 2), 3 epochs. Stopped
    after step 3 (mid-epoch, shuffled data), a crashed half-written save of step 4 left beside it,
    and resumed in a new process: losses and final weights
    are bit-identical to the uninterrupted run (here in this process, through ``run_recipe``). The
    uninterrupted run also shows the loss going down, validation each epoch, and a checkpoint that
    loads in transformers and our decoder."""
    full, split = tmp_path / "full", tmp_path / "split"
    args = ["dataset.split=train[:8]", "batch_size=2", "gradient_accumulation_steps=2", "max_steps_per_epoch=2", "epochs=3", "max_val_batches=1"]
    run_recipe(tiny_config("answer_single_device", full, *args), mode="answer")
    # Token-normalized gradient accumulation: 2 micro-batches of 2 == one batch of the same 4 examples.
    one_batch = tmp_path / "one_batch"
    run_recipe(tiny_config("answer_single_device", one_batch, *args, "batch_size=4", "gradient_accumulation_steps=1"), mode="answer")
    run([sys.executable, "-m", "entropy_guided_generation.full_finetune_single_device_ans_intl"] + config_args("answer_single_device", split, *args, "stop_after_steps=3"), subprocess_env)
    reference = losses(full)
    assert len(reference) == 6 and sum(reference[4:]) < sum(reference[:2]), reference
    logged = read_disk_log(full / "logs")
    assert all("val_loss" in logged[step] for step in (2, 4, 6))
    for step in range(1, 7):
        check_bin_stats(logged[step])
    assert losses(one_batch) == pytest.approx(reference, rel=1e-5)
    for name, value in weights(one_batch / "epoch_2").items():
        torch.testing.assert_close(value, weights(full / "epoch_2")[name], rtol=0, atol=1e-5)
    assert losses(split) == reference[:3]
    assert (split / "epoch_0").is_dir() and not (split / "epoch_1").exists()

    # A save of step 4 that crashed half-way: resume must ignore it and start from step 3.
    crashed = split / "step_checkpoints" / "step_00000004.partial"
    crashed.mkdir()
    (crashed / "model.pt").write_bytes(b"truncated")
    run([TUNE, "run", "recipes/full_finetune_single_device_ans_intl.py"] + config_args("answer_single_device", split, *args, "resume_from_checkpoint=True"), subprocess_env)
    assert not crashed.exists()
    assert sorted(step for step, m in read_disk_log(split / "logs").items() if "loss" in m) == [1, 2, 3, 4, 5, 6]
    assert losses(split) == reference
    final = weights(full / "epoch_2")
    resumed = weights(split / "epoch_2")
    for name, value in final.items():
        assert torch.equal(resumed[name], value), name
    check_confidence_json(full / "epoch_2", "answer", kit_tokenizer)
    check_checkpoint_loads_in_transformers_and_decoders(full / "epoch_2", kit_tokenizer)


def load_stock_recipe_class():
    """torchtune's ``FullFinetuneRecipeSingleDevice`` from its recipe file (our ``recipes``
    package shadows torchtune's on ``sys.path``)."""
    import torchtune

    path = Path(torchtune.__file__).resolve().parents[1] / "recipes" / "full_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("torchtune_stock_full_finetune_single_device", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FullFinetuneRecipeSingleDevice


def test_mode_none_from_python_equals_torchtunes_stock_recipe(tmp_path, kit_cache):
    """``run_recipe`` (the Python entry the demo uses) in mode none logs the same losses as
    torchtune's own single-device recipe on the same config, and writes its checkpoint."""
    from entropy_guided_generation.training.kit_paths import resolve_kit_references

    def tiny_none(out: Path):
        return tiny_config("none_single_device", out, "max_steps_per_epoch=3", "epochs=1")

    ours, stock = tmp_path / "ours", tmp_path / "stock"
    assert run_recipe(tiny_none(ours), mode=None) == ours
    stock_cfg = resolve_kit_references(tiny_none(stock))
    recipe = load_stock_recipe_class()(cfg=stock_cfg)
    recipe.setup(cfg=stock_cfg)
    recipe.train()
    recipe.cleanup()
    assert len(losses(ours)) == 3
    assert losses(ours) == pytest.approx(losses(stock), rel=1e-6)
    assert (ours / "epoch_0" / "config.json").is_file()
    # Every finetune records its mode, none included (no confidence section: no codec) ...
    meta = read_confidence_json(ours / "epoch_0")
    assert meta.mode == "none" and not meta.has_codec
    # ... so an eval config asking for another mode is refused, naming both.
    from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect

    eval_cfg = OmegaConf.load(REPO / "configs" / "tiny" / "eval_answer.yaml")
    eval_cfg.merge_with({"output_dir": str(tmp_path / "eval"), "checkpointer": {"checkpoint_dir": str(ours / "epoch_0")}})
    with pytest.raises(ValueError, match=r"config interleaving.mode is 'answer' but .*epoch_0/confidence.json says 'none'"):
        EleutherEvalRecipeDirect(eval_cfg).setup(eval_cfg)


def short_none_run(out: Path, *overrides: str):
    """Mode none from Python on 32 examples: 4 steps of 8, a step checkpoint after each (2 kept)."""
    return tiny_config(
        "none_single_device", out, "dataset.split=train[:32]", "max_steps_per_epoch=4", "save_every_n_steps=1", "dataset_val=null", *overrides
    )


def step_folders(out: Path) -> List[str]:
    return sorted(p.name for p in (out / "step_checkpoints").iterdir())


def test_output_dir_belongs_to_one_run_and_resume_names_it(tmp_path, caplog):
    """Run A stops after step 3. A fresh run B in A's folder is refused before it writes anything;
    a resume under a changed config is refused naming both runs and what changed; with the newest
    checkpoint corrupt, a resume that names A's hash starts from the previous one, saying so;
    ``overwrite_output_dir`` starts over."""
    out = tmp_path / "run"
    run_recipe(short_none_run(out, "stop_after_steps=3"))
    assert step_folders(out) == ["step_00000002", "step_00000003"]
    run_a = json.loads((out / "step_checkpoints" / "step_00000003" / "progress.json").read_text())["config_hash"]

    with pytest.raises(FileExistsError, match=rf"output_dir {out} holds another run's checkpoints \(step_checkpoints/step_00000002, .*\); continue that run with resume_from_checkpoint=True, start over with overwrite_output_dir=True"):
        run_recipe(short_none_run(out, "optimizer.lr=0.01"))
    assert step_folders(out) == ["step_00000002", "step_00000003"] and not (out / "epoch_0").exists()

    with pytest.raises(ValueError, match=rf"written by run '{run_a}', and this config \(hash 'cfg-\w+'\) differs in optimizer.lr: 0.001 -> 0.01\. Resume it anyway with resume_config_hash={run_a}"):
        run_recipe(short_none_run(out, "resume_from_checkpoint=True", "optimizer.lr=0.01"))

    model_file = out / "step_checkpoints" / "step_00000003" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        run_recipe(short_none_run(out, "resume_from_checkpoint=True", "optimizer.lr=0.01", f"resume_config_hash={run_a}"))
    assert re.search(r"resuming from the previous complete checkpoint \S*step_00000002 instead of \S*step_00000003", caplog.text)
    assert f"resuming run {run_a}" in caplog.text and "optimizer.lr: 0.001 -> 0.01" in caplog.text
    assert step_folders(out) == ["step_00000003", "step_00000003.corrupt", "step_00000004"]  # step 3 redone
    run_b = json.loads((out / "step_checkpoints" / "step_00000004" / "progress.json").read_text())["config_hash"]
    assert run_b != run_a and read_confidence_json(out / "epoch_0").mode == "none"

    run_recipe(short_none_run(out, "overwrite_output_dir=True", "max_steps_per_epoch=2"))
    assert step_folders(out) == ["step_00000001", "step_00000002"]


def test_non_finite_loss_stops_the_run_before_its_checkpoint(tmp_path):
    """lr 1e30 blows the weights up after step 2 (step 1 has lr 0 under the warm-up)."""
    out = tmp_path / "blowup"
    with pytest.raises(FloatingPointError, match=r"step 3 \(epoch 1\): the training loss is (nan|inf) \(non-finite on rank 0 of 1\); .*last step checkpoint: step 2"):
        run_recipe(short_none_run(out, "optimizer.lr=1e30", "clip_grad_norm=null"))
    assert step_folders(out) == ["step_00000001", "step_00000002"] and not (out / "epoch_0").exists()


def test_marker_missing_from_the_data_fails_at_setup_naming_it(tmp_path):
    """The kit's GSM8K responses carry '####', not the configured marker: training would
    interleave every response whole, as mode answer."""
    cfg = tiny_config("marker_single_device", tmp_path / "m", "dataset.split=train[:32]")
    cfg.interleaving.marker = "So the answer is:"
    with pytest.raises(ValueError, match=r"interleaving.marker 'So the answer is:' \(token ids \[[\d, ]+\]\) occurs in the response of only 0 of the first 32 training examples \(0%\)"):
        run_recipe(cfg)
    assert not (tmp_path / "m" / "step_checkpoints").exists()


def test_entry_point_and_yaml_mode_conflict_is_an_error_naming_both(monkeypatch):
    """The answer entry point, run as users run it (argv parsed by torchtune), refuses a YAML
    whose ``interleaving.mode`` is full."""
    import entropy_guided_generation.full_finetune_single_device_ans_intl as entry

    monkeypatch.setattr(sys, "argv", ["full_finetune_single_device_ans_intl", "--config", str(REPO / "configs/tiny/full_single_device.yaml")])
    with pytest.raises(ValueError, match=r"entry point trains interleaving.mode 'answer' but the config sets interleaving.mode 'full'"):
        entry.recipe_main()


def test_documented_options_reach_confidence_json_and_the_eval_recipe(tmp_path, subprocess_env):
    """One finetune through ``python -m entropy_guided_generation.training`` (mode from YAML) with
    ``confidence.edges.scheme: quantile``, ``interleaving.reference_checkpoint`` (the kit's plain trained
    base, whose entropies differ from the mixed-format base's), ``init_confidence_embeddings: mean`` and
    ``positions: shared``, from the mixed-format base pretrained with shared positions; one step at
    the warmup's lr 0, so the saved weights are the base's with the initialized rows. Then
    ``python -m entropy_guided_generation.eleuther_eval`` on that checkpoint.

    Wiring properties: the quantile edges in ``confidence.json`` are the quantiles of the *reference*
    model's plain-context entropies at the slots of the first ``fit_samples`` training examples; the
    saved confidence rows are the mean of the base's other rows and every other weight is the base's;
    ``confidence.json`` records shared positions, and the eval recipe decodes with them: its traces
    equal token-by-token teacher forcing with shared positions and the saved edges."""
    from entropy_guided_generation import kit
    from entropy_guided_generation.data import gsm8k_dataset
    from entropy_guided_generation.kit.train_base import mixed_format_base
    from entropy_guided_generation.training.kit_paths import resolve_kit_reference

    from references import teacher_force_stepwise

    base, reference = mixed_format_base("shared"), kit.trained_base()
    out, fit_samples = tmp_path / "train", 8
    options = [
        "interleaving.mode=answer", "interleaving.positions=shared", f"interleaving.reference_checkpoint={reference}",
        "interleaving.init_confidence_embeddings=mean", "confidence.edges.scheme=quantile", f"confidence.edges.fit_samples={fit_samples}",
        f"checkpointer.checkpoint_dir={base}", "epochs=1", "max_steps_per_epoch=1", "batch_size=4", "max_val_batches=1",
    ]
    run([sys.executable, "-m", "entropy_guided_generation.training"] + config_args("answer_single_device", out, *options), subprocess_env)
    meta = read_confidence_json(out / "epoch_0")
    assert (meta.mode, meta.positions, meta.edge_scheme) == ("answer", "shared", "quantile")

    # Quantile edges: the reference model's pass-0 entropies at the answer slots of the first examples.
    cfg = tiny_config("answer_single_device", out)
    tokenizer = kit.load_tokenizer(max_seq_len=cfg.tokenizer.max_seq_len, folder=base)
    dataset = gsm8k_dataset(tokenizer, data_files=resolve_kit_reference(cfg.dataset.data_files),
                            prompt_template=cfg.dataset.prompt_template, response_template=cfg.dataset.response_template)
    ref_model = kit.load_torchtune_model(reference)
    conf_ids = torch.tensor(meta.token_ids)
    signals = []
    for k in range(fit_samples):
        tokens, labels = torch.tensor(dataset[k]["tokens"]), torch.tensor(dataset[k]["labels"])
        with torch.no_grad():
            logits = ref_model(tokens.unsqueeze(0))[0].double()
        logits[:, conf_ids] = float("-inf")
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp.clamp(min=-1e300)).sum(-1)
        slots = (labels != -100) & ~torch.isin(tokens, torch.tensor(tokenizer.stop_tokens))
        signals.append(entropy[:-1][slots[1:]])  # the logits at t - 1 produced token t
    expected = torch.quantile(torch.cat(signals), torch.arange(1, 11, dtype=torch.float64) / 11)
    torch.testing.assert_close(torch.tensor(meta.edges, dtype=torch.float64), expected, atol=1e-5, rtol=0)

    # init_confidence_embeddings: mean, at lr 0: the base's weights with mean confidence rows.
    saved, original = weights(out / "epoch_0"), load_file(str(base / "model.safetensors"))
    embed = "model.embed_tokens.weight"
    others = torch.ones(original[embed].shape[0], dtype=torch.bool)
    others[conf_ids] = False
    torch.testing.assert_close(saved[embed][conf_ids], original[embed][others].mean(0).expand(len(conf_ids), -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(saved[embed][others], original[embed][others], rtol=0, atol=0)
    for name in original:
        if name != embed:
            torch.testing.assert_close(saved[name], original[name], rtol=0, atol=0, msg=name)

    # The eval recipe reads the shared positions and the quantile codec from confidence.json.
    evaluated = tmp_path / "eval"
    run([sys.executable, "-m", "entropy_guided_generation.eleuther_eval", "--config", "configs/tiny/eval_answer.yaml",
         f"checkpointer.checkpoint_dir={out / 'epoch_0'}", f"checkpointer.checkpoint_files=[{next((out / 'epoch_0').glob('*.safetensors')).name}]",
         f"output_dir={evaluated}", "~confidence", "tasks=[kit_gsm8k]", "limit=3", "max_gen_toks=12", "bootstrap_iters=0"], subprocess_env)
    finetuned = kit.load_torchtune_model(out / "epoch_0")
    samples = {json.loads(line)["doc_id"]: json.loads(line) for line in next(evaluated.glob("samples_kit_gsm8k_*.jsonl")).read_text().splitlines()}
    traces = [json.loads(line) for line in next(evaluated.glob("confidence_traces_kit_gsm8k_*.jsonl")).read_text().splitlines()]
    bins = []
    for trace in traces:
        context = tokenizer.encode(samples[trace["doc_id"]]["arguments"]["gen_args_0"]["arg_0"], add_bos=False, add_eos=False)
        expected_trace = teacher_force_stepwise(finetuned, context, trace["tokens"], conf_ids=meta.token_ids, edges=meta.edges,
                                                stop_ids=tokenizer.stop_tokens, positions="shared")
        assert trace["bins"] == expected_trace["bins"], trace["doc_id"]
        torch.testing.assert_close(torch.tensor(trace["logprob"]), torch.tensor(expected_trace["logprob"]), atol=2e-4, rtol=0)
        bins += [b for b in trace["bins"] if b >= 0]
    assert len(traces) == 3 and len(set(bins)) > 1


TINY_BUDGET = ["dataset.split=train[:8]", "epochs=1", "max_steps_per_epoch=1", "batch_size=2", "max_val_batches=1"]


def test_plain_context_trains_from_one_plain_pass_and_the_eval_recipe_decodes_it(tmp_path):
    """``confidence.context: plain`` in mode full (prompts interleaved too), from Python's ``run_recipe``:
    every micro-batch's bins come from one forward, ``confidence.json`` records the context, and the eval
    recipe (reading it from there) decodes with a plain twin per row: its traces equal token-by-token
    teacher forcing whose signal reads the plain prefix, prompt bins included."""
    from entropy_guided_generation import kit
    from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect

    from references import teacher_force_stepwise

    out = tmp_path / "train"
    run_recipe(tiny_config("full_single_device", out, *TINY_BUDGET, "confidence.context=plain", "optimizer.lr=0.0"))
    meta = read_confidence_json(out / "epoch_0")
    assert (meta.mode, meta.context) == ("full", "plain")
    log = read_disk_log(out / "logs")
    passes = [row["conf/passes_mean"] for row in log.values() if "conf/passes_mean" in row]
    assert passes and set(passes) == {1.0}, passes

    eval_cfg = OmegaConf.load(REPO / "configs" / "tiny" / "eval_full.yaml")
    eval_cfg.pop("confidence", None)
    eval_cfg.merge_with({"output_dir": str(tmp_path / "eval"), "tasks": ["kit_gsm8k"], "limit": 3, "max_gen_toks": 12,
                         "bootstrap_iters": 0,
                         "checkpointer": {"checkpoint_dir": str(out / "epoch_0"), "checkpoint_files": [next((out / "epoch_0").glob("*.safetensors")).name]}})
    recipe = EleutherEvalRecipeDirect(eval_cfg)
    recipe.setup(eval_cfg)
    summary = recipe.evaluate()
    lm = recipe.lm
    assert lm.codec.context == "plain"
    finetuned = kit.load_torchtune_model(out / "epoch_0")
    contexts = {s["doc_id"]: s["arguments"][0][0] for s in summary["lm_eval"]["samples"]["kit_gsm8k"]}
    traces = [t for t in lm.traces if t.request_type == "generate_until"]
    for trace in traces:
        expected = teacher_force_stepwise(
            finetuned, lm.tok_encode(contexts[trace.doc_id]), trace.tokens, conf_ids=meta.token_ids, edges=meta.edges,
            prompt_bins=True, stop_ids=lm.stop_ids, context_of_signal="plain",
        )
        assert trace.bins == expected["bins"], trace.doc_id
        torch.testing.assert_close(torch.tensor(trace.logprob, dtype=torch.float64), torch.tensor(expected["logprob"], dtype=torch.float64), atol=2e-4, rtol=0)
    assert len(traces) == 3


@pytest.mark.parametrize(
    "launch, config, mode, extra",
    [
        ([TUNE, "run", "recipes/finetune_single_device.py"], "none_single_device", "none", ["compile=True"]),
        ([TUNE, "run", "--nproc_per_node", "1", "recipes/finetune_distributed.py"], "marker_distributed", "marker",
         ["confidence.edges.scheme=uniform", "confidence.edges.max=2.2"]),
        ([TUNE, "run", "--nproc_per_node", "1", "recipes/full_finetune_distributed_full_intl.py"], "full_distributed", "full",
         ["interleaving.max_passes=1"]),
        ([sys.executable, "-m", "entropy_guided_generation.full_finetune_single_device_ans_intl_mistake"], "marker_single_device", "marker", []),
    ],
    ids=["finetune_single_device", "finetune_distributed", "full_finetune_distributed_full_intl", "full_finetune_single_device_ans_intl_mistake"],
)
def test_every_entry_point_trains_its_mode_as_users_launch_it(tmp_path, subprocess_env, launch, config, mode, extra):
    """The entry points no other test launches, each the way the README launches it (``tune run`` from
    the repository root with ``PYTHONPATH=.``, ``python -m``; the distributed ones on one rank, their
    two-rank FSDP2 run being the marker test's): one step, then the checkpoint's ``confidence.json``
    records the entry's mode (from YAML for ``finetune_*``). Options ride along: ``compile: True`` (the
    layers and the loss are compiled, and the step-1 loss, before any update, is the eager run's),
    ``edges: {scheme: uniform, max}`` (the edges in ``confidence.json``), ``max_passes: 1`` (one pass
    per micro-batch logged)."""
    out = tmp_path / "run"
    output = run(launch + config_args(config, out, *TINY_BUDGET, *extra), {**subprocess_env, "PYTHONPATH": "." + ":" + subprocess_env["PYTHONPATH"]})
    assert read_confidence_json(out / "epoch_0").mode == mode
    assert len(losses(out)) == 1
    if "confidence.edges.scheme=uniform" in extra:
        meta = read_confidence_json(out / "epoch_0")
        assert meta.edge_scheme == "uniform" and meta.edges == pytest.approx([2.2 * k / 11 for k in range(1, 11)], abs=1e-12)
    if "interleaving.max_passes=1" in extra:
        assert read_disk_log(out / "logs")[1]["conf/passes_mean"] == 1.0
    if "compile=True" in extra:
        assert "Compiling model layers with torch.compile" in output and "Compiling loss with torch.compile" in output
        run_recipe(tiny_config(config, tmp_path / "eager", *TINY_BUDGET))
        assert losses(out)[0] == pytest.approx(losses(tmp_path / "eager")[0], rel=1e-5)


def test_confidence_options_of_the_readme_reach_confidence_json_and_the_eval_recipe(tmp_path, subprocess_env):
    """A YAML whose ``confidence`` section sets every codec option of the README's codec section to a
    non-default (``signal: max_prob``, ``temperature: 0.7``, ``dtype: float64``, ``edges:
    {scheme: maxprob_round}``, ``tokens`` as a list of strings), trained one step (lr 0) from the
    mixed-format base with ``tune run``; ``confidence.json`` records each, and the eval recipe
    (from Python) decodes with them: its traces equal token-by-token teacher forcing with the max
    probability at tau 0.7 binned as the public code's round(10 p)."""
    from entropy_guided_generation import kit
    from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
    from entropy_guided_generation.kit.train_base import mixed_format_base

    from references import teacher_force_stepwise

    strings = [f"<|conf_{k}|>" for k in range(11)]
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "answer_single_device.yaml")
    cfg.confidence = {"signal": "max_prob", "temperature": 0.7, "dtype": "float64", "edges": {"scheme": "maxprob_round"}, "tokens": strings}
    cfg.checkpointer.checkpoint_dir = str(mixed_format_base("sequential"))
    OmegaConf.save(cfg, tmp_path / "max_prob.yaml")
    out = tmp_path / "train"
    command = [TUNE, "run", "recipes/full_finetune_single_device_ans_intl.py", "--config", str(tmp_path / "max_prob.yaml"),
               f"output_dir={out}", f"metric_logger.log_dir={out}/logs", *TINY_BUDGET]
    run(command, {**subprocess_env, "PYTHONPATH": "." + ":" + subprocess_env["PYTHONPATH"]})
    meta = read_confidence_json(out / "epoch_0")
    assert (meta.signal, meta.temperature, meta.dtype, meta.edge_scheme, meta.token_strings) == ("max_prob", 0.7, "float64", "maxprob_round", strings)

    evaluated = tmp_path / "eval"
    eval_cfg = OmegaConf.load(REPO / "configs" / "tiny" / "eval_answer.yaml")
    eval_cfg.pop("confidence")
    eval_cfg.merge_with({"output_dir": str(evaluated), "tasks": ["kit_gsm8k"], "limit": 3, "max_gen_toks": 16, "bootstrap_iters": 0,
                         "checkpointer": {"checkpoint_dir": str(out / "epoch_0"), "checkpoint_files": [next((out / "epoch_0").glob("*.safetensors")).name]}})
    recipe = EleutherEvalRecipeDirect(eval_cfg)
    recipe.setup(eval_cfg)
    summary = recipe.evaluate()
    lm = recipe.lm
    finetuned = kit.load_torchtune_model(out / "epoch_0")
    contexts = {s["doc_id"]: s["arguments"][0][0] for s in summary["lm_eval"]["samples"]["kit_gsm8k"]}
    bins = []
    for trace in (t for t in lm.traces if t.request_type == "generate_until"):
        expected = teacher_force_stepwise(
            finetuned, lm.tok_encode(contexts[trace.doc_id]), trace.tokens, conf_ids=meta.token_ids, stop_ids=lm.stop_ids,
            signal="max_prob", temperature=0.7, bin_of=lambda p: min(int(torch.tensor(10 * p, dtype=torch.float64).round()), 10),
        )
        assert trace.bins == expected["bins"], trace.doc_id
        torch.testing.assert_close(torch.tensor(trace.logprob, dtype=torch.float64), torch.tensor(expected["logprob"], dtype=torch.float64), atol=2e-4, rtol=0)
        bins += [b for b in trace.bins if b >= 0]
    assert len(set(bins)) > 1, bins
