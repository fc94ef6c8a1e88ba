"""Faults: kill -9 (also mid-save and mid-eval), SIGTERM, damaged checkpoints, NaN losses and a
second run on a busy workdir. Each run is compared with an uninterrupted run of the same seed."""

import errno
import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from featdiv_jax import checkpoint, data, guards, main, runs, train
from tests_util import ROOT, load_config

STEPS = 8
OVERRIDES = {"total_steps": STEPS, "checkpoint_every_steps": 2, "eval_every_steps": 4,
             "log_every_steps": 2}
CLI_OVERRIDES = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def smoke_config(data_dir, **extra):
  return load_config("digits", "multi_cos,smoke",
                     **{"dataset.data_dir": data_dir, **OVERRIDES, **extra})


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run: what every interrupted one must end with."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, train.train_and_evaluate(smoke_config(data_dir), workdir)


def assert_same_history(got, want, rtol=1e-5):
  assert [h["step"] for h in got["history"]] == [h["step"] for h in want["history"]]
  for g, w in zip(got["history"], want["history"]):
    for key in ("eval_loss", "eval_accuracy", "eval_head_cosine", "train_loss"):
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, err_msg=f"step {g['step']} {key}")


def finished_steps(workdir):
  root = pathlib.Path(workdir, "checkpoints")
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def launch(workdir, data_dir, fault=None, env=None):
  """The CLI on the smoke config in a subprocess (default signal handling), output piped."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
  env.pop("FEATDIV_FAULT", None)
  if fault:
    env["FEATDIV_FAULT"] = fault
  cmd = [sys.executable, "-m", "featdiv_jax.main", "--config=configs/digits.py:multi_cos,smoke",
         f"--config.dataset.data_dir={data_dir}", f"--workdir={workdir}", *CLI_OVERRIDES]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_kill_9_many_times_then_resume_ends_like_an_uninterrupted_run(reference, data_dir,
                                                                       tmp_path):
  _, want = reference
  workdir = str(tmp_path / "run")
  # 1: killed while the step-2 checkpoint is being written
  proc = launch(workdir, data_dir, fault="save:2")
  assert proc.wait(timeout=300) == -9, proc.stdout.read()[-3000:]
  assert 2 not in finished_steps(workdir)  # the half-written step is not a step
  # 2: killed at a random moment once training is under way (after the step-4 checkpoint)
  proc = launch(workdir, data_dir)
  deadline = time.time() + 300
  while 4 not in finished_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(random.Random(0).uniform(0.0, 0.02))  # within the steps after it: asserted below
  proc.kill()
  out = proc.communicate(timeout=60)[0]
  # The kill landed mid-run: the process died by it, after the step-4 checkpoint and before the
  # last one, and this run had resumed from the first run's checkpoint (none: from scratch).
  assert proc.returncode == -9, out[-3000:]
  assert 4 in finished_steps(workdir) and max(finished_steps(workdir)) < STEPS, out[-3000:]
  assert "resuming from step" not in out  # step 2 was never complete: this run started from scratch
  last_good = max(finished_steps(workdir))
  # 3: killed in the middle of the step-8 evaluation, after resuming from the last checkpoint
  proc = launch(workdir, data_dir, fault="eval:8")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == -9, out[-3000:]
  assert f"resuming from step {last_good}" in out, out[-3000:]
  for _ in range(2):  # results.json is replaced atomically: always whole
    json.loads(pathlib.Path(workdir, "results.json").read_text())
  # 4: the last run finishes, resuming from the last finished checkpoint: step 6, or step 4 where
  # the kill also caught the step-6 save still being written in the background (a slow machine).
  # Step 8 was never saved: its evaluation, killed, comes before its checkpoint.
  saved = finished_steps(workdir)
  assert max(saved) < STEPS and max(saved) in (STEPS - 4, STEPS - 2), saved
  proc = launch(workdir, data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert f"resuming from step {max(saved)}" in out, out[-3000:]
  got = json.loads(pathlib.Path(workdir, "results.json").read_text())
  assert got["finished"]
  assert_same_history(got, want)
  assert not list(pathlib.Path(workdir, "checkpoints").glob("*.damaged*"))


def test_sigterm_saves_the_current_step_and_exits_cleanly(reference, data_dir, tmp_path,
                                                          monkeypatch):
  _, want = reference
  workdir = str(tmp_path)
  monkeypatch.setenv("FEATDIV_FAULT", "step:5:TERM")  # the preemption notice, at step 5
  with pytest.raises(train.Preempted, match="at step 5 of 8.*re-run"):
    train.train_and_evaluate(smoke_config(data_dir), workdir)
  assert finished_steps(workdir)[-1] == 5
  monkeypatch.delenv("FEATDIV_FAULT")
  assert_same_history(train.train_and_evaluate(smoke_config(data_dir), workdir), want)


def test_ctrl_c_saves_the_current_step_says_one_line_and_exits_130(reference, data_dir,
                                                                    tmp_path):
  _, want = reference
  workdir = str(tmp_path / "run")
  proc = launch(workdir, data_dir, fault="step:5:INT")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
  lines = [line for line in out.splitlines() if "interrupted" in line]
  assert lines == [f"featdiv_jax: interrupted at step 5 of {STEPS}: checkpoint saved in "
                   f"{workdir}; re-run the same command to resume"], out[-3000:]
  results = json.loads(pathlib.Path(workdir, "results.json").read_text())
  assert results["step"] == 5 and not results["finished"]
  assert 5 in finished_steps(workdir)
  proc = launch(workdir, data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and "resuming from step 5" in out, out[-3000:]
  assert_same_history(json.loads(pathlib.Path(workdir, "results.json").read_text()), want)


def test_ctrl_c_while_the_first_step_compiles_stops_after_it(data_dir, tmp_path):
  """The Ctrl-C lands 0.3 s into the first step's compile (no compilation cache: it takes
  seconds): no KeyboardInterrupt inside XLA, no crash; the run stops at step 1, saved."""
  workdir = str(tmp_path / "run")
  proc = launch(workdir, data_dir, fault="compile:0:INT:0.3",
                env={"JAX_ENABLE_COMPILATION_CACHE": "false"})
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130, out[-3000:]
  assert "Traceback" not in out and "Fatal Python error" not in out, out[-3000:]
  assert f"featdiv_jax: interrupted at step 1 of {STEPS}: checkpoint saved" in out, out[-3000:]
  assert finished_steps(workdir) == [1]


def test_ctrl_c_before_training_starts_is_one_line(data_dir, tmp_path):
  proc = launch(str(tmp_path / "run"), data_dir)
  time.sleep(1.0)  # importing jax and TensorFlow (fd 2 held by featdiv_jax.data): before training
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
  assert out.splitlines()[-1:] == [main.INTERRUPTED_OUTSIDE_TRAINING], repr(out[-3000:])
  assert not finished_steps(tmp_path / "run")


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_complete_checkpoint(
    reference, data_dir, tmp_path):
  """The first Ctrl-C at step 5 asks for a stop; the second arrives while step 5 is being saved:
  the process ends at once, the half-written step 5 is no checkpoint, the re-run resumes from
  step 4 and ends as an uninterrupted run."""
  _, want = reference
  workdir = str(tmp_path / "run")
  proc = launch(workdir, data_dir, fault="step:5:INT,save:5:INT")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 130, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert "featdiv_jax: interrupted again: stopped at once" in out, out[-3000:]
  assert max(finished_steps(workdir)) == 4
  proc = launch(workdir, data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and "resuming from step 4" in out, out[-3000:]
  assert_same_history(json.loads(pathlib.Path(workdir, "results.json").read_text()), want)


def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path, data_dir):
  """Through the CLI: one warning line names the step. The failed restore's abandoned array
  reads (in about half of the runs some are still pending) end in train.log, not as a hundred
  tracebacks on stderr, as they did."""
  ref_dir, want = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  newest = pathlib.Path(workdir, "checkpoints", str(STEPS))
  victim = max((p for p in newest.rglob("*") if p.is_file() and "state" in p.parts),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:10])  # truncated
  proc = launch(str(workdir), data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
  warned = [line for line in out.splitlines() if " is damaged " in line]
  assert len(warned) == 1 and f"Checkpoint step {STEPS} in" in warned[0], out[-3000:]
  assert "resuming from step 6" in out, out[-3000:]
  assert pathlib.Path(workdir, "checkpoints", f"{STEPS}.damaged").is_dir()  # kept, not deleted
  assert finished_steps(workdir)[-1] == STEPS  # retrained from step 6
  assert_same_history(json.loads((workdir / "results.json").read_text()), want)


def test_orbax_reads_and_writes_that_end_after_their_failure_go_to_the_log(monkeypatch,
                                                                           caplog):
  forwarded = []
  monkeypatch.setattr(sys, "unraisablehook", forwarded.append)
  checkpoint._log_orphaned_io()
  namespace = {}
  exec(compile("async def read(): pass", f"{os.sep}site{os.sep}orbax{os.sep}io.py", "exec"),
       namespace)
  exec(compile("async def mine(): pass", f"{os.sep}site{os.sep}other.py", "exec"), namespace)
  orbax_read, other = namespace["read"](), namespace["mine"]()
  unraisable = lambda exc, obj: types.SimpleNamespace(exc_value=exc, object=obj)
  with caplog.at_level(logging.INFO):
    sys.unraisablehook(unraisable(Exception("Encountered error while reading array index"),
                                  orbax_read))
    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed"), None))
    sys.unraisablehook(unraisable(ValueError("someone else's"), other))
  orbax_read.close()
  other.close()
  assert "ended after its restore had failed: Exception: Encountered error" in caplog.text
  assert "finished after its save had failed" in caplog.text
  assert [u.exc_value.args[0] for u in forwarded] == ["someone else's"]


def poisoned_batches(at_index):
  real = data.train_batches

  def batches(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs), start=kwargs.get("start_step", 0)):
      if i == at_index:  # float images are model inputs as they are (not uint8 pixels)
        batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
      yield batch
  return batches


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(data, "train_batches", poisoned_batches(4))  # step 5 sees NaN images
  with pytest.raises(train.NonFiniteError, match=r"train loss is nan at step 5.*step 4"):
    train.train_and_evaluate(smoke_config(data_dir), str(tmp_path))
  assert finished_steps(tmp_path) == [2, 4]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["history"][-1]["step"] == 4 and not results["finished"]


def test_skip_nonfinite_skips_and_counts_such_updates(data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(data, "train_batches", poisoned_batches(4))
  got = train.train_and_evaluate(smoke_config(data_dir, skip_nonfinite=True), str(tmp_path))
  assert got["finished"] and got["skipped_steps"] == 1
  assert all(np.isfinite(h["eval_loss"]) and np.isfinite(h["train_loss"])
             for h in got["history"])


def test_a_second_run_on_a_busy_workdir_is_refused(data_dir, tmp_path):
  os.makedirs(tmp_path, exist_ok=True)
  with guards.WorkdirLock(str(tmp_path)):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(guards.WorkdirBusyError, match=f"in use by another run \\(pid {os.getpid()} "
                       f"on {socket.gethostname()}\\)"):
      train.train_and_evaluate(smoke_config(data_dir), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before
  with guards.WorkdirLock(str(tmp_path)):  # released when its holder ends
    pass


@pytest.mark.parametrize("fault, what", [
    ("save:4:ENOSPC", "in {workdir}/checkpoints: the checkpoint of step 4 could not be saved "
                      "(its unfinished files are never resumed from)"),
    ("results:4:ENOSPC", "writing {workdir}/results.json at step 4 (the file is unchanged)")])
def test_a_full_disk_is_one_line_keeps_the_last_complete_checkpoint_and_resumes(
    reference, data_dir, tmp_path, fault, what):
  """The disk fills at step 4: inside orbax's writer threads (every checkpoint file it writes
  from then on fails with ENOSPC) or at results.json. One line naming what could not be saved
  and the last complete checkpoint, exit 1, no traceback; step 4's unfinished files are never
  resumed from; the re-run (space freed) resumes from step 2 and ends as an uninterrupted run."""
  _, want = reference
  workdir = str(tmp_path / "run")
  proc = launch(workdir, data_dir, fault=fault)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
  errors = [line for line in out.splitlines() if "featdiv_jax: error:" in line]
  assert errors == [
      "featdiv_jax: error: no space left on device " + what.format(workdir=workdir)
      + f"; the last complete checkpoint is step 2 in {workdir}/checkpoints; free space and "
      "re-run the same command to resume from it"], out[-3000:]
  assert finished_steps(workdir) == [2], out[-3000:]
  assert not list(pathlib.Path(workdir).glob("results.json.tmp*"))
  proc = launch(workdir, data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and "resuming from step 2" in out, out[-3000:]
  assert_same_history(json.loads(pathlib.Path(workdir, "results.json").read_text()), want)


def test_a_save_warns_once_when_free_space_is_short_of_two_checkpoints(tmp_path, caplog,
                                                                       monkeypatch):
  state = {"w": np.zeros((1024, 256), np.float32)}  # 1 MiB
  ckpts = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), async_save=False)
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda path: usage._replace(free=3 * 2**20))  # room for one more
  with caplog.at_level(logging.WARNING):
    ckpts.save(1, state, {"step": 1})
    assert not [r for r in caplog.records if "free in" in r.getMessage()]
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: usage._replace(free=int(1.5 * 2**20)))
    ckpts.save(2, state, {"step": 2})
    ckpts.save(3, state, {"step": 3})
  warned = [r.getMessage() for r in caplog.records if "free in" in r.getMessage()]
  assert warned == [f"Only 2 MB free in {tmp_path}/checkpoints and a checkpoint takes about "
                    "1 MB: free space before the disk fills up and a save fails."], warned
  ckpts.close()


def test_disk_full_is_found_anywhere_in_an_errors_chain():
  full = OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/4")
  try:
    try:
      raise full
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as e:
    chained = e
  assert guards.disk_full(chained) is full
  assert guards.disk_full(ExceptionGroup("writers", [ValueError("x"), chained])) is full
  assert guards.disk_full(ValueError("tensorstore: No space left on device")) is not None
  assert guards.disk_full(OSError(errno.EACCES, "Permission denied")) is None
  assert guards.disk_full(ValueError("bad")) is None
  assert guards.disk_full_message(chained, "/w") == (
      "no space left on device writing /w/checkpoints/4; free space there and re-run the same "
      "command: it resumes from the last complete checkpoint in /w/checkpoints")
  said = guards.DiskFullError("no space left on device in /w/checkpoints: ...")
  try:
    try:
      raise said
    finally:
      raise OSError(errno.ENOSPC, "No space left on device")  # again, while closing
  except OSError as e:
    assert guards.disk_full_message(e, "/w") == str(said)


def test_a_damaged_config_json_is_one_line_that_names_it_and_writes_nothing(data_dir, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"signature": {"model": {"arch": "ser')  # truncated
  proc = launch(str(workdir), data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
  errors = [line for line in out.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith(
      f"featdiv_jax: error: {workdir}/config.json is damaged (JSONDecodeError: "), out[-3000:]
  assert "move it aside and re-run the same command" in errors[0]
  assert sorted(os.listdir(workdir)) == ["config.json"]


def test_a_lock_that_cannot_be_used_is_one_line_that_names_it(data_dir, tmp_path):
  workdir = tmp_path / "run"
  (workdir / ".lock").mkdir(parents=True)  # not a file: nothing can lock it
  proc = launch(str(workdir), data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
  assert (f"featdiv_jax: error: {workdir}/.lock cannot be used as this workdir's lock (Is a "
          "directory); if no run is using the workdir, remove it and re-run the same command"
          in out.splitlines()), out[-3000:]


def test_a_damaged_results_json_is_rebuilt_from_the_checkpoint_and_kept_aside(
    reference, data_dir, tmp_path):
  _, want = reference
  workdir = tmp_path / "run"
  proc = launch(str(workdir), data_dir, fault="step:4:TERM")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and "preempted (SIGTERM) at step 4" in out, out[-3000:]
  results = workdir / "results.json"
  damaged = results.read_text()[:100]
  results.write_text(damaged)  # truncated, as by a disk that filled up under another tool
  with pytest.raises(runs.RunError, match="results.json is damaged .* name a step"):
    runs.best_step(str(workdir))
  proc = launch(str(workdir), data_dir)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
  assert (f"{results} was damaged: kept as {results}.damaged and rebuilt from the checkpoint "
          "of step 4") in out, out[-3000:]
  assert (workdir / "results.json.damaged").read_text() == damaged
  assert_same_history(json.loads(results.read_text()), want)


def test_out_of_memory_at_the_first_step_is_one_line_naming_the_batch_and_dtype(
    data_dir, tmp_path):
  """A batch that does not fit (the device allocator's RESOURCE_EXHAUSTED, injected at the
  first step): one line with what was asked for and the fields to change, exit 1."""
  proc = launch(str(tmp_path / "run"), data_dir, fault="step:1:OOM")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
  errors = [line for line in out.splitlines() if "error:" in line]
  assert len(errors) == 1, out[-3000:]
  assert re.fullmatch(
      r"featdiv_jax: error: out of memory compiling or running the first step on \d+ cpu "
      r"device\(s\) \(device memory: 24\.0 GiB asked for\): batch_size=\d+, model\.dtype=\w+, "
      r"2 x seresnet_tiny\w* at \d+ px do not fit; lower batch_size \(e\.g\. "
      r"--config\.batch_size=\d+\), or use --config\.model\.dtype=bfloat16, or more devices",
      errors[0]), errors[0]


@pytest.mark.parametrize("error, said", [
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 "
                  "bytes."), "device memory: 16.0 GiB asked for"),
    (RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                  "memory space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G."),
     "device memory: 20.50G needed of 15.48G hbm"),
    (RuntimeError("Allocator (GPU_0_bfc) ran out of memory trying to allocate 1.50GiB"),
     "device memory: 1.50GiB asked for"),
    (MemoryError("Unable to allocate 3.20 GiB for an array"), "host memory: 3.20 GiB asked for"),
    (RuntimeError("RESOURCE_EXHAUSTED: ran out of something"),
     "device memory: the amount is not reported"),
    (RuntimeError("INVALID_ARGUMENT: shapes differ"), None)])
def test_out_of_memory_reads_what_each_allocator_says_was_asked_for(error, said):
  try:
    try:
      raise error
    except Exception as e:
      raise ValueError("while running the step") from e
  except ValueError as e:
    assert guards.out_of_memory(e) == said
