"""Long runs survive preemption, through the users' commands on the tiny configs.

Invariants: SIGTERM stops a finetune after the step in flight, saves it, says how to resume and
exits 143 (one device and 2-rank FSDP2, where every rank stops after the same step); the resumed
run's losses equal an uninterrupted run's; a second signal during that save exits at once and the
resume falls back to the previous complete step checkpoint; one run per ``output_dir`` at a time
(the refusal names the holder; a dead holder's lock is taken over); a non-finite validation loss
stops the run; ``dataset_val=null`` on the command line turns validation off; an eval killed
mid-run (``kill -9`` or SIGTERM) and rerun computes only the requests not yet answered and writes
the results, samples and confidence traces of an uninterrupted run.

Signals are real (``send_signal``) and sent at points the test can see: the run pauses after
logging a chosen step (``preemption_hooks.PausingDiskLogger``) until the test has signalled it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from omegaconf import OmegaConf

from entropy_guided_generation.eleuther_eval import EleutherEvalRecipeDirect
from entropy_guided_generation.run_lock import LOCK_FILENAME, OutputDirInUseError, lock_output_dir
from entropy_guided_generation.training import read_disk_log, run_recipe
from entropy_guided_generation.training.checkpointing import PARTIAL_SUFFIX

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TUNE = str(Path(sys.executable).parent / "tune")
# 32 examples, 2 epochs of 4 steps of 8 (one device) or 2 x 4 (two ranks); no validation.
SHORT_RUN = ["dataset.split=train[:32]", "epochs=2", "max_steps_per_epoch=4", "dataset_val=null"]
WAIT_S = 120


def hooked_env(subprocess_env: Dict[str, str]) -> Dict[str, str]:
    """The subprocess environment with ``tests/`` importable (``preemption_hooks``)."""
    env = dict(subprocess_env)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    return env


def config_args(name: str, out: Path, *overrides: str) -> List[str]:
    return ["--config", f"configs/tiny/{name}.yaml", f"output_dir={out}", f"metric_logger.log_dir={out}/logs", *overrides]


def pausing_logger(step: int) -> List[str]:
    """Overrides that make the run pause after logging ``step`` (see ``PausingDiskLogger``)."""
    return ["metric_logger._component_=preemption_hooks.PausingDiskLogger", f"metric_logger.pause_at_step={step}"]


def tiny_config(name: str, out: Path, *overrides: str):
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / f"{name}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"output_dir={out}", f"metric_logger.log_dir={out}/logs", *overrides]))


def losses(out: Path) -> Dict[int, float]:
    return {step: m["loss"] for step, m in read_disk_log(out / "logs").items() if "loss" in m}


def start(command: List[str], env: Dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_file(path: Path, proc: subprocess.Popen) -> None:
    """Wait until ``path`` exists; fail with the process's output if it ends first."""
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-6000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {WAIT_S} s")
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=WAIT_S)
    return output


def run(command: List[str], env: Dict[str, str]) -> str:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout + done.stderr


def step_folders(out: Path) -> List[str]:
    return sorted(p.name for p in (out / "step_checkpoints").iterdir())


def test_sigterm_saves_the_step_in_flight_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, subprocess_env):
    """Signalled after step 3 (mid-epoch): exit 143, step 3 saved, the log names the step and the
    resume option; resuming gives the uninterrupted run's losses for steps 4-8, bit for bit."""
    reference, split = tmp_path / "reference", tmp_path / "split"
    run_recipe(tiny_config("none_single_device", reference, *SHORT_RUN))
    env = hooked_env(subprocess_env)
    command = [sys.executable, "-m", "entropy_guided_generation.training"] + config_args("none_single_device", split, *SHORT_RUN)
    proc = start(command + pausing_logger(3), env)
    wait_for_file(split / "logs" / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    (split / "logs" / "go").touch()
    output = finish(proc)
    assert proc.returncode == 143, output[-4000:]
    assert re.search(r"Stopped by SIGTERM after step 3; step checkpoint \S*step_00000003 holds it\. Resume with the same command plus resume_from_checkpoint=True", output), output[-4000:]
    assert step_folders(split) == ["step_00000003"] and not (split / "epoch_0").exists()
    assert sorted(losses(split)) == [1, 2, 3]

    run(command + ["resume_from_checkpoint=True"], env)
    assert losses(split) == losses(reference) and sorted(losses(split)) == list(range(1, 9))


def test_second_signal_during_the_final_save_exits_at_once_and_resume_uses_the_previous_checkpoint(tmp_path, subprocess_env):
    """SIGINT after step 3, then SIGINT again once the stop's save of step 3 has written its model
    file: exit 130 at once, ``step_3.partial`` left half written, step 2 the newest complete
    checkpoint; the resume starts from step 2 and matches the uninterrupted run."""
    reference, split = tmp_path / "reference", tmp_path / "split"
    overrides = [*SHORT_RUN, "save_every_n_steps=2"]
    run_recipe(tiny_config("none_single_device", reference, *overrides))
    env = hooked_env(subprocess_env)
    args = config_args("none_single_device", split, *overrides)
    hooked = [sys.executable, "-c", "import preemption_hooks; preemption_hooks.run_signalling_mid_save('entropy_guided_generation.training')"]
    proc = start(hooked + args + pausing_logger(3), env)
    wait_for_file(split / "logs" / "paused", proc)
    proc.send_signal(signal.SIGINT)
    (split / "logs" / "go").touch()
    output = finish(proc)
    assert proc.returncode == 130, output[-4000:]
    assert "SIGINT during the final save: exiting now" in output and "Stopped by" not in output
    assert step_folders(split) == ["step_00000002", "step_00000003" + PARTIAL_SUFFIX]
    assert sorted(p.name for p in (split / "step_checkpoints" / ("step_00000003" + PARTIAL_SUFFIX)).iterdir()) == ["model.pt", "rank_0.pt"]

    resumed = run([sys.executable, "-m", "entropy_guided_generation.training"] + args + ["resume_from_checkpoint=True"], env)
    assert re.search(r"Resuming run cfg-\w+ from step 2 ", resumed)
    assert losses(split) == losses(reference)


def test_sigterm_to_a_two_rank_fsdp2_run_stops_every_rank_after_the_same_step(tmp_path, subprocess_env):
    """``tune run --nproc_per_node 2``, SIGTERM to the launcher after step 2: torchrun forwards it,
    both ranks take the same steps, save one step checkpoint together and exit 143; the resumed run
    logs every step once and matches one device on the same global batches (to 1e-5)."""
    reference, split = tmp_path / "reference", tmp_path / "split"
    run_recipe(tiny_config("answer_single_device", reference, *SHORT_RUN, "batch_size=8"), mode="answer")
    env = hooked_env(subprocess_env)
    command = [TUNE, "run", "--nproc_per_node", "2", "recipes/finetune_distributed.py"] + config_args(
        "answer_distributed", split, *SHORT_RUN, "batch_size=4"
    )
    proc = start(command + pausing_logger(2), env)
    wait_for_file(split / "logs" / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    (split / "logs" / "go").touch()
    output = finish(proc)
    assert proc.returncode != 0
    stopped = re.search(r"Stopped by SIGTERM after step (\d+); step checkpoint \S*step_0*(\d+) holds it", output)
    assert stopped is not None and stopped.group(1) == stopped.group(2), output[-6000:]
    step = int(stopped.group(1))
    assert 2 <= step < 8 and step_folders(split) == [f"step_{step:08d}"]
    assert output.count("SIGTERM received: stopping after the optimizer step in flight") == 2  # torchrun forwarded it to both ranks
    assert sorted(p.name for p in (split / "step_checkpoints" / f"step_{step:08d}").glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]

    run(command + ["resume_from_checkpoint=True"], env)
    one, two = losses(reference), losses(split)
    assert sorted(two) == list(range(1, 9))
    assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-5)


def test_one_run_per_output_dir_at_a_time_and_a_dead_holders_lock_is_taken_over(tmp_path, subprocess_env, caplog):
    """A finetune paused after step 1 holds its folder: a second run there (fresh or resuming) is
    refused naming the first one's process; a lock left by a process killed with SIGKILL is taken
    over with a warning naming it."""
    out = tmp_path / "run"
    env = hooked_env(subprocess_env)
    first = start([sys.executable, "-m", "entropy_guided_generation.training"] + config_args("none_single_device", out, *SHORT_RUN) + pausing_logger(1), env)
    wait_for_file(out / "logs" / "paused", first)
    holder = rf"output_dir {out} is in use by process {first.pid} on \S+ \([^)]*entropy_guided_generation[^)]*\) since [\d-]+ [\d:]+ \(lock {out / LOCK_FILENAME}\); one finetune per output_dir at a time"
    with pytest.raises(OutputDirInUseError, match=holder):
        run_recipe(tiny_config("none_single_device", out, *SHORT_RUN, "resume_from_checkpoint=True"))
    second = subprocess.run(
        [sys.executable, "-m", "entropy_guided_generation.training"] + config_args("none_single_device", out, *SHORT_RUN, "overwrite_output_dir=True"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert second.returncode != 0 and re.search(holder, second.stdout + second.stderr)
    (out / "logs" / "go").touch()
    output = finish(first)
    assert first.returncode == 0, output[-4000:]
    assert sorted(losses(out)) == list(range(1, 9))

    stale = tmp_path / "stale"
    holder_proc = start([sys.executable, "-c", f"import sys, time; from entropy_guided_generation.run_lock import lock_output_dir; held = lock_output_dir({str(stale)!r}); print('locked', flush=True); time.sleep(300)"], env)
    assert holder_proc.stdout.readline().strip() == "locked"
    holder_proc.send_signal(signal.SIGKILL)
    holder_proc.wait()
    with caplog.at_level(logging.WARNING):
        with lock_output_dir(stale, "eval") as lock:
            assert lock.held
    assert f"taking over the lock left by process {holder_proc.pid} on" in caplog.text and "no longer running" in caplog.text


def test_an_eval_into_a_folder_in_use_is_refused_naming_the_holder_and_frees_it_when_done(tmp_path):
    """The eval recipe takes the run lock in ``setup`` (before any model work) and ``cleanup`` frees it."""
    out = tmp_path / "eval"
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/tiny/eval_answer.yaml"), {"output_dir": str(out)})
    with lock_output_dir(out, "finetune"):
        with pytest.raises(OutputDirInUseError, match=rf"output_dir {out} is in use by process {os.getpid()} on .*one eval per output_dir at a time"):
            EleutherEvalRecipeDirect(cfg).setup(cfg)
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    with pytest.raises(OutputDirInUseError, match=rf"in use by process {os.getpid()}"):
        lock_output_dir(out)
    recipe.cleanup()
    with lock_output_dir(out) as lock:
        assert lock.held


def test_non_finite_validation_loss_stops_the_run_before_its_checkpoint(tmp_path):
    """lr 1e30 blows the weights up at step 2 (step 1 has lr 0 under the warm-up); validation after
    step 2 sees it before step 2 is saved."""
    out = tmp_path / "blowup"
    cfg = tiny_config("none_single_device", out, "dataset.split=train[:32]", "max_steps_per_epoch=4", "save_every_n_steps=1",
                      "optimizer.lr=1e30", "clip_grad_norm=null", "run_val_every_n_steps=2", "max_val_batches=1")
    with pytest.raises(FloatingPointError, match=r"step 2 \(epoch 1\): the validation loss is (nan|inf) \(non-finite on rank 0 of 1\); .*last step checkpoint: step 1"):
        run_recipe(cfg)
    assert step_folders(out) == ["step_00000001"]


def test_dataset_val_null_on_the_command_line_turns_validation_off(tmp_path, subprocess_env):
    """torchtune's override ``dataset_val=null`` sets ``dataset_val._component_``; the recipe reads it as off."""
    out = tmp_path / "noval"
    run([TUNE, "run", "recipes/finetune_single_device.py"] + config_args("none_single_device", out, "dataset.split=train[:16]", "max_steps_per_epoch=2", "dataset_val=null"), subprocess_env)
    logged = read_disk_log(out / "logs")
    assert sorted(logged) == [1, 2] and not any("val_loss" in m for m in logged.values())


# ---------------------------------------------------------------- eval: answered requests are kept

EVAL_ARGS = ["limit=3", "batch_size=2", "max_gen_toks=8", "bootstrap_iters=0"]
ANSWERED = re.compile(r"(generate_until|loglikelihood|loglikelihood_rolling): (\d+) of (\d+) requests answered by an earlier run \(\S+\); computing (\d+)")


def pausing_env(env: Dict[str, str], answers: int, paused_file: Path) -> Dict[str, str]:
    """Settings of ``preemption_hooks.py`` run as the eval recipe: halt after ``answers`` answers."""
    return {**env, "EGG_TEST_PAUSE_AFTER": str(answers), "EGG_TEST_PAUSED_FILE": str(paused_file)}


def eval_outputs(out: Path) -> dict:
    """What an eval wrote that must not depend on interruptions: lm-eval's per-task results and our
    calibration, and every samples and traces line (timestamps and timings left out)."""
    (results_file,) = out.glob("results_*.json")
    results = json.loads(results_file.read_text())
    lines = {re.sub(r"_\d{4}-\d{2}-\d{2}T[\d\-.]+\.jsonl$", "", p.name): p.read_text().splitlines() for p in out.glob("*.jsonl")}
    return {"results": results["results"], "calibration": results["confidence_calibration"], "lines": lines}


def answered_counts(output: str) -> Dict[str, tuple]:
    """``{request type: (answered earlier, total, computed)}`` from the eval's log lines."""
    return {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in ANSWERED.finditer(output)}


EVAL_COMMAND = [sys.executable, "-m", "entropy_guided_generation.eleuther_eval", "--config", "configs/tiny/eval_answer.yaml", *EVAL_ARGS]


@pytest.fixture(scope="module")
def uninterrupted_eval(tmp_path_factory):
    """``(output_dir, {request type: counts})`` of one uninterrupted eval (shared by the kill tests)."""
    reference = tmp_path_factory.mktemp("uninterrupted") / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    computed = answered_counts(run(EVAL_COMMAND + [f"output_dir={reference}"], env))
    assert all(answered == 0 for answered, _, _ in computed.values()) and len(computed) == 3
    return reference, computed


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_eval_killed_mid_run_resumes_computing_only_the_unanswered_requests(tmp_path, subprocess_env, uninterrupted_eval, how):
    """Mode answer on three tasks (generation, multiple choice, rolling): the eval is stopped for good
    after its 5th answer; the same command again reads those 5, computes the rest, and writes what an
    uninterrupted run writes. Another config (max_gen_toks) does not read them."""
    reference, computed = uninterrupted_eval
    split = tmp_path / "split"
    env = hooked_env(subprocess_env)
    command = EVAL_COMMAND

    paused = tmp_path / "paused"
    hooked = [sys.executable, str(TESTS / "preemption_hooks.py")]
    proc = start(hooked + command[3:] + [f"output_dir={split}"], pausing_env(env, 5, paused))
    wait_for_file(paused, proc)
    proc.send_signal(getattr(signal, how))
    finish(proc)
    assert proc.returncode == -getattr(signal, how)
    assert not list(split.glob("results_*.json"))

    resumed = answered_counts(run(command + [f"output_dir={split}"], env))
    assert {kind: total for kind, (_, total, _) in resumed.items()} == {kind: total for kind, (_, total, _) in computed.items()}
    assert sum(answered for answered, _, _ in resumed.values()) == 5
    assert all(answered + rest == total for answered, total, rest in resumed.values())
    assert eval_outputs(split) == eval_outputs(reference)

    other = answered_counts(run(command + [f"output_dir={split}", "max_gen_toks=6"], env))
    assert all(answered == 0 for answered, _, _ in other.values())


def test_two_rank_eval_killed_mid_run_resumes_each_ranks_share(tmp_path, subprocess_env):
    """``tune run --nproc_per_node 2``: each rank halts after its 3rd answer and the launcher gets
    SIGTERM; the same command again has each rank read its own 3 answers and compute the rest of its
    share, and rank 0 writes what one uninterrupted process writes (batch_size 1, as in
    test_eval_distributed)."""
    args = ["limit=3", "batch_size=1", "max_gen_toks=8", "bootstrap_iters=0"]
    reference, split = tmp_path / "reference", tmp_path / "split"
    env = hooked_env(subprocess_env)
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/tiny/eval_answer.yaml"), OmegaConf.from_dotlist([*args, f"output_dir={reference}"]))
    recipe = EleutherEvalRecipeDirect(cfg)
    recipe.setup(cfg)
    recipe.evaluate()
    recipe.cleanup()
    launch = [TUNE, "run", "--nproc_per_node", "2"]
    config = ["--config", "configs/tiny/eval_answer.yaml", *args, f"output_dir={split}"]
    proc = start(launch + ["tests/preemption_hooks.py"] + config, pausing_env(env, 3, tmp_path / "paused_{rank}"))
    wait_for_file(tmp_path / "paused_0", proc)
    wait_for_file(tmp_path / "paused_1", proc)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    assert proc.returncode != 0 and not list(split.glob("results_*.json"))

    output = run(launch + ["recipes/eleuther_eval.py"] + config, env)
    per_rank = {rank: 0 for rank in (0, 1)}
    for match in re.finditer(r"(\d+) of \d+ requests answered by an earlier run \(\S+rank(\d)-of-2\.sqlite\)", output):
        per_rank[int(match.group(2))] += int(match.group(1))
    assert per_rank == {0: 3, 1: 3}
    assert eval_outputs(split) == eval_outputs(reference)


def test_lm_evals_use_cache_serves_a_two_rank_rerun_of_our_model_from_its_cache(tmp_path, subprocess_env, kit_cache):
    """``torchrun --nproc_per_node 2 -m entropy_guided_generation.lm_eval --model egg_torchtune ...
    --use_cache``: the second run computes nothing on either rank and logs the same samples (rank 1's
    padding copy, answered by the cache, adds no response)."""
    from entropy_guided_generation import kit

    command = [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "entropy_guided_generation.lm_eval",
        "--model", "egg_torchtune", "--model_args", "config=configs/tiny/eval_answer.yaml,max_gen_toks=8,batch_size=1",
        "--tasks", "kit_gsm8k,kit_arith_choice", "--include_path", str(kit.tasks_dir()), "--limit", "3",
        "--use_cache", str(tmp_path / "cache" / "egg"), "--log_samples",
    ]
    outputs = [run(command + ["--output_path", str(tmp_path / f"out{i}")], subprocess_env) for i in (1, 2)]
    counts = [sorted(re.findall(r"Cached requests: (\d+), Requests remaining: (\d+)", output)) for output in outputs]
    assert counts[0] == [("0", "2"), ("0", "2"), ("0", "8"), ("0", "8")]  # per rank: generation, choices
    assert counts[1] == [("2", "0"), ("2", "0"), ("8", "0"), ("8", "0")]

    def samples(folder: Path) -> Dict[str, list]:
        found = {}
        for path in folder.rglob("samples_*.jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            found[path.name.split("_20")[0]] = [(r["doc_id"], r["resps"], r["filtered_resps"]) for r in rows]
        return found

    assert samples(tmp_path / "out2") == samples(tmp_path / "out1") and len(samples(tmp_path / "out1")) == 2
