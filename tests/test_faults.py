"""Faults: kill -9 (also mid-save and mid-eval), SIGTERM, damaged checkpoints, NaN losses and a
second run on a busy workdir. Each run is compared with an uninterrupted run of the same seed."""

import json
import logging
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from featdiv_jax import data, guards, train
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


def launch(workdir, data_dir, fault=None):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
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


def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path, caplog,
                                                               data_dir):
  ref_dir, want = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  newest = pathlib.Path(workdir, "checkpoints", str(STEPS))
  victim = max((p for p in newest.rglob("*") if p.is_file() and "state" in p.parts),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:10])  # truncated
  with caplog.at_level(logging.WARNING):
    got = train.train_and_evaluate(smoke_config(data_dir), str(workdir))
  assert f"step {STEPS}" in caplog.text and "damaged" in caplog.text
  assert pathlib.Path(workdir, "checkpoints", f"{STEPS}.damaged").is_dir()  # kept, not deleted
  assert finished_steps(workdir)[-1] == STEPS  # retrained from step 6
  assert_same_history(got, want)


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
    with pytest.raises(guards.WorkdirBusyError, match=f"in use by another run \\(pid {os.getpid()}"):
      train.train_and_evaluate(smoke_config(data_dir), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before
  with guards.WorkdirLock(str(tmp_path)):  # released when its holder ends
    pass
