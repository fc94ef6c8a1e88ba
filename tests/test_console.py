"""The console contract: a smoke run prints a few readable lines; the detail goes to the log."""

import io
import logging as std_logging
import os
import re
import subprocess
import sys

from absl import logging
import pytest

from featdiv_jax import cli, configlib, console
from tests_util import ROOT

ABSL_INFO = re.compile(r"^I\d{4} ", re.M)


def test_a_smoke_run_prints_at_most_30_lines_and_logs_the_detail(tmp_path):
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("FEATDIV_FAULT", None)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  r = subprocess.run(
      [sys.executable, "-m", "featdiv_jax.main", "--config=configs/digits.py:multi_cos,smoke",
       f"--config.dataset.data_dir={data_dir}", f"--workdir={workdir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  terminal = r.stderr + r.stdout
  assert r.returncode == 0, terminal[-3000:]
  lines = terminal.strip().splitlines()
  assert len(lines) <= 30, terminal
  assert not ABSL_INFO.search(terminal), terminal  # no INFO line reaches the terminal
  assert "Traceback" not in terminal
  # What the terminal shows: where the log is and both evaluations (stderr), the table (stdout).
  assert r.stderr.splitlines()[0] == f"featdiv_jax: the full log is in {workdir / 'train.log'}"
  assert "multi_cos step 3/6: eval accuracy" in r.stderr
  assert "multi_cos step 6/6: eval accuracy" in r.stderr
  table = r.stdout.strip().splitlines()
  assert len(table) == 2 and table[0].startswith("variant     heads"), r.stdout
  # What it does not: the detail is in the log file instead.
  log = (workdir / "train.log").read_text()
  assert re.search(r"^Total: 165,226 -- ", log, re.M)  # clu's parameter overview
  assert "[Hyperparameters] {" in log and "'optimizer.learning_rate': " in log
  assert "Saved checkpoint" in log or "checkpoint" in log.lower()
  assert "step 6/6: eval accuracy" in log
  assert len(log.splitlines()) > 5 * len(lines)

  # A second run (all steps done) appends to the same log and says so in one line.
  r = subprocess.run(
      [sys.executable, "-m", "featdiv_jax.main", "--config=configs/digits.py:multi_cos,smoke",
       f"--config.dataset.data_dir={data_dir}", f"--workdir={workdir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "multi_cos: finished already (step 6/6)" in r.stderr
  assert (workdir / "train.log").read_text().startswith(log)


def test_the_bar_shows_run_of_runs_loss_rate_and_both_etas():
  out = io.StringIO()
  screen = console.Console(stream=out, interactive=True)
  screen.plan([4, 10])
  screen.start_run("single", total_steps=4, first_step=0)
  for step in range(1, 5):
    screen.step(step)
    screen.train_metrics(loss=1.25, images_per_s=321.0)
  screen.evaluation("step 4/4: eval accuracy 0.5000, loss 1.0000")
  screen.end_run()
  text = out.getvalue()
  assert "[1/2] single" in text and "4/4" in text
  assert "321 img/s" in text and "loss 1.2500" in text and "all runs ETA" in text
  assert "single step 4/4: eval accuracy 0.5000" in text
  screen.start_run("multi", total_steps=10, first_step=6)  # resumed
  screen.end_run()
  assert "[2/2] multi: resuming from step 6 of 10" in out.getvalue()


def test_not_a_terminal_plain_progress_lines_and_no_bar():
  out = io.StringIO()
  screen = console.Console(stream=out, interactive=False, plain_every_s=0.0)
  screen.plan([5])
  screen.start_run("multi_cos", total_steps=5, first_step=0)
  for step in range(1, 6):
    screen.step(step)
  screen.end_run()
  lines = out.getvalue().splitlines()
  assert lines[0] == "multi_cos: steps 1-5"
  assert lines[1] == "multi_cos: step 1/5 (20%)"  # the pace is measured from the first step
  assert re.fullmatch(r"multi_cos: step 2/5 \(40%\), ETA \d+:\d\d", lines[2]), lines
  assert len(lines) == 5 and "\r" not in out.getvalue()  # steps 1-4; the last says nothing
  quiet = io.StringIO()
  screen = console.Console(stream=quiet, interactive=False, plain_every_s=3600.0)
  screen.start_run("multi_cos", total_steps=5, first_step=0)
  for step in range(1, 6):
    screen.step(step)
  assert len(quiet.getvalue().splitlines()) == 1  # only the start line within the interval


def test_a_disabled_console_prints_nothing():
  out = io.StringIO()
  screen = console.Console(enabled=False, stream=out, interactive=True)
  screen.start_run("multi_cos", total_steps=5, first_step=0)
  screen.step(1)
  screen.evaluation("step 1/5: eval accuracy 0.1")
  screen.message("hello")
  screen.end_run()
  assert out.getvalue() == ""


@pytest.mark.parametrize("process_index, name", [(0, "train.log"), (3, "train.process3.log")])
def test_info_goes_to_the_process_log_warnings_to_the_terminal(tmp_path, process_index, name):
  handler = logging.get_absl_handler()
  level = handler.level
  try:
    console.log_to_file(str(tmp_path), verbose=False, process_index=process_index)
    path = str(tmp_path / name)
    assert handler.level == std_logging.WARNING  # the terminal: warnings and errors only
    logging.info("detail %d", 42)
    assert not (tmp_path / name).exists()  # held: a refused command writes nothing
    assert console.open_log() == path and console.open_log() is None
    logging.warning("something to see")
    for h in std_logging.getLogger().handlers:
      h.flush()
    text = (tmp_path / name).read_text()
    assert "detail 42" in text and "something to see" in text
    assert text.index("detail 42") < text.index("something to see")
    console.log_to_file(str(tmp_path), verbose=True, process_index=process_index)
    assert handler.level == std_logging.NOTSET  # --verbose: everything on the terminal too
  finally:
    console.close_log()
    handler.setLevel(level)


def test_verbose_flag():
  base = ["--config=configs/digits.py:multi_cos,smoke", "--workdir=/tmp/x"]
  assert not cli.parse(base).verbose
  assert cli.parse([*base, "--verbose"]).verbose
  assert cli.parse(["--verbose", *base]).verbose  # takes no value: the next flag is not eaten
  with pytest.raises(configlib.ConfigError, match="--verbose='1'.*takes no value"):
    cli.parse([*base, "--verbose=1"])
